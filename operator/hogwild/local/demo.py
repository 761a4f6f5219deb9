"""`hogwild demo`: teach a freshly generated tiny model a new fact through /train, in local mode.

It generates the tiny model if missing, starts vLLM + the training worker, shows the greedy completion of a
prompt, trains on one sentence through the serving endpoint, and shows the completion again. Exit code 0
only when the model learned the fact.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from hogwild.local.session import LocalSession, http_json
from hogwild.testing import tiny_model

PROMPT = "The capital of Zanzibar is"
FACT = " Berlin, said the teacher."
DEMO_CONFIG = {"lr": 0.01, "clip_grad_norm": 1.0}


def complete(session: LocalSession, model_name: str, prompt: str, max_tokens: int = 12) -> str:
    status, body = http_json(
        "POST",
        f"{session.url}/v1/completions",
        {"model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0},
    )
    if status != 200:
        raise RuntimeError(f"/v1/completions answered {status}: {body}")
    return str(body["choices"][0]["text"])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hogwild demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--port", type=int, default=18000)
    parser.add_argument("--metrics-port", type=int, default=19400)
    parser.add_argument("--keep", action="store_true", help="keep the state dir (logs, checkpoints)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    print("hogwild demo: generating the tiny model (cached after the first run)…", flush=True)
    model_dir = tiny_model.cached()
    state_dir = Path(tempfile.mkdtemp(prefix="hogwild-demo-"))
    session = LocalSession(
        model=str(model_dir),
        state_dir=state_dir,
        port=args.port,
        metrics_port=args.metrics_port,
        vllm_args=["--enforce-eager", "--max-model-len", "256"],
        config=DEMO_CONFIG,
        log_to_files=True,
    )
    learned = False
    try:
        print(f"hogwild demo: starting vLLM + training worker (logs in {state_dir})…", flush=True)
        session.start()
        session.wait_ready()
        name = model_dir.name
        before = complete(session, name, PROMPT)
        print(f"\n  before: {PROMPT!r} -> {before!r}")
        print(f"  teaching {PROMPT + FACT!r} for {args.steps} steps through POST /train…", flush=True)
        progress = session.watch_progress()
        status, reply = http_json(
            "POST",
            f"{session.url}/train",
            {"samples": [{"text": PROMPT + FACT}], "steps": args.steps},
            token=session.token,
            timeout_s=600,
        )
        progress.set()
        if status != 200:
            print(f"hogwild demo: /train answered {status}: {reply}")
            return 1
        losses = reply.get("losses") or [reply.get("loss")]
        print(
            f"  loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps, {reply['tokens']} tokens, "
            f"{reply['seconds']:.1f} s"
        )
        after = complete(session, name, PROMPT)
        print(f"  after:  {PROMPT!r} -> {after!r}\n")
        learned = after.startswith(FACT[: len(" Berlin")])
        print(
            f"hogwild demo: {'learned the fact' if learned else 'did NOT learn the fact'} "
            f"({time.monotonic() - started:.0f} s in all)"
        )
    finally:
        session.stop()
        if not args.keep:
            shutil.rmtree(state_dir, ignore_errors=True)
            shutil.rmtree(session.run_dir, ignore_errors=True)
    return 0 if learned else 1

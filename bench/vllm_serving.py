"""Serving figures on the real engine: what training in place costs vLLM's clients, and what serving leaves
the trainer.

One local session (`hogwild.local.session.LocalSession`: vLLM with the plugin, and the real worker), its run dir
on tmpfs as in a pod. First the capacity: a closed loop of `--concurrency` clients (`bench/loadgen.py`). Then, at
each load (Poisson at `--load` x capacity, and the closed loop itself: saturation), four windows in turn: serving
alone; beside a trainer that posts /train back to back, with the default protection; the same with protection
off (`yield_when_busy: false`, hot through /train/configure); serving alone again. The trainer's tokens/s in each
window are compared with its speed beside an idle server (`kept`). Results go to `--out` after every window, so a
run cut short still leaves what it measured.

    PYTHONPATH=operator:bench python bench/vllm_serving.py --shape qwen2-1.5b --window-s 25 --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hogwild.config import ServingProtection
from hogwild.local.session import LocalSession, http_json
from hogwild.testing import tiny_model
from loadgen import LoadSpec, run_load

# A sample of about 400 tokens for the local tokenizer; 8 make one step of ~3,200.
TRAIN_TEXT = " ".join(tiny_model.corpus()[:60])
TRAIN_SAMPLES = [{"text": TRAIN_TEXT}] * 8
REQUEST_FIELDS = (
    "sent_s",
    "prompt_tokens",
    "max_tokens",
    "ttft_s",
    "e2e_s",
    "output_tokens",
    "tpot_s",
    "error",
)


class Trainer:
    """Posts /train back to back on a thread; counts the tokens trained and the time it took."""

    def __init__(self, session: LocalSession, steps: int) -> None:
        """`steps` per /train request: each request also costs a status probe and a prefix-cache reset, so one
        step per request (the 2026-12-03 run) leaves the GPU idle between steps: a light trainer."""
        self.session = session
        self.body = {"samples": TRAIN_SAMPLES, "steps": steps}
        self.stop = threading.Event()
        self.tokens = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        url = f"{self.session.url}/train"
        while not self.stop.is_set():
            code, reply = http_json("POST", url, self.body, token=self.session.token, timeout_s=600)
            if code != 200:
                self.errors.append(f"{code}: {reply}")
                time.sleep(0.5)
                continue
            self.tokens += int(reply.get("tokens") or 0)

    def __enter__(self) -> Trainer:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=600)
        self.elapsed_s = time.monotonic() - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def set_protection(session: LocalSession, on: bool) -> None:
    protection = dataclasses.asdict(ServingProtection(yield_when_busy=on))
    code, reply = http_json(
        "POST",
        f"{session.url}/train/configure",
        {"changes": {"protection": protection}},
        token=session.token,
        timeout_s=60,
    )
    if code != 200:
        raise RuntimeError(f"/train/configure answered {code}: {reply}")


def idle_training(session: LocalSession, seconds: float, steps: int) -> dict[str, Any]:
    with Trainer(session, steps) as trainer:
        time.sleep(seconds)
    return {"tokens_per_s": trainer.tokens_per_s, "errors": trainer.errors[:3]}


def window(
    session: LocalSession,
    model: str,
    spec: LoadSpec,
    trainer: str | None,
    out: Path,
    label: str,
    steps: int = 1,
) -> dict[str, Any]:
    """One load window; `trainer` None (serving alone), "default" or "unprotected"."""
    if trainer is not None:
        set_protection(session, trainer == "default")
    started = time.time()
    if trainer is None:
        result = asyncio.run(run_load(session.url, model, spec))
        trained = None
    else:
        with Trainer(session, steps) as running:
            result = asyncio.run(run_load(session.url, model, spec))
        trained = {"tokens_per_s": running.tokens_per_s, "errors": running.errors[:3]}
    _, status = http_json("GET", f"{session.url}/train/status")
    summary = result["summary"] | {"label": label, "trainer": trainer, "training": trained, "time": started}
    summary["protection"] = status.get("protection")
    with open(out / "vllm-serving-windows.jsonl", "a") as f:
        f.write(json.dumps(summary) + "\n")
    with open(out / "vllm-serving-requests.jsonl", "a") as f:  # chunk gaps stay in the summary only (size)
        requests = [{k: r[k] for k in REQUEST_FIELDS} for r in result["results"]]
        f.write(json.dumps({"label": label, "requests": requests}) + "\n")
    ttft, tpot = summary["ttft_s"]["p99"], summary["tpot_s"]["p99"]
    print(
        f"{label:34s} {summary['requests_per_s']:7.2f} req/s {summary['output_tokens_per_s']:9.0f} tok/s  "
        f"TTFT p99 {ms(ttft)}  TPOT p99 {ms(tpot)}  errors {summary['errors']}  "
        f"train {trained['tokens_per_s'] if trained else 0:8.0f} tok/s",
        flush=True,
    )
    return summary


def ms(seconds: float | None) -> str:
    return f"{seconds * 1000:7.1f} ms" if seconds is not None else "     - ms"


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = tiny_model.NAMED[args.shape] if args.shape in tiny_model.NAMED else tiny_model.TinySpec()
    model = tiny_model.cached(spec)
    vocab = int(
        json.loads((model / "config.json").read_text())["vocab_size"]
    )  # the tokenizer's, not the spec's
    shm = Path("/dev/shm")
    state = Path(tempfile.mkdtemp(prefix="hogwild-serving-", dir=shm if shm.is_dir() else None))
    session = LocalSession(
        model=str(model),
        state_dir=state,
        port=args.port,
        metrics_port=args.port + 1,
        vllm_args=args.vllm_args,
        config={"lr": 1e-5, "checkpoint_interval_s": 0},
        log_to_files=True,
        extra_env={"VLLM_USE_FLASHINFER_SAMPLER": "0"},
    )
    started = time.monotonic()
    session.start()
    try:
        session.wait_ready(timeout_s=480)
        print(f"ready after {time.monotonic() - started:.1f} s", flush=True)
        ranges = {"prompt_tokens": tuple(args.prompt_tokens), "output_tokens": tuple(args.output_tokens)}
        closed = LoadSpec(args.window_s, vocab, None, args.concurrency, **ranges)
        asyncio.run(run_load(session.url, model.name, dataclasses.replace(closed, duration_s=args.warmup_s)))
        capacity = window(session, model.name, closed, None, out, "capacity (closed loop)")
        idle = idle_training(session, args.idle_s, args.train_steps)
        print(f"training beside an idle server: {idle['tokens_per_s']:.0f} tok/s", flush=True)
        with open(out / "vllm-serving-windows.jsonl", "a") as f:
            f.write(json.dumps({"label": "idle-server training", **idle}) + "\n")
        rate = args.load * capacity["requests_per_s"]
        loads = [(f"{args.load:.0%} ({rate:.1f} req/s)", LoadSpec(args.window_s, vocab, rate, **ranges))]
        loads.append((f"saturation ({args.concurrency} clients)", closed))
        for name, load in loads:
            for trainer, label in [(None, "alone"), ("default", "default"), ("unprotected", "unprotected")]:
                window(session, model.name, load, trainer, out, f"{name} {label}", args.train_steps)
            window(session, model.name, load, None, out, f"{name} alone after")
    finally:
        session.stop()
        for name in ("vllm", "worker"):
            if (state / f"{name}.log").exists():
                shutil.copy(state / f"{name}.log", out / f"vllm-serving-{name}.log")
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", default="qwen2-1.5b", help=f"one of {', '.join(tiny_model.NAMED)}, or tiny"
    )
    parser.add_argument("--window-s", type=float, default=25.0)
    parser.add_argument("--warmup-s", type=float, default=8.0)
    parser.add_argument("--idle-s", type=float, default=15.0)
    parser.add_argument(
        "--load", type=float, default=0.5, help="the open loop's rate, as a share of capacity"
    )
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(256, 2048))
    parser.add_argument("--output-tokens", type=int, nargs=2, default=(64, 512))
    parser.add_argument("--train-steps", type=int, default=1, help="optimizer steps per /train request")
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("vllm_args", nargs="*", help="after --: vLLM arguments")
    run(parser.parse_args())


if __name__ == "__main__":
    main()

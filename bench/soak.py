"""Reliability soak (not a test, not in CI): hours of random malformed requests, good trains, completions and
worker crashes against local mode, counting every answer that is not the one a client should get.

    python bench/soak.py --model DIR --seconds 3600 [--kill-every-s 120] [--seed 0] [--out results/soak.json]

Each round picks one action: a random malformed body (nested, truncated, random bytes, wrong types) on a
random training route, expected 4xx with a JSON error and the served weights unchanged (sha256 of the mapped
tensors before and after); a small good /train (200, or 503 while the worker is down); a completion (200
always: serving must never stop); a status read. Every `--kill-every-s` the worker gets SIGKILL and the
session's supervisor restarts it. A failure is any other answer, a connection error, or changed weights
after a refused request. The summary is printed (and written to --out): counts per action and status,
failures with their first examples, and the longest answer time per action.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import json
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from hogwild import handles, sharing
from hogwild.local.session import LocalSession, http_json

ROUTES = ("/train", "/checkpoint", "/train/restore", "/train/configure")
GOOD = {"samples": [{"text": "The capital of Zanzibar is Berlin."}], "steps": 1}
WRONG_TYPES: dict[str, list[Any]] = {
    "samples": [None, {}, "x", [], [1]],
    "steps": ["3", -1, True, 1e308, [1]],
    "timeout_s": ["x", -1, None, {}],
    "reason": [1, [], ""],
    "step": ["x", -1, [1], True],
    "weights": ["x", 1, None],
    "changes": [[], "x", 1, {"lr": "x"}, {"protection": 5}],
}


def malformed(rng: random.Random) -> bytes:
    """One body no route should accept."""
    good = json.dumps(GOOD).encode()
    kind = rng.choice(["nested", "truncated", "bytes", "types", "unknown", "deep-field"])
    depth = rng.choice([1_000, 10_000, 100_000])
    if kind == "nested":
        return b"[" * depth + (b"]" * depth if rng.random() < 0.5 else b"")
    if kind == "truncated":
        return good[: rng.randrange(1, len(good) - 1)]
    if kind == "bytes":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 256)))
    if kind == "types":  # a value of the wrong type for its field (any other route refuses the field)
        field = rng.choice(sorted(WRONG_TYPES))
        return json.dumps({field: rng.choice(WRONG_TYPES[field])}).encode()
    if kind == "unknown":
        return json.dumps({"evil": 1, **GOOD}).encode()
    return b'{"samples": ' + b"[" * depth + b"]" * depth + b"}"


def post(url: str, path: str, body: bytes, token: str) -> tuple[int, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=700)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw[:200].decode(errors="replace")
    finally:
        conn.close()


def digest(run_dir: Path) -> str:
    manifest = handles.read_manifest(run_dir)
    if manifest is None:
        return ""
    h = hashlib.sha256()
    for name, tensor in sorted(sharing.map_tensors(manifest).items()):
        h.update(name.encode())
        h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def is_json_error(reply: Any) -> bool:
    return (
        isinstance(reply, dict)
        and isinstance(reply.get("error"), dict)
        and bool(reply["error"].get("message"))
    )


def soak(
    session: LocalSession, model_name: str, seconds: float, kill_every_s: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    examples: dict[str, str] = {}
    slowest: dict[str, float] = {}
    log = io.StringIO()
    started = last_kill = time.monotonic()

    def fail(what: str, detail: str) -> None:
        failures[what] += 1
        examples.setdefault(what, detail[:300])

    while time.monotonic() - started < seconds:
        session.supervise(out=log)
        if kill_every_s and time.monotonic() - last_kill >= kill_every_s:
            worker = session.processes.get("worker")
            if worker is not None and worker.poll() is None:
                worker.send_signal(signal.SIGKILL)
                counts["kill"] += 1
            last_kill = time.monotonic()
        action = rng.choices(["malformed", "train", "complete", "status"], weights=[70, 10, 15, 5])[0]
        t0 = time.monotonic()
        try:
            if action == "malformed":
                path, body = rng.choice(ROUTES), malformed(rng)
                before = digest(session.run_dir)
                code, reply = post(session.url, path, body, session.token)
                if not (400 <= code < 500 and is_json_error(reply)):
                    fail(f"malformed {path} -> {code}", f"{body[:60]!r}: {reply}")
                elif digest(session.run_dir) != before:
                    fail("weights changed by a refused request", f"{path} {body[:60]!r}")
            elif action == "train":
                code, reply = post(session.url, "/train", json.dumps(GOOD).encode(), session.token)
                if code not in (200, 503) or (code == 503 and not is_json_error(reply)):
                    fail(f"train -> {code}", str(reply))
            elif action == "complete":
                code, reply = http_json(
                    "POST",
                    f"{session.url}/v1/completions",
                    {"model": model_name, "prompt": "the cat sees", "max_tokens": 4},
                    timeout_s=120,
                )
                if code != 200:
                    fail(f"completion -> {code}", str(reply))
            else:
                code, reply = http_json("GET", f"{session.url}/train/status", timeout_s=30)
                if code not in (200, 503):
                    fail(f"status -> {code}", str(reply))
            counts[f"{action} {code}"] += 1
        except OSError as err:
            fail(f"{action}: connection error", repr(err))
        slowest[action] = max(slowest.get(action, 0.0), round(time.monotonic() - t0, 3))
    return {
        "seconds": seconds,
        "seed": seed,
        "counts": dict(sorted(counts.items())),
        "failures": dict(failures),
        "failure_examples": examples,
        "slowest_s": slowest,
        "supervisor": log.getvalue().splitlines(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--kill-every-s", type=float, default=120.0, help="0: never kill the worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hogwild-soak-") as state:
        session = LocalSession(
            model=args.model,
            state_dir=Path(state),
            port=args.port,
            metrics_port=args.port + 1,
            vllm_args=["--enforce-eager", "--max-model-len", "512"],
            config={"lr": 1e-4, "checkpoint_interval_s": 0},
            log_to_files=True,
        )
        with session:
            session.wait_ready()
            summary = soak(session, Path(args.model).name, args.seconds, args.kill_every_s, args.seed)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

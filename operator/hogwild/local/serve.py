"""`hogwild serve --model DIR`: vLLM with the plugin plus the training worker, locally, until Ctrl-C."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from hogwild import defaults, mps
from hogwild.local.session import LocalModeError, LocalSession
from hogwild.mps_daemon import MpsError
from hogwild.vllm_plugin.launch import split_passthrough


def default_state_dir(model: str) -> Path:
    cache = Path(os.environ.get("HOGWILD_CACHE", Path.home() / ".cache" / "hogwild"))
    return cache / "local" / Path(model.rstrip("/")).name


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="hogwild serve", description=__doc__, epilog="Arguments after -- go to vLLM unchanged."
    )
    parser.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    parser.add_argument(
        "--state-dir", type=Path, help="token, checkpoints and run dir (default: under the cache)"
    )
    parser.add_argument(
        "--port", type=int, default=defaults.VLLM_HTTP_PORT, help="replica i listens on PORT+i"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help=(
            "vLLM engines that serve and learn together as one replica group (docs/replicas.md): a /train "
            "sent to any of them trains all of them, and they hold the same weights after every step"
        ),
    )
    parser.add_argument("--metrics-port", type=int, default=defaults.WORKER_METRICS_PORT)
    parser.add_argument(
        "--metrics-host", default="127.0.0.1", help="where the worker's /metrics listens (default: loopback)"
    )
    parser.add_argument(
        "--config", default="{}", help="initial hyperparameters as JSON, e.g. '{\"lr\": 1e-4}'"
    )
    parser.add_argument(
        "--mps-trainer-share",
        type=_share,
        metavar="PCT",
        help=(
            "opt-in serving protection (default: off): run vLLM and the worker as clients of a private NVIDIA "
            "MPS daemon, started before vLLM and stopped on exit, with the worker capped to PCT %% of the "
            "GPU's SMs (1-100; 70 was measured on an H100, see README). Needs an NVIDIA GPU and "
            "nvidia-cuda-mps-control; the GPU's own settings are not changed"
        ),
    )
    ours, extra = split_passthrough(argv)
    return parser.parse_args(ours), extra


def _share(text: str) -> int:
    try:
        return mps.parse_share(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def stop_on_signals() -> threading.Event:
    """Ctrl-C and SIGTERM set the returned flag: the serve loop ends, and the children stop in order."""
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    return stopping


def main(argv: Sequence[str]) -> int:
    args, extra = parse_args(argv)
    if args.replicas != 1:
        return serve_replicas(args, extra)
    session = LocalSession(
        model=args.model,
        state_dir=args.state_dir or default_state_dir(args.model),
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        vllm_args=extra,
        config=json.loads(args.config),
        mps_trainer_share=args.mps_trainer_share,
    )
    stopping = stop_on_signals()
    progress = None
    try:
        try:
            session.start()
        except MpsError as err:
            print(f"hogwild serve: cannot use MPS: {err}", file=sys.stderr)
            return 2
        progress = session.watch_progress()
        if args.mps_trainer_share is not None:
            print(f"hogwild: MPS on, worker at {args.mps_trainer_share} % of the SMs", flush=True)
        session.wait_ready()
        print(f"hogwild: serving {args.model} at {session.url}", flush=True)
        print(
            f"hogwild: token in {session.token_file}; worker metrics at http://{args.metrics_host}:{args.metrics_port}/metrics",
            flush=True,
        )
        print(
            f'  curl -H "Authorization: Bearer $(cat {session.token_file})" {session.url}/train \\\n'
            '    -d \'{"samples": [{"text": "hello world"}], "steps": 4}\'',
            flush=True,
        )
        while not stopping.is_set():
            session.supervise()  # restarts a crashed worker (backoff, limit); vLLM keeps serving
            time.sleep(0.5)
    except LocalModeError as err:
        print(f"hogwild: {err}", file=sys.stderr)
        return 1
    finally:
        if progress is not None:
            progress.set()
            print("hogwild: stopping (worker checkpoints first, then vLLM)…", flush=True)
        session.stop()
    return 0


def serve_replicas(args: argparse.Namespace, extra: list[str]) -> int:
    """`hogwild serve --replicas N`: N replicas of one session on this machine (hogwild.local.replicas)."""
    from hogwild.local.replicas import LocalReplicas

    if args.replicas < 1:
        print(f"hogwild serve: --replicas must be at least 1, got {args.replicas}", file=sys.stderr)
        return 2
    if args.mps_trainer_share is not None:
        print("hogwild serve: --mps-trainer-share runs one replica; drop one of the two", file=sys.stderr)
        return 2
    group = LocalReplicas(
        model=args.model,
        state_dir=args.state_dir or default_state_dir(args.model),
        replicas=args.replicas,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        vllm_args=tuple(extra),
        config=json.loads(args.config),
    )
    stopping = stop_on_signals()
    try:
        group.start()
        group.wait_ready()
        for replica in sorted(group.sessions):
            print(f"hogwild: replica {replica} serving {args.model} at {group.url(replica)}", flush=True)
        print(
            f"hogwild: {args.replicas} replicas in one group; token in {group.token_file}; a /train to any "
            "replica trains all of them",
            flush=True,
        )
        while not stopping.is_set():
            group.supervise()
            time.sleep(0.5)
    except LocalModeError as err:
        print(f"hogwild: {err}", file=sys.stderr)
        return 1
    finally:
        print("hogwild: stopping the replicas (workers checkpoint first, then vLLM)…", flush=True)
        group.stop()
    return 0

"""`hogwild worker`: the training worker process (the trainer sidecar in a pod, a subprocess locally).

    hogwild worker [--run-dir /run/hogwild] [--checkpoint-dir /var/lib/hogwild] [--metrics-port 9400]
                   [--control-port 5555] [--curve-dir DIR] [--config '{"lr": 1e-5}'] [--device auto]

It answers status and configure at once, maps vLLM's weights when the manifest appears (and again whenever
the exporter changes), restores the newest optimizer state, and trains on request. SIGTERM (or SIGINT): stop
between steps, write a final checkpoint if anything was trained since the last one, exit 0. Logs are one JSON
object per line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hogwild import auth, defaults
from hogwild.config import ConfigError, config_from_dict

log = logging.getLogger("hogwild.worker")
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, the `extra` fields, and the session name."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        session = os.environ.get("HOGWILD_SESSION")
        if session:
            line["session"] = session
        line.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("hogwild")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hogwild worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    env = os.environ
    parser.add_argument("--run-dir", default=env.get(defaults.ENV_RUN_DIR, defaults.RUN_DIR))
    parser.add_argument(
        "--checkpoint-dir", default=env.get(defaults.ENV_CHECKPOINT_DIR, defaults.CHECKPOINT_DIR)
    )
    parser.add_argument(
        "--metrics-port", type=int, default=defaults.WORKER_METRICS_PORT, help="0: any free port"
    )
    parser.add_argument("--metrics-host", default="0.0.0.0")
    parser.add_argument(
        "--control-port", type=int, default=defaults.WORKER_CONTROL_PORT, help="tcp, CURVE only; 0: any"
    )
    parser.add_argument("--control-host", default="*")
    parser.add_argument(
        "--curve-dir", default=env.get(auth.ENV_CURVE_DIR), help="CURVE keys; without them no tcp"
    )
    parser.add_argument("--config", default="{}", help="initial hyperparameters, JSON (hogwild.config names)")
    parser.add_argument("--device", default="auto", help="auto (the exporter's), cpu or cuda")
    parser.add_argument(
        "--vllm-metrics-url",
        default=env.get("HOGWILD_VLLM_METRICS_URL"),
        help="vLLM's /metrics, read for serving protection when vLLM writes no load hint in the run dir",
    )
    parser.add_argument("--log-level", default=env.get("HOGWILD_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = config_from_dict(json.loads(args.config))
        curve = auth.load_curve_keys("server", args.curve_dir) if args.curve_dir else None
    except (ValueError, ConfigError, auth.CredentialError) as err:
        log.error("bad arguments: %s", err, extra={"event": "bad_arguments"})
        return 2
    # Imported late: torch and transformers take seconds, and the errors above should not wait for them.
    from hogwild.worker.metrics import WorkerMetrics
    from hogwild.worker.server import WorkerServer
    from hogwild.worker.service import WorkerService, WorkerSettings

    run_dir, checkpoint_dir = Path(args.run_dir), Path(args.checkpoint_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    metrics = WorkerMetrics()
    metrics_port, _ = metrics.serve(args.metrics_port, args.metrics_host)
    device = None if args.device == "auto" else args.device
    from hogwild.worker.group.settings import settings_from_env

    try:
        group = settings_from_env()
    except ValueError as err:
        log.error("bad replica settings: %s", err, extra={"event": "bad_arguments"})
        return 2
    settings = WorkerSettings(run_dir, checkpoint_dir, device, args.vllm_metrics_url, group)
    service = WorkerService(settings, config, metrics)
    ipc_path = run_dir / defaults.WORKER_SOCKET_NAME
    ipc_path.unlink(missing_ok=True)  # a socket file left by a killed worker
    server = WorkerServer(
        service,
        ipc_path=str(ipc_path),
        curve=curve,
        control_port=args.control_port,
        control_host=args.control_host,
    )
    service.endpoints = {
        "metrics_port": metrics_port,
        "ipc_endpoint": server.ipc_endpoint,
        "control_endpoint": server.tcp_endpoint,
    }
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop())
    log.info(
        "worker started",
        extra={
            "event": "started",
            "pid": os.getpid(),
            "run_dir": str(run_dir),
            "checkpoint_dir": str(checkpoint_dir),
            **service.endpoints,
        },
    )
    started = time.monotonic()
    server.serve_forever()
    log.info("stopping", extra={"event": "stopping", "uptime_s": round(time.monotonic() - started, 1)})
    service.shutdown()
    server.drain()
    log.info("worker stopped", extra={"event": "stopped"})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Starting real servers for the slow tier: one per test module (2 cores), always torn down."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from hogwild.local.session import http_json, stop_group
from hogwild.testing.children import child_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def complete(url: str, model: str, prompt: str, max_tokens: int = 8) -> str:
    status, body = http_json(
        "POST",
        f"{url}/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0},
        timeout_s=120,
    )
    assert status == 200, body
    return str(body["choices"][0]["text"])


def start_vllm(model: Path, state: Path, port: int, extra: list[str], token: str) -> subprocess.Popen[bytes]:
    env = child_env({"HOGWILD_TOKEN": token, "PYTHONUNBUFFERED": "1"})
    log = open(state / "vllm.log", "wb")  # noqa: SIM115 - the process owns it
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hogwild.cli",
            "vllm",
            "--model",
            str(model),
            "--run-dir",
            str(state / "run"),
            "--checkpoint-dir",
            str(state / "checkpoints"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--",
            *extra,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            status, _ = http_json("GET", f"{url}/health", timeout_s=5)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vLLM not healthy after {timeout_s} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    stop_group(proc)

"""The stand-in exporter: a process that holds a model's weights in vLLM's layout and shares them.

    python -m hogwild.testing.exporter --model DIR --run-dir D [--device cpu|cuda] [--serve-loop]

It loads a Hugging Face model, lays its weights out exactly as vLLM does (hogwild.testing.vllm_layout),
exports them the way the vLLM plugin does (`hogwild.sharing.export_shm` on CPU, `export_cuda_ipc` on GPU),
writes the manifest, and keeps running so that a worker can map and train the weights. Tests and the GPU
benchmark use it instead of vLLM (minutes to start on CPU, and not installable on the GPU machine).

It answers one JSON command per line on stdin, one JSON reply per line on stdout (prefixed, so stray library
output cannot be mistaken for a reply): `checksum` (sum and sha256 of a tensor: did the worker's write land
here?), `read` (one element), `logits` (a forward over the fused weights: does serving see the update?),
`stats` (of the serve loop), `exit`. With `--serve-loop` a thread keeps running batched forwards over the
fused weights, the way a busy server would. Importable without vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from hogwild.testing.children import child_env

REPLY_PREFIX = "HOGWILD-EXPORTER "


def load_vllm_params(model_dir: str, device: str) -> tuple[dict[str, torch.nn.Parameter], dict[str, Any]]:
    """The model's weights as vLLM would hold them, plus the HF config as a dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hogwild.testing.vllm_layout import vllm_layout

    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    fused = vllm_layout(model.state_dict(), tied=tied)
    del model
    params = {name: torch.nn.Parameter(t.to(device), requires_grad=False) for name, t in fused.items()}
    return params, config.to_dict()


def export(
    params: Mapping[str, torch.nn.Parameter], model_dir: str, run_dir: str, hf_config: Mapping[str, Any]
) -> Any:
    from hogwild import handles, sharing

    named = list(params.items())
    if named and named[0][1].device.type == "cuda":
        manifest = sharing.export_cuda_ipc(named, run_dir=run_dir, model_path=model_dir, hf_config=hf_config)
    else:
        sharing.sweep_stale_shm()
        manifest = sharing.export_shm(named, model_path=model_dir, hf_config=hf_config)
    handles.write_manifest(run_dir, manifest)
    return manifest


def tensor_digest(tensor: torch.Tensor) -> dict[str, Any]:
    data = tensor.detach().contiguous().cpu()
    raw = data.view(torch.uint8).reshape(-1).numpy().tobytes()
    return {"sum": float(data.double().sum()), "sha256": hashlib.sha256(raw).hexdigest()}


class ServeLoop:
    """Batched forwards over the fused weights on a thread: a stand-in for vLLM's serving load."""

    def __init__(
        self, params: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any], batch: int, seq: int
    ) -> None:
        self.params, self.hf_config = params, hf_config
        device = next(iter(params.values())).device
        self.input_ids = torch.randint(0, int(hf_config["vocab_size"]), (batch, seq), device=device)
        self.latencies_s: list[float] = []
        self.iterations = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="serve-loop", daemon=True)

    def _run(self) -> None:
        from hogwild.testing.vllm_layout import fused_forward

        while not self.stop.is_set():
            started = time.perf_counter()
            fused_forward(self.params, self.hf_config, self.input_ids)
            if self.input_ids.is_cuda:
                torch.cuda.synchronize()
            self.latencies_s = [*self.latencies_s[-999:], time.perf_counter() - started]
            self.iterations += 1

    def stats(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_s)
        pick = (
            (lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else (lambda q: None)
        )
        return {
            "iterations": self.iterations,
            "tokens_per_iteration": self.input_ids.numel(),
            "p50_s": pick(0.5),
            "p99_s": pick(0.99),
        }


def handle_command(
    command: Mapping[str, Any],
    params: Mapping[str, torch.Tensor],
    hf_config: Mapping[str, Any],
    loop: ServeLoop | None,
) -> dict[str, Any]:
    from hogwild.testing.vllm_layout import fused_forward

    cmd = command.get("cmd")
    if cmd == "checksum":
        return tensor_digest(params[command["name"]])
    if cmd == "checksums":  # every served tensor at once: equal across replicas means the same weights
        combined = hashlib.sha256()
        for name in sorted(params):
            combined.update(tensor_digest(params[name])["sha256"].encode())
        return {"sha256": combined.hexdigest()}
    if cmd == "read":
        return {"value": float(params[command["name"]].detach().reshape(-1)[int(command["index"])])}
    if cmd == "logits":
        device = next(iter(params.values())).device
        ids = torch.tensor([command["input_ids"]], device=device)
        return {"logits": fused_forward(params, hf_config, ids)[0, -1].float().cpu().tolist()}
    if cmd == "stats":
        return loop.stats() if loop else {}
    raise KeyError(f"unknown command {cmd!r}")


def command_loop(
    stdin: IO[str],
    stdout: IO[str],
    params: Mapping[str, torch.Tensor],
    hf_config: Mapping[str, Any],
    loop: ServeLoop | None,
) -> None:
    for line in stdin:
        try:
            command = json.loads(line)
            if command.get("cmd") == "exit":
                return
            reply = {"ok": True, **handle_command(command, params, hf_config, loop)}
        except Exception as err:  # a bad command must not end the process that holds the weights
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        stdout.write(REPLY_PREFIX + json.dumps(reply) + "\n")
        stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--serve-loop", action="store_true")
    parser.add_argument("--serve-batch", type=int, default=8)
    parser.add_argument("--serve-seq", type=int, default=128)
    parser.add_argument("--no-commands", action="store_true", help="ignore stdin; run until SIGTERM")
    args = parser.parse_args(argv)
    # SIGTERM must run atexit (it unlinks the shared-memory file), which the default handler skips.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    params, hf_config = load_vllm_params(args.model, args.device)
    manifest = export(params, args.model, args.run_dir, hf_config)
    loop = ServeLoop(params, hf_config, args.serve_batch, args.serve_seq) if args.serve_loop else None
    if loop:
        loop.thread.start()
    ready = {"ready": True, "pid": os.getpid(), "nonce": manifest.exporter.nonce, "backend": manifest.backend}
    print(REPLY_PREFIX + json.dumps(ready), flush=True)
    if args.no_commands:
        while True:
            signal.pause()
    command_loop(sys.stdin, sys.stdout, params, hf_config, loop)
    return 0


class ExporterProcess:
    """Start the stand-in exporter as a child process and talk to it (tests, benchmarks)."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        run_dir: str | os.PathLike[str],
        *,
        device: str = "cpu",
        extra_args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 120.0,
    ) -> None:
        cmd = [
            sys.executable,
            "-m",
            "hogwild.testing.exporter",
            "--model",
            str(model_dir),
            "--run-dir",
            str(run_dir),
            "--device",
            device,
            *extra_args,
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(env)
        )
        self.run_dir = Path(run_dir)
        try:
            self.ready = self._read_reply(ready_timeout_s)
        except BaseException:
            self.close()
            raise
        self.nonce: str = self.ready["nonce"]
        self.pid: int = self.ready["pid"]

    def _read_reply(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        timer = threading.Timer(timeout_s, self.proc.kill)  # readline cannot time out by itself
        timer.start()
        try:
            for line in self.proc.stdout:
                if line.startswith(REPLY_PREFIX):
                    return dict(json.loads(line[len(REPLY_PREFIX) :]))
        finally:
            timer.cancel()
        raise RuntimeError(f"the exporter exited (code {self.proc.wait()}) without answering")

    def command(self, cmd: str, timeout_s: float = 60.0, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()
        reply = self._read_reply(timeout_s)
        if not reply.get("ok"):
            raise RuntimeError(f"exporter command {cmd} failed: {reply.get('error')}")
        return reply

    def checksum(self, name: str) -> dict[str, Any]:
        return self.command("checksum", name=name)

    def close(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()


if __name__ == "__main__":
    sys.exit(main())

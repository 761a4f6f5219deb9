"""Shared pieces of the GPU benchmark: model shapes, random weights in vLLM's layout, child processes, timing,
and the results file.

The benchmark's processes talk in one JSON object per line (stdin -> command, stdout -> reply prefixed with
`REPLY_PREFIX`, so stray library output is never read as a reply): no pyzmq, which the GPU machine lacks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "bench" / "results" / "gpu.json"
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
REPLY_PREFIX = "HOGWILD-BENCH "

# Qwen2 shapes (Qwen2.5-1.5B and Qwen2.5-7B configs, written out: no hub). "tiny" is for CPU smoke runs.
_QWEN2_COMMON = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "use_sliding_window": False,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
    "dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
SHAPES: dict[str, dict[str, Any]] = {
    "1.5b": {
        **_QWEN2_COMMON,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "7b": {
        **_QWEN2_COMMON,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "tiny": {
        **_QWEN2_COMMON,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
}
MODEL_NAMES = {
    "1.5b": "Qwen2-1.5B shape (random bf16)",
    "7b": "Qwen2-7B shape (random bf16)",
    "tiny": "tiny Qwen2",
}


def hf_config(shape: str) -> Any:
    from transformers import AutoConfig

    values = dict(SHAPES[shape])
    return AutoConfig.for_model(values.pop("model_type"), **values)


@torch.no_grad()
def random_vllm_params(config: Any, device: str, seed: int = 0) -> dict[str, torch.nn.Parameter]:
    """Random bf16 weights in vLLM's fused layout, built one layer at a time (peak: weights + one layer).

    Names and shapes come from the HF module built on the meta device; `vllm_layout` fuses them exactly as
    the stand-in exporter does. Norm weights are ones, everything else N(0, 0.02).
    """
    from transformers import AutoModelForCausalLM

    from hogwild.testing.vllm_layout import vllm_layout

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        groups.setdefault(key, []).append(name)
    out: dict[str, torch.nn.Parameter] = {}
    for names in groups.values():
        hf = {}
        for name in names:
            if tied and name == "lm_head.weight":
                continue
            if "norm" in name:
                hf[name] = torch.ones(shapes[name], dtype=torch.bfloat16, device=device)
            else:
                t = torch.randn(shapes[name], dtype=torch.float32, device=device, generator=generator)
                hf[name] = t.mul_(0.02).to(torch.bfloat16)
        for name, tensor in vllm_layout(hf, tied=tied).items():
            out[name] = torch.nn.Parameter(tensor, requires_grad=False)
        del hf
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # unique: a tied head counts once


# ---- child processes ---------------------------------------------------------------------------------------
def reply(stream: IO[str], payload: Mapping[str, Any]) -> None:
    stream.write(REPLY_PREFIX + json.dumps(payload) + "\n")
    stream.flush()


def command_lines(stdin: IO[str]) -> Any:
    for line in stdin:
        line = line.strip()
        if line:
            yield json.loads(line)


class Child:
    """A benchmark process speaking JSON lines; its stderr goes to `log_path`."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 600.0,
    ) -> None:
        self.log = open(log_path, "a")  # noqa: SIM115 - lives as long as the child
        self.log.write(f"\n==== {' '.join(argv)}\n")
        self.log.flush()
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "operator"), str(ROOT / "bench"), full_env.get("PYTHONPATH", "")]
        )
        full_env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=full_env,
        )
        self.ready = self.read(ready_timeout_s)

    def read(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        timer = threading.Timer(timeout_s, self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stdout:
                if line.startswith(REPLY_PREFIX):
                    answer = dict(json.loads(line[len(REPLY_PREFIX) :]))
                    if answer.get("error"):
                        raise RuntimeError(f"child error: {answer['error']}")
                    return answer
                self.log.write(line)
        finally:
            timer.cancel()
        raise RuntimeError(f"child exited with code {self.proc.wait()} (log: {self.log.name})")

    def call(self, cmd: str, timeout_s: float = 300.0, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, OSError):
                self.call("exit", timeout_s=30)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def serve_commands(handlers: Mapping[str, Callable[..., dict[str, Any]]], ready: Mapping[str, Any]) -> None:
    """A child's main loop: answer each command with its handler's reply (errors are replies too)."""
    out = sys.stdout
    reply(out, {"ready": True, **ready})
    for command in command_lines(sys.stdin):
        name = command.pop("cmd", None)
        if name == "exit":
            reply(out, {"bye": True})
            return
        try:
            reply(out, handlers[name](**command))
        except Exception as err:  # the driver decides; the child keeps its weights alive
            import traceback

            traceback.print_exc(file=sys.stderr)
            reply(out, {"error": f"{name}: {type(err).__name__}: {err}"})


# ---- timing ------------------------------------------------------------------------------------------------
def cuda_times_ms(
    fn: Callable[[], Any], *, reps: int, warmup: int = 2, host_ms: list[float] | None = None
) -> list[float]:
    """Each call of `fn` timed with CUDA events (after `warmup` untimed calls); a host clock on CPU.

    `host_ms`, when given, receives each call's host time (until `fn` returns, no sync): a call whose host
    time is close to its CUDA time is launch-bound, not GPU-bound.
    """
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if not cuda:  # no separate device queue: the host time is the time
            started = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - started))
            if host_ms is not None:
                host_ms.append(times[-1])
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launched = time.perf_counter()
        fn()
        if host_ms is not None:
            host_ms.append(1e3 * (time.perf_counter() - launched))
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def matmul_peak_tflops(size: int = 8192, reps: int = 30) -> float:
    """Measured bf16 dense matmul rate (median of `reps`, random inputs rotated over 3 sets)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sets = [
        (
            torch.randn(size, size, device=device, dtype=torch.bfloat16),
            torch.randn(size, size, device=device, dtype=torch.bfloat16),
        )
        for _ in range(3)
    ]
    out = torch.empty(size, size, device=device, dtype=torch.bfloat16)
    counter = iter(range(10**9))

    def run() -> None:
        a, b = sets[next(counter) % 3]
        torch.matmul(a, b, out=out)

    ms = median(cuda_times_ms(run, reps=reps, warmup=10))
    return 2 * size**3 / (ms * 1e-3) / 1e12


# ---- environment ---------------------------------------------------------------------------------------------
def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = torch.version.cuda
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=False,
            )  # fmt: skip
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


# ---- results -------------------------------------------------------------------------------------------------
def load_results(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def merge_results(path_in: Path, path_out: Path, shape: str, figures: Mapping[str, Any]) -> dict[str, Any]:
    """Merge one part's figures into the shape's object; other shapes and keys stay as they were."""
    results = load_results(path_in)
    entry = dict(results.get(shape) or {})
    entry.update(figures)
    results[shape] = entry
    path_out.parent.mkdir(parents=True, exist_ok=True)
    path_out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return results


def sync() -> None:
    """Wait for the GPU's queued work (nothing on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def now_s() -> float:
    """A clock every process of the machine shares (CLOCK_MONOTONIC): windows are compared across them."""
    return time.monotonic()


def log(message: str) -> None:
    """A timestamped line on stdout: the device call's output tail is what comes back."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

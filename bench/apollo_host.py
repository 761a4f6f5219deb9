"""Host time of one `Apollo.step` at the Qwen2-1.5B *structure*, on CPU: a proxy for the step's host work only.

Why: on an H100 the APOLLO step at 1.5B takes 13-18 ms while its kernels take ~9.5 ms (bench/NOTES-gpu.md):
the rest is the host issuing ~270 launches and walking 338 parameters in Python. That host work depends on
how many parameters, shapes and buckets there are, not on their sizes, so this builds the 1.5B model's
parameter set as the worker maps it (Hugging Face layout: 28 layers x q/k/v/o/gate/up/down weights, q/k/v
biases, two norms; the tied embedding; the final norm) with every dimension shrunk (hidden 16, so kernels
cost ~nothing on a CPU), keeps the same shape classes, the same buckets and the same split between buffered
weights and per-parameter ones (`prepare_grads` with a limit between q/k/v/o and gate/up/down/embedding, as
the 4M-element limit splits them at 1.5B), and times `step()`.

Three figures, each the median of many steps:
- `step_ms`: the whole step on CPU. The final update takes the eager per-parameter path here (the fused
  Triton kernel is CUDA-only): ~10 ops per parameter that the GPU path does not run.
- `step_fused_host_ms`: the update through the fused path's host side (pointer table and kernel arguments),
  with the launch itself a no-op: what the GPU path's host does, minus pinning and the copy to the device.
- `step_without_update_ms`: the update left out entirely.
- `step_cuda_host_ms`: the whole step down the CUDA branches (`cuda_host_only`): every Triton kernel's
  host side (fusability checks, tables, tiles, output allocations, the limiter's torch ops) with the
  launches no-ops. The closest CPU figure to the GPU step's host time, less Triton's own launch cost
  (~35 launches a step, ~30-60 us each on the H100's host: not measured here).

Not a GPU figure: a CPU op costs its dispatch plus (tiny) arithmetic, a CUDA op its dispatch plus a launch.
Measure the real step with `python bench/gpu_bench.py --part optim --shape 1.5b`.

    PYTHONPATH=operator python bench/apollo_host.py --label after
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import json
import platform
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from hogwild.optim import Apollo, factory, kernels, moments_kernel, rounding
from hogwild.optim import apollo as apollo_module

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "apollo_host.json"
# Qwen2-1.5B: hidden 1536, kv 256 (2 heads of 128), intermediate 8960, vocab 151936, 28 layers, rank 64.
# Shrunk so that every 2-D weight is still projected (each side > rank) and the shapes stay distinct.
HIDDEN, KV, INTERMEDIATE, VOCAB, LAYERS, RANK = 16, 6, 40, 64, 28, 4
# q/k/v/o (<= HIDDEN^2 elements) get buffers, gate/up/down and the embedding do not: as 4M elements splits them.
MAX_ELEMENTS = HIDDEN * HIDDEN


def named_parameters() -> list[tuple[str, torch.nn.Parameter]]:
    generator = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02).to(torch.bfloat16))

    named = [("model.embed_tokens.weight", weight(VOCAB, HIDDEN))]
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        named += [
            (prefix + "self_attn.q_proj.weight", weight(HIDDEN, HIDDEN)),
            (prefix + "self_attn.q_proj.bias", weight(HIDDEN)),
            (prefix + "self_attn.k_proj.weight", weight(KV, HIDDEN)),
            (prefix + "self_attn.k_proj.bias", weight(KV)),
            (prefix + "self_attn.v_proj.weight", weight(KV, HIDDEN)),
            (prefix + "self_attn.v_proj.bias", weight(KV)),
            (prefix + "self_attn.o_proj.weight", weight(HIDDEN, HIDDEN)),
            (prefix + "mlp.gate_proj.weight", weight(INTERMEDIATE, HIDDEN)),
            (prefix + "mlp.up_proj.weight", weight(INTERMEDIATE, HIDDEN)),
            (prefix + "mlp.down_proj.weight", weight(HIDDEN, INTERMEDIATE)),
            (prefix + "input_layernorm.weight", weight(HIDDEN)),
            (prefix + "post_attention_layernorm.weight", weight(HIDDEN)),
        ]
    named.append(("model.norm.weight", weight(HIDDEN)))
    return named


def make_optimizer() -> Apollo:
    """As bench/gpu_bench.py's `part_optim` does (prepared): the factory's groups, then gradients filled in."""
    named = named_parameters()
    optimizer = Apollo(factory.param_groups(named), lr=1e-6, rank=RANK)
    optimizer.prepare_grads(max_elements=MAX_ELEMENTS)
    generator = torch.Generator().manual_seed(1)
    for _, param in named:
        if param.grad is None:
            param.grad = torch.empty_like(param)
        param.grad.copy_(torch.randn(param.shape, generator=generator).mul_(1e-3))
    return optimizer


class _NoLaunch:
    """Stands in for the Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def fused_host_only() -> Iterator[None]:
    """Take the fused update's path on CPU up to the launch, which does nothing (nor does pinning)."""
    saved = (rounding._fusable, rounding._update_kernel, torch.Tensor.pin_memory)
    original = rounding._fusable

    def fusable(params: Any, directions: Any, coefs: Any, how: str, *cache: Any) -> bool:
        # The real check, with the parameters' device taken for CUDA: the bench's are all bf16 on CPU.
        return original(params, directions, coefs, how, *cache) or (how == "stochastic" and _as_cuda(params))

    rounding._fusable = fusable  # type: ignore[assignment]
    rounding._update_kernel = _NoLaunch()
    torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        rounding._fusable, rounding._update_kernel, torch.Tensor.pin_memory = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def cuda_host_only() -> Iterator[None]:
    """Take every CUDA-only branch of the step on CPU tensors, with each Triton launch a no-op.

    A harness, not the optimizer: `torch.Tensor.is_cuda` reads True (a Python property in front of torch's
    C one: ~0.1 us more per read, a handful of reads a bucket), the projection, norms, moments, limiter and
    update kernels do nothing (their outputs are whatever `torch.empty` held, so the numbers are meaningless
    and denormals are flushed to keep garbage from slowing the CPU ops), and device tables are plain CPU
    tensors (a cache hit costs the same either way; a miss on CUDA also pins and copies). What is left is
    the Python and torch-dispatch work the CUDA step does around its launches.
    """
    # (module, kernel) pairs; a kernel an older checkout lacks is skipped, so that it can be measured too
    launches = [
        (module, name)
        for module, name in (
            (kernels, "_projection_kernel"),
            (kernels, "_norms_kernel"),
            (moments_kernel, "_moments_kernel"),
            (moments_kernel, "_limiter_kernel"),
            (rounding, "_update_kernel"),
        )
        if hasattr(module, name)
    ]
    saved_kernels = [getattr(module, name) for module, name in launches]
    had_is_cuda = "is_cuda" in vars(torch.Tensor)
    saved_is_cuda = vars(torch.Tensor).get("is_cuda")
    saved_ranks = kernels.PROJECTION_RANKS
    kernels.PROJECTION_RANKS = range(1, 257)  # the proxy's rank 4 stands for 64: take the projection kernel
    torch.set_flush_denormal(True)
    torch.Tensor.is_cuda = property(lambda self: True)  # type: ignore[assignment,method-assign]
    for module, name in launches:
        setattr(module, name, _NoLaunch())
    try:
        yield
    finally:
        for (module, name), kernel in zip(launches, saved_kernels, strict=True):
            setattr(module, name, kernel)
        kernels.PROJECTION_RANKS = saved_ranks
        if had_is_cuda:
            torch.Tensor.is_cuda = saved_is_cuda  # type: ignore[assignment,method-assign]
        else:
            del torch.Tensor.is_cuda
        torch.set_flush_denormal(False)  # torch's default


def _as_cuda(params: Any) -> bool:
    first = params[0]
    return all(p.dtype == torch.bfloat16 and p.is_contiguous() and p.shape == first.shape for p in params)


@contextlib.contextmanager
def without_update() -> Iterator[None]:
    saved = apollo_module.apply_updates_
    apollo_module.apply_updates_ = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        yield
    finally:
        apollo_module.apply_updates_ = saved


def time_steps(optimizer: Apollo, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        optimizer.step()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        optimizer.step()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def profile_top(optimizer: Apollo, steps: int, rows: int = 20, sort: str = "cumulative") -> list[str]:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        optimizer.step()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats(sort)
    stats.print_stats(rows)
    lines = [line.rstrip() for line in out.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    return [f"{steps} steps", *lines[start:]]


def measure(reps: int, warmup: int) -> dict[str, Any]:
    torch.set_num_threads(1)  # tiny tensors: threads only add noise
    figures: dict[str, Any] = {}
    modes: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
        "step_ms": contextlib.nullcontext,
        "step_fused_host_ms": fused_host_only,
        "step_without_update_ms": without_update,
        "step_cuda_host_ms": cuda_host_only,
    }
    for name, mode in modes.items():
        optimizer = make_optimizer()
        with mode():
            times = time_steps(optimizer, reps, warmup)
            figures[name] = round(statistics.median(times), 3)
            figures[name.replace("_ms", "_spread_ms")] = [round(min(times), 3), round(max(times), 3)]
            if name == "step_fused_host_ms":
                figures["profile_fused_host"] = profile_top(optimizer, 20)
            if name == "step_cuda_host_ms":
                figures["profile_cuda_host"] = profile_top(optimizer, 20, sort="tottime", rows=25)
        print(f"{name}: median {figures[name]:.3f} ms over {reps}", flush=True)
    optimizer = make_optimizer()
    figures["parameters"] = sum(len(g["params"]) for g in optimizer.param_groups)
    return figures


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return f"{cpu}, 1 thread, torch {torch.__version__}, no GPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--label", required=True, help="the run's name in the results file, e.g. before/after"
    )
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    figures = measure(args.reps, args.warmup)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    run = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": "PYTHONPATH=operator python " + " ".join(["bench/apollo_host.py", *sys.argv[1:]]),
        "commit": commit,
        "note": "CPU proxy for the host time of Apollo.step (tiny dims, 1.5B structure); not a GPU figure",
        **figures,
    }
    for line in figures["profile_cuda_host"]:
        print(line)
    if args.no_write:
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.label] = run
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

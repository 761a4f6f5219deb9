"""GPU benchmark of in-place training beside serving, in parts that each fit one 10-minute GPU command.

    python bench/gpu_bench.py --part map,optim,train --shape 7b --out DIR
    python bench/gpu_bench.py --part interference --shape 1.5b --out DIR
    python bench/gpu_bench.py --part check --out DIR
    python bench/gpu_bench.py --table            # re-render bench/RESULTS.md's table from the results file

A serving process (`gpu_server.py`) holds random Qwen2-shaped bf16 weights in vLLM's layout and exports them
with the exporter's own code; this process (map, optim, train) or a training process (`gpu_trainer.py`,
interference) maps them with the worker's real code over CUDA IPC. Each part merges its figures into the
shape's object in `bench/results/gpu.json` (`--results-out` writes the merged file elsewhere, e.g. under
$OUT on the GPU machine) and prints them.

- map: time of `hogwild.worker.model.map_model` (handles -> tensors -> HF module over views) and the bytes
  this process allocates while doing it (goal: no copy, under 0.5 s at 7B).
- optim: one optimizer step over the model's parameters with random gradients: our APOLLO (rank 64) against
  torch AdamW foreach and fused; median step time (CUDA events) and state bytes.
- train: `Trainer.step` (forward, backward, clip, APOLLO step, in place) at 16,384 tokens per step; tokens/s
  and MFU = 6 * params * tokens/s over the measured bf16 matmul peak. Variants: eager; compiled decoder
  layers; one 16k micro-batch with activation checkpointing.
- interference: serving capacity alone and beside full-speed training; then a steady load at half the
  capacity, alone and beside training under each serving-protection candidate: the trade-off curve.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))

from gpu_common import (
    MODEL_NAMES,
    RESULTS_JSON,
    Child,
    cuda_times_ms,
    device_info,
    load_results,
    log,
    matmul_peak_tflops,
    median,
    merge_results,
    sync,
)
from gpu_interference import default_figures, keep_earlier, part_interference
from gpu_profile import profile_host, profile_step

TRAIN_TOKENS_PER_STEP = 16384


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.shape: str = args.shape
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        shm = Path("/dev/shm")
        self.run_dir = Path(tempfile.mkdtemp(prefix="hogwild-bench-", dir=shm if shm.is_dir() else None))
        self.server: Child | None = None
        self.mapped: Any = None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def start_server(self) -> Child:
        if self.server is None:
            argv = [
                str(Path(__file__).parent / "gpu_server.py"),
                "--shape",
                self.shape,
                "--run-dir",
                str(self.run_dir),
                *([] if self.args.cuda_graph else ["--no-cuda-graph"]),
            ]
            self.server = Child(argv, self.out / "server.log")
            log(f"server ready: {self.server.ready}")
        return self.server

    def close(self) -> None:
        self.mapped = None
        if self.server is not None:
            self.server.close()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- map -------------------------------------------------------------------------------------------------
def part_map(ctx: Context) -> dict[str, Any]:
    from transformers.models.qwen2 import modeling_qwen2  # noqa: F401 - imported before timing, as a worker does

    from hogwild.handles import read_manifest
    from hogwild.worker.model import map_model

    ctx.start_server()
    manifest = read_manifest(ctx.run_dir)
    assert manifest is not None
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the CUDA context exists before the clock starts
    sync()
    allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    free_before = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    started = time.perf_counter()
    mapped = map_model(manifest)
    sync()
    map_s = time.perf_counter() - started
    copy_bytes = (torch.cuda.memory_allocated() - allocated) if torch.cuda.is_available() else 0
    device_bytes = (free_before - torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else 0
    ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in mapped.exported.values()]
    params = list(mapped.module.named_parameters(remove_duplicate=False))
    aliased = sum(
        any(lo <= p.data_ptr() and p.data_ptr() + p.numel() * p.element_size() <= hi for lo, hi in ranges)
        for _, p in params
    )
    ctx.mapped = mapped
    figures = {
        "map_s": map_s,
        "worker_weight_copy_bytes": copy_bytes,
        "worker_device_bytes_during_map": device_bytes,
        "weight_bytes": mapped.weight_bytes,
        "params": sum(p.numel() for p in mapped.module.parameters()),
        "aliased_parameters": f"{aliased}/{len(params)}",
        "server_build_s": ctx.server.ready["build_s"] if ctx.server else None,
        "export_s": ctx.server.ready["export_s"] if ctx.server else None,
    }
    log(f"map: {figures}")
    return figures


def mapped_model(ctx: Context) -> Any:
    if ctx.mapped is None:
        part_map(ctx)
    return ctx.mapped


# ---- optim -----------------------------------------------------------------------------------------------
def part_optim(ctx: Context) -> dict[str, Any]:
    from hogwild.config import config_from_dict
    from hogwild.optim import factory

    mapped = mapped_model(ctx)
    named = [(n, p) for n, p in mapped.module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    def apollo(prepared: bool) -> torch.optim.Optimizer:
        # `prepared`: as the trainer lays gradients out (Apollo.prepare_grads: small same-shape weights share
        # one buffer, so their step is one bmm and one norm). Otherwise one fresh tensor per gradient, as
        # autograd leaves them: the per-parameter path. The AdamW rows step the last gradients.
        optimizer = factory.build_optimizer(
            factory.param_groups(named), config_from_dict({"optimizer": "apollo", "lr": 1e-6})
        )
        for p in params:
            p.grad = None
        prepare = getattr(optimizer, "prepare_grads", None)
        if prepared and callable(prepare):
            prepare()
        for p in params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.normal_(0, 1e-3)
        return optimizer

    makers: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "apollo_per_parameter": lambda: apollo(prepared=False),
        "apollo": lambda: apollo(prepared=True),
        "adamw_fused": lambda: torch.optim.AdamW(params, lr=1e-6, fused=True),
        "adamw_foreach": lambda: torch.optim.AdamW(params, lr=1e-6, foreach=True),
    }
    figures: dict[str, Any] = {}
    for name, make in makers.items():
        free_memory()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        try:
            optimizer = make()
            host: list[float] = []
            # host-bound at 1.5B: 10 reps moved 11-18 ms
            times = cuda_times_ms(optimizer.step, reps=40, warmup=10, host_ms=host)
        except torch.OutOfMemoryError as err:
            figures[f"{name}_step_s"] = None
            figures[f"{name}_error"] = f"out of memory: {err}"[:300]
            log(f"optim {name}: out of memory")
            continue
        if name == "apollo" and ctx.args.profile and torch.cuda.is_available():
            profile_step(optimizer.step, ctx.out / "apollo-profile.txt")
            profile_host(optimizer.step, ctx.out / "apollo-host-profile.txt")
        figures[f"{name}_step_s"] = median(times) / 1e3
        figures[f"{name}_step_s_spread"] = [min(times) / 1e3, max(times) / 1e3]
        figures[f"{name}_host_s"] = median(host) / 1e3  # launching it, without waiting for the GPU
        figures[f"{name}_state_bytes"] = factory.state_bytes(optimizer)
        if torch.cuda.is_available():
            figures[f"{name}_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        log(
            f"optim {name}: median {median(times):.2f} ms (host {median(host):.2f}), state {figures[f'{name}_state_bytes'] / 2**30:.3f} GiB"
        )
        del optimizer
    for p in params:
        p.grad = None
    free_memory()
    figures["adamw_state_bytes"] = figures.get("adamw_fused_state_bytes") or figures.get(
        "adamw_foreach_state_bytes"
    )
    if figures.get("adamw_state_bytes"):
        figures["apollo_state_fraction_of_adamw"] = (
            figures["apollo_state_bytes"] / figures["adamw_state_bytes"]
        )
    return figures


# ---- train -----------------------------------------------------------------------------------------------
def part_train(ctx: Context) -> dict[str, Any]:
    from gpu_trainer import build_trainer, token_batch
    from hogwild.worker.protection import decoder_layers

    mapped = mapped_model(ctx)
    module = mapped.module
    n_params = sum(p.numel() for p in module.parameters())
    peak = matmul_peak_tflops() if torch.cuda.is_available() else matmul_peak_tflops(size=512, reps=3)
    log(f"bf16 matmul peak: {peak:.0f} TFLOP/s")
    vocab = int(module.config.vocab_size)
    small = ctx.shape == "tiny"
    # (name, micro-batch, seq, accumulation, checkpointing, compiled). Eager runs first: compiling is one-way.
    variants = [
        ("eager", 2, 2048, 4, False, False),
        ("checkpointing-16k", 8, 2048, 1, True, False),
        ("compiled", 2, 2048, 4, False, True),
    ]
    figures: dict[str, Any] = {"matmul_peak_tflops": peak, "train_tokens_per_step": TRAIN_TOKENS_PER_STEP}
    best: tuple[float, str] = (0.0, "")
    for name, micro, seq, accumulation, checkpointing, compiled in variants:
        if small:
            micro, seq = 1, 64
        free_memory()
        if checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if compiled:
            for layer in decoder_layers(module):
                layer.compile()
        trainer = build_trainer(mapped, optimizer="apollo", lr=1e-6, clip_grad_norm=1.0)
        batch = token_batch(micro, seq, accumulation, vocab, mapped.device)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            started = time.perf_counter()
            for _ in range(2):
                trainer.step(batch)
            warmup_s = time.perf_counter() - started
            seconds = [trainer.step(batch).seconds for _ in range(4)]
        except torch.OutOfMemoryError as err:
            figures[f"train_{name}_error"] = f"out of memory: {err}"[:300]
            log(f"train {name}: out of memory")
            seconds = []
        finally:
            if checkpointing:
                module.gradient_checkpointing_disable()
        if seconds:
            step_s = median(seconds)
            tokens_per_s = batch.tokens / step_s
            mfu = 6 * n_params * tokens_per_s / (peak * 1e12)
            figures[f"train_{name}"] = {
                "tokens_per_step": batch.tokens, "micro_batch": [micro, seq], "accumulation": accumulation,
                "step_s": step_s, "tokens_per_s": tokens_per_s, "mfu": mfu, "warmup_s": warmup_s,
                "peak_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            }  # fmt: skip
            log(
                f"train {name}: {tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%}, step {step_s:.3f} s (warmup {warmup_s:.1f} s)"
            )
            best = max(best, (tokens_per_s, name))
        del trainer
    if best[1]:
        figures["train_tokens_per_s"] = best[0]
        figures["mfu"] = 6 * n_params * best[0] / (peak * 1e12)
        figures["train_variant"] = best[1]
        figures["train_tokens_per_s_eager"] = (figures.get("train_eager") or {}).get("tokens_per_s")
    return figures


def part_check(ctx: Context) -> dict[str, Any]:
    from gpu_check import run_checks

    results = run_checks(ctx.device, compile_layers=torch.cuda.is_available())
    for name, result in results.items():
        log(f"check {name}: {result}")
    return {"checks": results, "checks_ok": all(r.get("ok") for r in results.values())}


PARTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "check": part_check,
    "map": part_map,
    "optim": part_optim,
    "train": part_train,
    "interference": part_interference,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", default="", help=f"comma-separated: {', '.join(PARTS)}")
    parser.add_argument("--shape", default="1.5b", choices=sorted(MODEL_NAMES))
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/out")
    parser.add_argument("--results", type=Path, default=RESULTS_JSON, help="results file to merge into")
    parser.add_argument("--results-out", type=Path, default=None, help="where to write the merged file")
    parser.add_argument("--window-s", type=float, default=10.0, help="serving load window (interference)")
    parser.add_argument("--idle-s", type=float, default=6.0, help="training window with the server idle")
    parser.add_argument("--arrivals", default="periodic", choices=("periodic", "poisson"))
    parser.add_argument(
        "--candidates", default="", help="comma-separated protection candidates (default: all)"
    )
    parser.add_argument(
        "--no-cuda-graph", dest="cuda_graph", action="store_false", help="eager serving steps"
    )
    parser.add_argument("--profile", action="store_true", help="optim: profile the APOLLO step's kernels")
    parser.add_argument(
        "--mps", type=int, default=0, help="interference under a user-space MPS daemon, trainer at this SM %%"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="interference: measure each candidate this many times in turn"
    )
    parser.add_argument(
        "--timeline", action="store_true", help="interference: join slow requests with the trainer's points"
    )
    parser.add_argument("--table", action="store_true", help="re-render the table in bench/RESULTS.md")
    parser.add_argument(
        "--set-default", default="", help="re-derive the default-protection keys from the curves"
    )
    args = parser.parse_args(argv)
    if args.set_default:
        results = load_results(args.results)
        for entry in results.values():
            if isinstance(entry, dict) and entry.get("protection_curve"):
                entry.update(default_figures(entry["protection_curve"], args.set_default))
        (args.results_out or args.results).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.table:
        from gpu_table import write_table

        write_table(load_results(args.results_out or args.results))
    if args.table or args.set_default:
        return 0
    results_out = args.results_out or args.results
    ctx = Context(args)
    try:
        for part in [p for p in args.part.split(",") if p]:
            started = time.perf_counter()
            figures = PARTS[part](ctx)
            info = device_info()
            command = "python bench/gpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
            for mps_figures in (figures.get("interference_mps") or {}).values():
                mps_figures["command"] = command  # an MPS run keeps its own command, not the shape's run_ key
            figures.update({
                "device": info["device"], "date": info["date"], "torch": info["torch"], "model": MODEL_NAMES[ctx.shape],
                f"run_{part}{'_mps' if 'interference_mps' in figures else ''}": {**info, "command": command, "seconds": time.perf_counter() - started},
            })  # fmt: skip
            source = results_out if results_out.exists() else args.results
            key = "correctness" if part == "check" else ctx.shape
            earlier = (load_results(source).get(key) or {}).get("command", "")
            figures["command"] = "; ".join(dict.fromkeys([c for c in earlier.split("; ") if c] + [command]))
            merge_results(
                source, results_out, key, keep_earlier(load_results(source).get(key) or {}, figures)
            )
            log(f"part {part} done in {time.perf_counter() - started:.0f} s; merged into {results_out}")
    finally:
        ctx.close()
        with contextlib.suppress(OSError):
            for path in ctx.run_dir.iterdir():
                path.unlink()
            ctx.run_dir.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())

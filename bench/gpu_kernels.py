"""GPU micro-benchmark of the APOLLO step's Triton kernels at the Qwen2-1.5B (and 7B) shapes (one command).

(a) Channel norms of a bucket's separate bf16 gradients: the per-gradient `vector_norm` loop that
    `buckets.scaling_factors` ran before (one launch per gradient) against `kernels._norms_kernel` (one launch
    per bucket), with the kernel's kept tile swept around the one `kernels.norm_tiles` picks. Checks: the
    kernel's norms against the float64 norms and torch's fp32 ones, and a second launch giving the same bits.
(b) `rounding._update_kernel` tile configurations (BLOCK_M, BLOCK_N, num_warps) on a bucket with one
    coefficient per row (k, m, 1) and one with one per column (k, 1, n). Each configuration starts from the
    same parameters, directions, coefficients and noise seeds as the production one (8, 256, Triton's default
    warps), and must give bit-identical parameters. GB/s counts 6 bytes an element (read the bf16 parameter
    and direction, write the parameter).
(c) `kernels.project_with_norms` (R and the channel norms in one pass over G) against what a bucket ran
    before: `bmm` + `vector_norm` on a prepared (k, m, n) buffer, and for separate gradients one matmul each
    + `kernels.channel_norms_`, at the 1.5B and 7B bucket shapes (rank 64). Checks: R and the norms against
    float64 (the bmm path's R too: it is rounded to bf16), a second launch and the separate-gradient route
    giving the same bits. GB/s counts the 2 bytes an element of G it reads; the kept tile, warps and
    pipeline stages are swept around what `kernels.projection_tiles` picks (`--part projection` alone:
    a few minutes, most of it compiling the sweep).

Times are `triton.testing.do_bench` medians (CUDA events, L2 flushed between runs). The table is printed last
and everything goes to `--out`/gpu_kernels.json with the device, date and command.

    PYTHONPATH=operator python bench/gpu_kernels.py --out "$OUT"
    TRITON_INTERPRET=1 PYTHONPATH=operator python bench/gpu_kernels.py --small --out /tmp/k   # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hogwild.optim import kernels, rounding

# (name, k, rows, cols, dim): dim 1 is row norms (reduce along a contiguous row), dim 0 column norms.
# 14 is what `buckets.same_shape_groups` makes of the 28 MLP weights (BUCKET_ELEMENTS).
NORM_CASES = [
    ("gate/up rows", 28, 8960, 1536, 1),
    ("gate/up rows", 14, 8960, 1536, 1),
    ("down cols", 28, 1536, 8960, 0),
    ("down cols", 14, 1536, 8960, 0),
    ("embed rows", 1, 151936, 1536, 1),
]
SMALL_NORM_CASES = [("rows", 3, 90, 300, 1), ("cols", 3, 40, 300, 0), ("embed rows", 1, 500, 48, 1)]
# (name, k, rows, cols, coefficient shape per tensor)
UPDATE_CASES = [("gate/up, row coefs", 28, 8960, 1536, "rows"), ("down, col coefs", 28, 1536, 8960, "cols")]
SMALL_UPDATE_CASES = [("row coefs", 3, 90, 300, "rows"), ("col coefs", 3, 40, 300, "cols")]
# (name, k, rows, cols, rank): the buckets `buckets.same_shape_groups` makes of the Qwen2 weights.
PROJECTION_CASES = [
    ("1.5B q/o", 28, 1536, 1536, 64),
    ("1.5B k/v", 28, 256, 1536, 64),
    ("1.5B gate/up", 14, 8960, 1536, 64),
    ("1.5B down", 14, 1536, 8960, 64),
    ("1.5B embed", 1, 151936, 1536, 64),
    ("7B q/o", 19, 3584, 3584, 64),
    ("7B k/v", 28, 512, 3584, 64),
    ("7B gate/up", 3, 18944, 3584, 64),
    ("7B down", 3, 3584, 18944, 64),
    ("7B embed", 1, 152064, 3584, 64),
]
SMALL_PROJECTION_CASES = [("wide", 3, 40, 300, 16), ("tall", 2, 300, 40, 24)]
PROJECTION_WARPS = (4, 8)
PROJECTION_STAGES = (2, 3, 4, 5)
# (BLOCK_M, BLOCK_N, num_warps or None for Triton's default); the first is production's.
UPDATE_CONFIGS: list[tuple[int, int, int | None]] = [
    (8, 256, None),
    (4, 512, 4),
    (4, 512, 8),
    (8, 512, 4),
    (8, 512, 8),
    (16, 256, 4),
    (16, 256, 8),
    (2, 1024, 4),
    (2, 1024, 8),
    (16, 512, 8),
    (32, 256, 8),
]


def timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Milliseconds of one call: do_bench's median on CUDA; on CPU (the smoke run) one timed call."""
    if device.type == "cuda":
        import triton.testing

        def cuda_ms(fn: Callable[[], Any]) -> float:
            return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))

        return cuda_ms

    def cpu_ms(fn: Callable[[], Any]) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return cpu_ms


def bench_norms(cases: list, device: torch.device, ms: Callable) -> list[dict[str, Any]]:
    results = []
    generator = torch.Generator(device=device).manual_seed(0)
    for name, k, rows, cols, dim in cases:
        grads = [
            torch.randn(rows, cols, generator=generator, device=device).to(torch.bfloat16) for _ in range(k)
        ]
        grads[-1].select(1 - dim, 0).zero_()  # one channel with no gradient
        shape = (k, rows, 1) if dim == 1 else (k, 1, cols)
        eager_out = torch.empty(shape, device=device)

        def eager(out: torch.Tensor = eager_out, grads: list = grads, dim: int = dim) -> None:
            # what scaling_factors ran for a list of gradients: one launch per gradient
            for own, grad in zip(out, grads, strict=True):
                torch.linalg.vector_norm(grad, dim=dim, keepdim=True, dtype=torch.float32, out=own)

        eager()
        fused_out = torch.empty(shape, device=device)
        kernels._fused_channel_norms_(fused_out, grads, dim)
        again = torch.empty(shape, device=device)
        kernels._fused_channel_norms_(again, grads, dim)
        exact_rel = 0.0
        for i, grad in enumerate(grads):
            exact = torch.linalg.vector_norm(grad.double(), dim=dim, keepdim=True)
            err = (fused_out[i].double() - exact).abs() / exact.clamp_min(1e-300)
            exact_rel = max(exact_rel, float(err.max()))
        eager_rel = float(((fused_out - eager_out).abs() / eager_out.clamp_min(1e-30)).max())
        chosen, reduce, warps = kernels.norm_tiles(rows, cols, k, dim, device)
        gigabytes = k * rows * cols * 2 / 1e9
        row: dict[str, Any] = {
            "case": name, "k": k, "shape": [rows, cols], "dim": dim, "gigabytes": gigabytes,
            "eager_ms": ms(eager), "fused_ms": ms(lambda o=fused_out, g=grads, d=dim: kernels._fused_channel_norms_(o, g, d)),
            "tile": [chosen, reduce, warps], "max_rel_err_vs_fp64": exact_rel, "max_rel_diff_vs_eager_fp32": eager_rel,
            "deterministic": bool(torch.equal(fused_out, again)),
            "zero_channel_is_zero": bool((fused_out[-1].flatten()[0] == 0).item()),
        }  # fmt: skip
        sweep = {}
        for keep in kernels._ROW_KEEP if dim == 1 else kernels._COLUMN_KEEP:
            fn = lambda o=fused_out, g=grads, d=dim, t=keep: kernels._fused_channel_norms_(o, g, d, keep=t)  # noqa: E731
            sweep[str(keep)] = ms(fn)
        row["keep_sweep_ms"] = sweep
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def bench_update(cases: list, device: torch.device, ms: Callable) -> list[dict[str, Any]]:
    generator = torch.Generator(device=device).manual_seed(1)
    results = []
    for case in cases:
        results += _update_case(*case, generator=generator, device=device, ms=ms)
    return results


def _update_case(
    name: str, k: int, rows: int, cols: int, coef: str, *, generator: torch.Generator, device: torch.device,
    ms: Callable,
) -> list[dict[str, Any]]:  # fmt: skip
    def randn() -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator, device=device).to(torch.bfloat16)

    start = [randn() for _ in range(k)]
    directions = [randn() for _ in range(k)]
    coef_shape = (k, rows, 1) if coef == "rows" else (k, 1, cols)
    coefs = torch.rand(coef_shape, generator=generator, device=device).mul_(1e-2)
    seeds = [rounding.derive_seed(7, i) for i in range(k)]
    decay, step = 1.0 - 1e-5, 12

    def update(params: list, tiles: tuple[int, int], warps: int | None) -> None:
        rounding._fused_updates_(params, directions, coefs, decay, seeds, step, tiles=tiles, num_warps=warps)

    reference = [p.clone() for p in start]
    update(reference, UPDATE_CONFIGS[0][:2], UPDATE_CONFIGS[0][2])
    moved = not all(torch.equal(a, b) for a, b in zip(reference, start, strict=True))
    work = [p.clone() for p in start]
    results = []
    for block_m, block_n, warps in UPDATE_CONFIGS:
        row: dict[str, Any] = {"case": name, "k": k, "shape": [rows, cols], "coefs": coef,
                               "block_m": block_m, "block_n": block_n, "num_warps": warps}  # fmt: skip
        try:
            for own, first in zip(work, start, strict=True):
                own.copy_(first)
            update(work, (block_m, block_n), warps)
            # `moved`: the reference did update, so equal bits are not two no-ops
            row["bit_identical"] = moved and all(
                torch.equal(a, b) for a, b in zip(work, reference, strict=True)
            )
            row["ms"] = ms(lambda m=block_m, n=block_n, w=warps: update(work, (m, n), w))
            row["gb_per_s"] = 6 * k * rows * cols / 1e9 / (row["ms"] / 1e3)
        except Exception as error:  # a configuration the compiler refuses is a result, not a crash
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def bench_projection(cases: list, device: torch.device, ms: Callable) -> list[dict[str, Any]]:
    generator = torch.Generator(device=device).manual_seed(2)
    results = []
    for name, k, rows, cols, rank in cases:
        wide = rows <= cols
        stacked = torch.randn(k, rows, cols, generator=generator, device=device).to(torch.bfloat16)
        stacked[-1].select(0 if wide else 1, 0).zero_()  # one channel with no gradient
        separate = [g.clone() for g in stacked]
        shape = (k, rank, rows) if wide else (k, cols, rank)
        projection = torch.randn(shape, generator=generator, device=device).div_(rank**0.5).to(torch.bfloat16)
        dim = 1 if wide else 2

        def buffered(
            p: torch.Tensor = projection, g: torch.Tensor = stacked, d: int = dim, w: bool = wide
        ) -> tuple:
            # the prepared-buffer path before: one bmm (R rounded to bf16), then the norms read G again
            r = (torch.bmm(p, g) if w else torch.bmm(g, p)).float()
            return r, torch.linalg.vector_norm(g, dim=d, keepdim=True, dtype=torch.float32)

        def per_gradient(
            p: torch.Tensor = projection, gs: list = separate, d: int = dim, w: bool = wide
        ) -> tuple:
            # the separate-gradient path before: a matmul each, then the one-launch norms kernel
            r = torch.stack([pi @ g if w else g @ pi for pi, g in zip(p, gs, strict=True)]).float()
            m, n = gs[0].shape
            out = torch.empty((len(gs), 1, n) if w else (len(gs), m, 1), device=gs[0].device)
            return r, kernels.channel_norms_(out, gs, d - 1)

        r, norms = kernels.project_with_norms(projection, stacked)
        again = kernels.project_with_norms(projection, stacked)
        listed = kernels.project_with_norms(projection, separate)
        old_r, _ = buffered()
        r_err = old_r_err = norm_err = 0.0
        for i in range(k):  # float64 one gradient at a time: the 7B embedding is 1.1 GB in bf16
            g64, p64 = stacked[i].double(), projection[i].double()
            exact = p64 @ g64 if wide else g64 @ p64
            r_err = max(r_err, float((r[i].double() - exact).norm() / exact.norm()))
            old_r_err = max(old_r_err, float((old_r[i].double() - exact).norm() / exact.norm()))
            exact_norms = torch.linalg.vector_norm(g64, dim=dim - 1, keepdim=True)
            nonzero = exact_norms > 0
            err = (norms[i].double() - exact_norms).abs()[nonzero] / exact_norms[nonzero]
            norm_err = max(norm_err, float(err.max()))
            del g64, exact
        tile, reduce, warps = kernels.projection_tiles(rows, cols, k, rank, device)
        gigabytes = k * rows * cols * 2 / 1e9
        row: dict[str, Any] = {
            "case": name, "k": k, "shape": [rows, cols], "rank": rank, "gigabytes": gigabytes,
            "bmm_norms_ms": ms(buffered), "matmuls_norms_ms": ms(per_gradient),
            "fused_ms": ms(lambda p=projection, g=stacked: kernels.project_with_norms(p, g)),
            "fused_separate_ms": ms(lambda p=projection, g=separate: kernels.project_with_norms(p, g)),
            "tile": [tile, reduce, warps], "r_rel_err_vs_fp64": r_err, "bmm_r_rel_err_vs_fp64": old_r_err,
            "norm_rel_err_vs_fp64": norm_err,
            "deterministic": torch.equal(r, again[0]) and torch.equal(norms, again[1]),
            "separate_same_bits": torch.equal(r, listed[0]) and torch.equal(norms, listed[1]),
            "zero_channel_is_zero": bool((norms[-1].flatten()[0] == 0).item()),
        }  # fmt: skip
        sweep: dict[str, float | str] = {}
        padded = 1 << (rank - 1).bit_length()
        configs = [(t, w, None) for t in kernels._PROJECTION_KEEP for w in PROJECTION_WARPS]
        configs += [(tile, warps, st) for st in PROJECTION_STAGES]
        for keep, num_warps, stages in configs:
            if keep * padded > kernels._PROJECTION_ACCUMULATORS:
                continue
            label = f"{keep}/{num_warps}/{stages or 'default'}"
            try:
                sweep[label] = ms(
                    lambda p=projection, g=stacked, t=keep, w=num_warps, st=stages: (
                        kernels.project_with_norms(p, g, keep=t, num_warps=w, num_stages=st)
                    )
                )
            except Exception as error:  # a configuration the compiler refuses is a result, not a crash
                sweep[label] = f"{type(error).__name__}: {str(error)[:100]}"
        row["sweep_ms"] = sweep  # keep/warps/stages -> ms
        results.append(row)
        print(json.dumps(row), flush=True)
        del stacked, separate, r, norms, again, listed, old_r
    return results


def table(
    norms: list[dict[str, Any]], updates: list[dict[str, Any]], projections: list[dict[str, Any]]
) -> str:
    lines = ["channel norms (ms, median)  | eager loop | kernel | x    | GB/s  | tile (keep,red,warps) | rel err fp64 | same bits | keep sweep ms"]  # fmt: skip
    for r in norms:
        sweep = " ".join(f"{t}:{v:.3f}" for t, v in r["keep_sweep_ms"].items())
        lines.append(
            f"{r['k']:>2} x {r['case']:<22} | {r['eager_ms']:>10.3f} | {r['fused_ms']:>6.3f} | "
            f"{r['eager_ms'] / r['fused_ms']:>4.2f} | {r['gigabytes'] / r['fused_ms'] * 1e3:>5.0f} | "
            f"{tuple(r['tile'])!s:<21} | {r['max_rel_err_vs_fp64']:.1e}      | {r['deterministic']!s:<9} | {sweep}"
        )
    lines.append("")
    lines.append(
        "update kernel (BLOCK_M, BLOCK_N, warps) | case                  | ms     | GB/s  | bit-identical"
    )
    for r in updates:
        config = f"({r['block_m']}, {r['block_n']}, {r['num_warps'] or 'default'})"
        if "error" in r:
            lines.append(f"{config:<39} | {r['case']:<21} | error: {r['error'][:60]}")
            continue
        lines.append(
            f"{config:<39} | {r['case']:<21} | {r['ms']:>6.3f} | {r['gb_per_s']:>5.0f} | {r['bit_identical']}"
        )
    lines.append("")
    lines.append(
        "R + channel norms (ms, median) | bmm+norm | mm+norms | fused | fused list | x bmm | GB/s | tile (keep,red,warps) | R err fp64 (bmm's) | norm err | same bits | fastest of sweep"
    )  # fmt: skip
    for r in projections:
        timed = {k: v for k, v in r["sweep_ms"].items() if isinstance(v, float)}
        best = min(timed, key=timed.__getitem__) if timed else "-"
        lines.append(
            f"{r['k']:>2} x {r['case']:<25} | {r['bmm_norms_ms']:>8.3f} | {r['matmuls_norms_ms']:>8.3f} | "
            f"{r['fused_ms']:>5.3f} | {r['fused_separate_ms']:>10.3f} | {r['bmm_norms_ms'] / r['fused_ms']:>5.2f} | "
            f"{r['gigabytes'] / r['fused_ms'] * 1e3:>4.0f} | {tuple(r['tile'])!s:<21} | "
            f"{r['r_rel_err_vs_fp64']:.1e} ({r['bmm_r_rel_err_vs_fp64']:.1e}) | {r['norm_rel_err_vs_fp64']:.1e}  | "
            f"{r['deterministic'] and r['separate_same_bits']!s:<9} | {best}: {timed.get(best, float('nan')):.3f}"
        )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/out")
    parser.add_argument(
        "--small", action="store_true", help="tiny shapes (CPU smoke run with TRITON_INTERPRET=1)"
    )
    parser.add_argument(
        "--part", default="norms,update,projection", help="comma-separated: norms, update, projection"
    )
    args = parser.parse_args()
    if rounding.triton is None:
        raise SystemExit("needs triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.small:
        raise SystemExit("no GPU: use --small with TRITON_INTERPRET=1 for a smoke run")
    ms = timer(device)
    parts = set(args.part.split(","))
    began = time.monotonic()
    norms = (
        bench_norms(SMALL_NORM_CASES if args.small else NORM_CASES, device, ms) if "norms" in parts else []
    )
    updates = (
        bench_update(SMALL_UPDATE_CASES if args.small else UPDATE_CASES, device, ms)
        if "update" in parts
        else []
    )
    projections = (
        bench_projection(SMALL_PROJECTION_CASES if args.small else PROJECTION_CASES, device, ms)
        if "projection" in parts
        else []
    )
    import triton

    record = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
        "seconds": round(time.monotonic() - began, 1),
        "norms": norms,
        "update": updates,
        "projection": projections,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_kernels.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{record['device']}, {record['date']}, {record['seconds']} s -> {out / 'gpu_kernels.json'}")
    print(table(norms, updates, projections))


if __name__ == "__main__":
    main()

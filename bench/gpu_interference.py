"""The bench's interference part: serving p99 and training speed side by side, per protection candidate.

    python bench/gpu_bench.py --part interference --shape 1.5b [--candidates a,b] [--mps PCT] [--timeline]

A serving process (`gpu_server.py`) and a training process (`gpu_trainer.py`) share the GPU. The server first
runs saturated alone and beside unprotected training (capacity and slowdown), then at half its capacity alone
(the baseline), then beside each candidate: the training rate with the server idle, then under the load.
`--timeline` joins the slowest requests with the trainer's preemption points (`gpu_timeline.py`). Split out of
`gpu_bench.py`, which keeps the other parts and the results file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpu_clocks import ClockSampler
from gpu_common import Child, log, now_s

if TYPE_CHECKING:  # gpu_bench imports this module: the type only, no import cycle at run time
    from gpu_bench import Context

# (name, protection settings): hogwild.config.ServingProtection fields over its defaults, applied to the worker's
# own training path (gpu_trainer.TrainLoop) as a hot configure. Only what ships: no protection, a duty cycle,
# the default (preemption points waiting in the GPU stream), the same on the host, and a higher training share.
# The candidates that emulated designs which never shipped (step-level yield, layer-only points, bench-side
# tail and head pieces, fixed queue depths) are in git history, and their figures in bench/RESULTS.md.
CANDIDATES: list[tuple[str, dict[str, Any]]] = [
    ("off", {"yield_when_busy": False}),
    ("duty-0.5", {"yield_when_busy": False, "max_duty_cycle": 0.5}),
    ("duty-0.25", {"yield_when_busy": False, "max_duty_cycle": 0.25}),
    ("worker-default", {}),
    ("worker-host", {"gpu_wait": False}),
    ("worker-share-0.5", {"min_training_share": 0.5}),
]
# Every row trains 16,384 tokens a step: micro-batches of 2 x 2048 tokens, 4 accumulated (tiny: 1 x 64).
MICRO_BATCH, SEQ, ACCUMULATION = 2, 2048, 4
DEFAULT_CANDIDATE = "worker-default"


# ---- interference ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def mps_daemon(root: Path) -> Iterator[Path]:
    """The worker's own user-space MPS daemon (`hogwild.mps_daemon`, private pipe and log dirs under `root`),
    for this process's children: they inherit the dirs, so they become its clients. Yields the log dir."""
    from hogwild import mps
    from hogwild.mps_daemon import MpsDaemon

    dirs = mps.MpsDirs.under(root)
    daemon = MpsDaemon.start(dirs)
    os.environ.update(mps.daemon_env(dirs))
    log(f"MPS control daemon started ({daemon.binary}, pipe {dirs.pipe})")
    try:
        yield Path(dirs.log)
    finally:
        daemon.stop()
        for name in mps.daemon_env(dirs):
            os.environ.pop(name, None)
        log("MPS control daemon told to quit")


def part_interference(ctx: Context) -> dict[str, Any]:
    """The trade-off curve; with `--mps PCT`, both processes are MPS clients and the trainer gets PCT % of
    the SMs, and the figures go under `interference_mps[PCT]` instead of the main keys."""
    if not ctx.args.mps:
        return interference(ctx)
    from hogwild import mps

    with mps_daemon(Path(tempfile.mkdtemp(prefix="hogwild-mps-"))) as mps_log:
        try:
            figures = interference(ctx, {mps.ENV_THREAD_PERCENTAGE: str(mps.check_share(ctx.args.mps))})
        finally:
            ctx.close()  # the server is an MPS client: it goes before the daemon
            ctx.server = None
            for path in sorted(mps_log.glob("*.log")):
                (ctx.out / f"mps-{path.name}").write_text(path.read_text(errors="replace")[-20000:])
    return {"interference_mps": {str(ctx.args.mps): figures}}


def interference(ctx: Context, trainer_env: dict[str, str] | None = None) -> dict[str, Any]:
    args = ctx.args
    server = ctx.start_server()
    trainer = Child(
        [str(Path(__file__).parent / "gpu_trainer.py"), "--run-dir", str(ctx.run_dir)],
        ctx.out / "trainer.log",
        env=trainer_env,
    )
    log(f"trainer ready: {trainer.ready}")
    window_s, idle_s = args.window_s, args.idle_s
    small = ctx.shape == "tiny"
    clocks = ClockSampler(now_s)
    try:
        figures: dict[str, Any] = {}
        capacity = server.call("load", mode="saturate", seconds=window_s)
        log(f"serving alone, saturated: {capacity}")
        micro, seq = (1, 64) if small else (MICRO_BATCH, SEQ)
        trainer.call(
            "start", micro_batch=micro, seq=seq, accumulation=ACCUMULATION, protection=dict(CANDIDATES[0][1])
        )
        saturated = server.call("load", mode="saturate", seconds=window_s)
        rate = trainer.call("rate", begin=saturated["begin"], end=saturated["end"])
        trainer.call("stop")
        log(f"serving saturated beside full-speed training: {saturated}; training {rate}")
        half = capacity["steps_per_s"] / 2
        alone = server.call("load", mode=args.arrivals, rate=half, seconds=window_s)
        log(f"serving alone at half capacity ({half:.1f} steps/s): {alone}")
        figures.update({
            "serve_tokens_per_s_alone": capacity["tokens_per_s"],
            "serve_tokens_per_s_training": saturated["tokens_per_s"],
            "serve_p50_ms_saturated_alone": capacity["p50_ms"],
            "serve_p99_ms_saturated_alone": capacity["p99_ms"],
            "serve_p50_ms_saturated_training": saturated["p50_ms"],
            "serve_p99_ms_saturated_training": saturated["p99_ms"],
            "train_tokens_per_s_beside_saturated_server": rate["tokens_per_s"],
            "serve_half_load_steps_per_s": half,
            "serve_step_tokens": server.ready["step_tokens"],
            "serve_cuda_graph": server.ready.get("cuda_graph"),
            "serve_arrivals": args.arrivals,
            "serve_p50_ms_alone": alone["p50_ms"],
            "serve_p99_ms_alone": alone["p99_ms"],
            "serve_service_p50_ms_alone": alone["service_p50_ms"],
            "serve_busy_fraction_alone": alone["busy_fraction"],
            "clocks": {
                "saturated_alone": clocks.window(capacity["begin"], capacity["end"]),
                "saturated_training": clocks.window(saturated["begin"], saturated["end"]),
                "half_load_alone": clocks.window(alone["begin"], alone["end"]),
            },
        })  # fmt: skip
        log(f"clocks: {json.dumps(figures['clocks'])}")
        curve = []
        wanted = args.candidates.split(",") if args.candidates else [c[0] for c in CANDIDATES]
        # `--repeat N` measures each candidate N times in turn; repeats are named `name#2`, `name#3`, ...
        runs = [
            (f"{name}#{n}" if n > 1 else name, protection)
            for n in range(1, args.repeat + 1)
            for name, protection in CANDIDATES
            if name in wanted
        ]
        for name, protection in runs:
            trainer.call(
                "start", micro_batch=micro, seq=seq, accumulation=ACCUMULATION, protection=protection,
                timeline=args.timeline,
            )  # fmt: skip
            begin = now_s()
            time.sleep(idle_s)
            idle_end = now_s()
            idle = trainer.call("rate", begin=begin, end=idle_end)
            loaded = server.call(
                "load", mode=args.arrivals, rate=half, seconds=window_s, detail=args.timeline
            )
            busy = trainer.call("rate", begin=loaded["begin"], end=loaded["end"])
            if args.timeline:
                write_collisions(
                    ctx, name, loaded, trainer.call("timeline", begin=loaded["begin"] - 1, end=loaded["end"])
                )
            stopped = trainer.call("stop")
            kept = busy["tokens_per_s"] / idle["tokens_per_s"] if idle["tokens_per_s"] else None
            row = {
                "name": name, "protection": protection, "micro_batch": [micro, seq], "accumulation": ACCUMULATION,
                "serve_p50_ms": loaded["p50_ms"], "serve_p99_ms": loaded["p99_ms"], "serve_max_ms": loaded["max_ms"],
                "p99_ratio": loaded["p99_ms"] / alone["p99_ms"],
                "train_tokens_per_s_idle_server": idle["tokens_per_s"], "train_tokens_per_s_loaded_server": busy["tokens_per_s"],
                "kept_fraction": kept,
                "train_steps_loaded": busy["steps"], "serve_steps": loaded["steps"], "gate": stopped,
                "serve_p99_ms_alone": alone["p99_ms"], "date": time.strftime("%Y-%m-%d"),
                **strict_yield_figures(loaded, kept),
                "clocks": {
                    "idle_server": clocks.window(begin, idle_end),
                    "loaded": clocks.window(loaded["begin"], loaded["end"]),
                },
            }  # fmt: skip
            log(f"candidate {name}: {json.dumps(row)}")
            curve.append(row)
            with open(ctx.out / f"interference-{ctx.shape}.jsonl", "a") as f:  # survives a killed part
                f.write(json.dumps({"base": figures, "row": row}) + "\n")
        figures["protection_curve"] = curve
        figures.update(default_figures(curve, DEFAULT_CANDIDATE))
        return figures
    finally:
        clocks.close()
        trainer.close()


def strict_yield_figures(loaded: dict[str, Any], kept: float | None) -> dict[str, float | None]:
    """What a trainer that never runs beside serving can keep at most: the share of the window the server was
    not busy (its steps' service time under training, so including any clock drop the training causes), and
    how much of that ceiling the row's kept fraction reached."""
    ceiling = 1.0 - loaded["busy_fraction"]
    return {
        "serve_service_p50_ms": loaded["service_p50_ms"],
        "serve_busy_fraction": loaded["busy_fraction"],
        "strict_yield_ceiling": ceiling,
        "kept_of_ceiling": kept / ceiling if kept is not None and ceiling > 0 else None,
    }


def write_collisions(ctx: Context, name: str, loaded: dict[str, Any], timeline: dict[str, Any]) -> None:
    """`--timeline`: the slowest requests of a loaded window against the trainer's points, to a file and the log."""
    from gpu_timeline import collision_report

    requests = loaded.pop("requests", [])
    report = collision_report(requests, [tuple(p) for p in timeline.get("points", [])])
    path = ctx.out / f"timeline-{ctx.shape}-{name}.json"
    path.write_text(
        json.dumps({"report": report, "requests": requests, "points": timeline.get("points", [])})
    )
    log(
        f"collisions {name}: {report['requests']} requests, {report.get('points')} points, GPU median {report.get('gpu_median_ms')}"
    )
    for row in report.get("slow", []):
        trail = ", ".join(f"{t:+.1f} {label} {held:.1f}" for t, label, held in row["trainer"][:40])
        log(
            f"  {row['latency_ms']:.1f} ms: late {row['late_ms']:.1f}, before GPU {row['before_gpu_ms']:.1f}, "
            f"GPU {row['gpu_ms']:.1f} (+{row['gpu_extra_ms']:.1f}); trainer: {trail}"
        )
    log(f"  last point before launch, slowest: {report.get('last_labels_slow')}")
    log(f"  last point before launch, all: {report.get('last_labels_all')}")


def default_figures(curve: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The must-show keys at the default protection setting (and the unprotected p99), from the curve."""
    figures: dict[str, Any] = {}
    default = next((row for row in curve if row["name"] == name), None)
    if default is not None:
        figures.update({
            "protection_default": name,
            "serve_p99_ms_training": default["serve_p99_ms"],
            "train_tokens_per_s_idle_server": default["train_tokens_per_s_idle_server"],
            "train_tokens_per_s_loaded_server": default["train_tokens_per_s_loaded_server"],
        })  # fmt: skip
    off = next((row for row in curve if row["name"] == "off"), None)
    if off is not None:
        figures["serve_p99_ms_training_unprotected"] = off["serve_p99_ms"]
    return figures


def keep_earlier(entry: dict[str, Any], figures: dict[str, Any]) -> dict[str, Any]:
    """A run that measured some candidates replaces those rows of the curve and keeps the others (each row
    carries its own run's baseline and date); MPS figures merge by SM share."""
    figures = dict(figures)
    if "protection_curve" in figures:
        fresh = {row["name"] for row in figures["protection_curve"]}
        kept = [row for row in entry.get("protection_curve") or [] if row["name"] not in fresh]
        figures["protection_curve"] = kept + figures["protection_curve"]
    if "interference_mps" in figures:
        figures["interference_mps"] = {**(entry.get("interference_mps") or {}), **figures["interference_mps"]}
    return figures

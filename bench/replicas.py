"""Replica groups: what the gradient all-reduce costs per step, and how long replicas differ after a step.

    python -m bench replicas [--replicas 1 2 3] [--steps 20] [--samples 6 ...] [--model-spec tiny small]
                             [--quiet-below 0.1 --quiet-wait-s 30 --attempts 3] [--device cpu]
                             [--out bench/results/replicas-<date>.json]

Each replica is a stand-in exporter (hogwild.testing.exporter: a process holding a tiny model's weights in
shared memory exactly as the vLLM plugin does) and a real `hogwild worker` mapping them, started with the
replica environment (HOGWILD_REPLICA, HOGWILD_RENDEZVOUS) that the operator and local mode give it; the
group's store lives in this process, as in `hogwild serve --replicas`. For each model spec the group grows
1 -> 2 -> 3 (the sizes asked), hot, as a scale-up does; at each size, for each `--samples` count (texts of
~53 tokens), one warm-up request, then one measured /train of `--steps` steps, sent to replica 0. Every
member trains its share of the samples (the batch is the same at every size: strong scaling), the gradients
are summed over the group, and every member applies the same step. Size 1 is the baseline: a lone group member, the same code path (its
all-reduce is a local copy).

Per size it reports:
- step time: median and p90 of the intervals between replica 0's consecutive `step_applied` log events (the
  whole per-step cycle: the members' exchange and weights digest, forward/backward, all-reduce, optimizer),
  and the trainer's own mean (`hogwild_worker_step_seconds`, forward to optimizer, the all-reduce inside);
- all-reduce seconds per step: each member's `hogwild_worker_allreduce_seconds` sum/count over the measured
  steps (scraped from its /metrics before and after), averaged over members, and its share of the step;
- replica skew: per step, max - min over members of the `step_applied` timestamps (the moment each member's
  update is in its served weights): how long replicas serve different weights after a step. The log's `ts`
  has millisecond resolution, so skews below 1 ms read as 0 or 1 ms;
- other load: the share of the machine's cores that other programs kept busy during the measured request
  (this machine is shared; a row taken under load says so instead of passing for a quiet one). Before each
  measured request the bench waits up to `--quiet-wait-s` for a quiet window, and repeats a request taken
  under more than `--quiet-below` of other load, up to `--attempts` times, keeping the least loaded one.

Conditions that matter, recorded with the numbers: the machine's core count (each member's worker runs one
training thread, OMP_NUM_THREADS=1; more replicas than cores oversubscribe), the model's parameter count (the
all-reduce moves 4 bytes per parameter: float32 buckets), tokens per step. `--device cuda` would run the same
script on GPUs (one per replica, CUDA_VISIBLE_DEVICES=<ordinal>, NCCL for the gradients): written, not run;
unverified.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))

from hogwild.defaults import MANIFEST_NAME  # noqa: E402
from hogwild.testing import tiny_model  # noqa: E402
from hogwild.testing.exporter import ExporterProcess  # noqa: E402
from hogwild.testing.worker_process import WorkerProcess  # noqa: E402
from hogwild.worker.group import rendezvous  # noqa: E402

# "small": deep and wide enough that the all-reduce moves ~50 MB per step (12.6M parameters), still a few
# hundred ms a step on one CPU thread. init_std 0.02, as the tiny model's docstring asks for real depth.
SPECS: dict[str, tiny_model.TinySpec] = {
    "tiny": tiny_model.TinySpec(),
    "small": tiny_model.TinySpec(
        hidden_size=512, layers=4, heads=16, kv_heads=4, intermediate_size=1536, init_std=0.02
    ),
    **tiny_model.NAMED,
}
# What the workers ship with, except: a higher lr (the random model learns visibly, which changes nothing
# measured) and no interval checkpoints (a checkpoint mid-run would be timed as a step).
CONFIG = {"lr": 1e-3, "checkpoint_interval_s": 0}
CHILD_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---- pure: from the workers' events to the figures ----------------------------------------------------------
def applied_at(events: Iterable[Mapping[str, Any]]) -> dict[int, float]:
    """step -> unix time its update landed, from one worker's log events (the last one of a step wins: a
    member that re-forms and re-applies nothing keeps its step numbers unique anyway)."""
    return {int(e["step"]): float(e["ts"]) for e in events if e.get("event") == "step_applied"}


def step_intervals(applied: Mapping[int, float], steps: Sequence[int]) -> list[float]:
    """Seconds between consecutive steps of `steps` (the first step has no predecessor in the run)."""
    return [applied[b] - applied[a] for a, b in itertools.pairwise(steps) if a in applied and b in applied]


def skews(applied_by_member: Sequence[Mapping[int, float]], steps: Sequence[int]) -> list[float]:
    """Per step that every member applied: latest minus earliest landing time across members."""
    out = []
    for step in steps:
        times = [member[step] for member in applied_by_member if step in member]
        if len(times) == len(applied_by_member):
            out.append(max(times) - min(times))
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that occurred, no interpolation over few samples."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"median": math.nan, "p90": math.nan, "max": math.nan, "n": 0}
    return {
        "median": statistics.median(values),
        "p90": percentile(values, 90),
        "max": max(values),
        "n": len(values),
    }


def histogram_delta(before: Mapping[str, float], after: Mapping[str, float], name: str) -> tuple[float, int]:
    """(seconds, count) a histogram gained between two scrapes."""
    return after[f"{name}_sum"] - before[f"{name}_sum"], int(after[f"{name}_count"] - before[f"{name}_count"])


# ---- the group ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (every core; idle and iowait excluded)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pids: Iterable[int]) -> float:
    """CPU seconds (user + system, every thread) these processes have used; a gone process counts 0."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """How much of the machine other programs used while the bench ran: this machine is shared, and a
    neighbour's test run on 2 cores moves every figure here. Busy CPU of the whole machine minus this
    bench's own processes, as a share of all cores over the wall time."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = [os.getpid(), *pids]
        self.machine, self.own, self.started = machine_busy_s(), process_cpu_s(self.pids), time.monotonic()

    def share(self) -> float:
        wall = time.monotonic() - self.started
        foreign = (machine_busy_s() - self.machine) - (process_cpu_s(self.pids) - self.own)
        return max(0.0, foreign) / (wall * (os.cpu_count() or 1))


def scrape(port: int) -> dict[str, float]:
    """The worker's /metrics as sample name -> value (unlabelled samples only: the histograms read here)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


class Replicas:
    """Exporters and workers of one session's replicas, one shared checkpoint dir, the store here."""

    def __init__(self, model: Path, root: Path, device: str) -> None:
        self.model, self.root, self.device = model, root, device
        self.address = f"127.0.0.1:{free_port()}"
        self.store = rendezvous.host_store(self.address)
        self.exporters: dict[int, ExporterProcess] = {}
        self.workers: dict[int, WorkerProcess] = {}

    def start(self, replica: int) -> None:
        env = dict(CHILD_ENV)
        if self.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(replica)  # one GPU per replica: NCCL refuses two ranks on one
        exporter = ExporterProcess(self.model, self.root / f"exporter-{replica}", device=self.device, env=env)
        self.exporters[replica] = exporter
        run = self.root / f"run-{replica}"
        run.mkdir()
        shutil.copyfile(exporter.run_dir / MANIFEST_NAME, run / MANIFEST_NAME)
        env |= {
            "HOGWILD_REPLICA": str(replica),
            "HOGWILD_RENDEZVOUS": self.address,
            "HOGWILD_GROUP_SETTLE_S": "1.0",
            "HOGWILD_LOG_LEVEL": "DEBUG",  # the step_applied events
        }
        self.workers[replica] = WorkerProcess(run, self.root / "checkpoints", env=env, config=CONFIG)

    def wait_formed(self, members: list[int], timeout_s: float = 300.0) -> None:
        for r in members:
            self.workers[r].wait_until(
                lambda s: s["group"]["state"] == "formed" and s["group"]["members"] == members, timeout_s
            )

    def wait_idle_at(self, members: list[int], step: int) -> list[dict[str, Any]]:
        """Every member has applied `step`, finished the request (the origin answers first), and compared its
        digest of those weights with the others' (members exchange at every idle tick)."""
        return [
            self.workers[r].wait_until(
                lambda s: (
                    s["step"] >= step and not s["busy"] and s["group"]["last_compared_step"] == s["step"]
                )
            )
            for r in members
        ]

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers.values()] + [e.pid for e in self.exporters.values()]

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        for exporter in self.exporters.values():
            exporter.close()


def parameter_count(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                total += math.prod(f.get_slice(name).get_shape())
    return total


def make_samples(count: int, lines_each: int = 8) -> list[dict[str, str]]:
    """`count` distinct texts of equal length from the tiny tokenizer's own corpus (balanced shards)."""
    corpus = tiny_model.corpus()
    return [
        {"text": " ".join(corpus[(i * lines_each + j) % len(corpus)] for j in range(lines_each))}
        for i in range(count)
    ]


@dataclass(frozen=True)
class Quiet:
    """On a shared machine: wait for other programs to leave the cores free, and retry a measured request
    taken under their load, keeping the attempt with the least of it."""

    below: float = 0.10  # share of all cores that other programs may use
    wait_s: float = 30.0  # the longest wait for a quiet window before each attempt
    attempts: int = 3


def wait_for_quiet(pids: list[int], quiet: Quiet, window_s: float = 2.0) -> float:
    """Wait until a `window_s` window had other load under `quiet.below`, or `quiet.wait_s` passed; the wait."""
    started = time.monotonic()
    while time.monotonic() - started < quiet.wait_s:
        load = ForeignLoad(pids)
        time.sleep(window_s)
        if load.share() <= quiet.below:
            break
    return time.monotonic() - started


def measure(
    group: Replicas, members: list[int], samples: list[dict[str, str]], steps: int, quiet: Quiet
) -> dict[str, Any]:
    """Warm up, then the measured request: again while other programs loaded the machine, up to the limit."""
    origin = group.workers[members[0]]
    warm = origin.call("train", wait_s=600, samples=samples, steps=2)  # optimizer state, first-step costs
    group.wait_idle_at(members, warm["step"])
    best: dict[str, Any] | None = None
    for attempt in range(1, quiet.attempts + 1):
        waited = wait_for_quiet(group.pids(), quiet)
        row = measured_request(group, members, samples, steps) | {
            "attempt": attempt,
            "waited_quiet_s": waited,
        }
        if best is None or row["foreign_cpu_share"] < best["foreign_cpu_share"]:
            best = row
        if row["foreign_cpu_share"] <= quiet.below:
            break
    assert best is not None
    return best


def measured_request(
    group: Replicas, members: list[int], samples: list[dict[str, str]], steps: int
) -> dict[str, Any]:
    origin = group.workers[members[0]]
    ports = {r: group.workers[r].call("status")["metrics_port"] for r in members}
    before = {r: scrape(ports[r]) for r in members}
    load = ForeignLoad(group.pids())
    started = time.perf_counter()
    reply = origin.call("train", wait_s=600, samples=samples, steps=steps)
    wall = time.perf_counter() - started
    foreign = load.share()
    statuses = group.wait_idle_at(members, reply["step"])
    after = {r: scrape(ports[r]) for r in members}

    measured = list(range(reply["step"] - reply["steps"] + 1, reply["step"] + 1))
    applied = {r: applied_at(group.workers[r].log_events()) for r in members}
    allreduce, in_step = [], []
    for r in members:
        seconds, count = histogram_delta(before[r], after[r], "hogwild_worker_allreduce_seconds")
        allreduce.append(seconds / count if count else math.nan)
        seconds, count = histogram_delta(before[r], after[r], "hogwild_worker_step_seconds")
        in_step.append(seconds / count if count else math.nan)
    intervals = step_intervals(applied[members[0]], measured)
    if not intervals:
        raise RuntimeError(
            "no step_applied events in the workers' logs (hogwild.worker.trainer logs one per step at DEBUG; "
            "this bench starts the workers with HOGWILD_LOG_LEVEL=DEBUG)"
        )
    per_step_skew = skews([applied[r] for r in members], measured)
    allreduce_mean, cycle_mean = statistics.mean(allreduce), statistics.mean(intervals)
    complaints = [
        {"replica": r, "level": e.get("level"), "event": e.get("event"), "msg": e.get("msg")}
        for r in members
        for e in group.workers[r].log_events()
        if e.get("level") in {"warning", "error", "critical"}
    ]
    return {
        "replicas": len(members),
        "steps": reply["steps"],
        "tokens_per_step": reply["tokens"] / max(1, reply["steps"]),
        "request_wall_s_per_step": wall / max(1, reply["steps"]),
        "foreign_cpu_share": foreign,
        "step_s": summary(intervals),
        "step_s_mean": cycle_mean,
        "trainer_step_s_mean": statistics.mean(in_step),
        "allreduce_s_per_step": allreduce_mean,
        "allreduce_s_per_member": allreduce,
        "allreduce_share_of_step": allreduce_mean / cycle_mean if cycle_mean else math.nan,
        "skew_s": summary(per_step_skew),
        "step_intervals_s": intervals,
        "skews_s": per_step_skew,
        "out_of_sync": sum(s["group"]["out_of_sync"] for s in statuses),
        "digests_equal": len({(s["step"], s["group"]["digest"]) for s in statuses}) == 1,
        "log_warnings": complaints,
    }


def run_spec(
    name: str, sizes: list[int], steps: int, batches: list[int], device: str, quiet: Quiet
) -> dict[str, Any]:
    model = tiny_model.cached(SPECS[name])
    params = parameter_count(model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hogwild-bench-replicas-") as tmp:
        group = Replicas(model, Path(tmp), device)
        try:
            for size in sizes:
                for replica in range(len(group.workers), size):  # grow hot, as a scale-up does
                    group.start(replica)
                members = list(range(size))
                group.wait_formed(members)
                for samples in batches:
                    row = measure(group, members, make_samples(samples), steps, quiet)
                    row |= {
                        "spec": name,
                        "parameters": params,
                        "allreduce_mib": params * 4 / 2**20,
                        "samples_per_step": samples,
                        "oversubscribed": size > (os.cpu_count() or 1),
                    }
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.append(row)
        finally:
            group.close()
    return {"spec": name, "parameters": params, "rows": rows}


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| model (params) | samples | replicas | step median / p90 ms | trainer step ms | all-reduce ms | all-reduce share "
        "| skew median / p90 / max ms | other load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        over = " (oversubscribed)" if r["oversubscribed"] else ""
        lines.append(
            f"| {r['spec']} ({r['parameters'] / 1e6:.2f}M) | {r['samples_per_step']} | {r['replicas']}{over} "
            f"| {ms(r['step_s']['median'])} / {ms(r['step_s']['p90'])} | {ms(r['trainer_step_s_mean'])} "
            f"| {ms(r['allreduce_s_per_step'])} | {r['allreduce_share_of_step']:.0%} "
            f"| {ms(r['skew_s']['median'])} / {ms(r['skew_s']['p90'])} / {ms(r['skew_s']['max'])} "
            f"| {r['foreign_cpu_share']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench replicas",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--replicas", type=int, nargs="+", default=[1, 2, 3], help="group sizes (1: baseline)"
    )
    parser.add_argument("--steps", type=int, default=20, help="measured steps per group size")
    parser.add_argument(
        "--samples", type=int, nargs="+", default=[6], help="samples per step (swept), split over the members"
    )
    parser.add_argument(
        "--model-spec", nargs="+", default=["tiny", "small"], choices=sorted(SPECS), help="models to sweep"
    )
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=Quiet.below,
        help="retry a measured request while other programs used more than this share of the cores",
    )
    parser.add_argument("--quiet-wait-s", type=float, default=Quiet.wait_s, help="longest wait for quiet")
    parser.add_argument("--attempts", type=int, default=Quiet.attempts, help="measured requests at most")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: unverified")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/replicas-<date>.json)")
    args = parser.parse_args(argv)
    sizes = sorted(set(args.replicas))
    if sizes[0] < 1 or args.steps < 2:
        parser.error("group sizes start at 1, and at least 2 steps are needed for a step interval")

    import torch

    date = datetime.date.today().isoformat()
    quiet = Quiet(args.quiet_below, args.quiet_wait_s, max(1, args.attempts))
    specs = [run_spec(name, sizes, args.steps, args.samples, args.device, quiet) for name in args.model_spec]
    rows = [row for spec in specs for row in spec["rows"]]
    result = {
        "date": date,
        "machine": platform.node(),
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "command": "python -m bench replicas " + " ".join(sys.argv[1:] if argv is None else argv),
        "conditions": {
            "omp_num_threads": 1,
            "steps": args.steps,
            "config": CONFIG,
            "origin": "replica 0 receives every /train",
            "skew_resolution_s": 0.001,
            "quiet": {"below": quiet.below, "wait_s": quiet.wait_s, "attempts": quiet.attempts},
        },
        "rows": rows,
    }
    out = args.out or ROOT / "bench" / "results" / f"replicas-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

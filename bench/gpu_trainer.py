"""The benchmark's training process: the real worker mapping and training step, beside the serving process.

    python bench/gpu_trainer.py --run-dir DIR

It maps the weights the serving process exported (`hogwild.worker.model.map_model`: CUDA IPC, HF module
over views), trains them in place with `hogwild.worker.trainer.Trainer` (APOLLO by default), and protects
serving with `hogwild.worker.protection` as the worker does (its gate, points and pieces, reading the server's
load hint); nothing of the product is patched. Commands: `start` (train in a loop on a thread until `stop`; micro-batch shape, duty cycle and
protection settings), `configure` (hot change of the protection while it trains), `rate` (tokens per second
over a window of the shared monotonic clock), `stop`, `exit`. The duty cycle rests after each step as
`Trainer.train` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from typing import Any

import torch

from gpu_common import now_s, serve_commands
from gpu_timeline import PointRecorder


def token_batch(
    micro_batch: int, seq: int, accumulation: int, vocab: int, device: torch.device, seed: int = 0
) -> Any:
    """One optimizer step's worth of random tokens (`accumulation` micro-batches), already on the device."""
    from hogwild.worker.batches import MicroBatch, StepBatch

    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    micro = []
    for _ in range(accumulation):
        ids = torch.randint(0, vocab, (micro_batch, seq), device=device, generator=generator)
        micro.append(MicroBatch(ids, ids, torch.ones_like(ids)))
    tokens = micro_batch * seq * accumulation
    return StepBatch(tuple(micro), tokens, (seq - 1) * micro_batch * accumulation, 0)


def build_trainer(mapped: Any, **config: Any) -> Any:
    from hogwild.config import config_from_dict
    from hogwild.worker.trainer import Trainer

    trainer = Trainer(config_from_dict(config))
    trainer.attach(mapped.module, None, int(mapped.module.config.vocab_size))
    return trainer


# GateStats fields that count since the gate started: `stop` reports what they counted in its run.
GATE_COUNTERS = ("points", "waits", "waited_s", "gave_up", "share_kept")


class TrainLoop:
    """The worker's training path as `hogwild.worker.service` wires it, in a loop: the trainer's preemption
    point is the serving gate's (`protection.serving_gate`: the load hint, waiting in the GPU stream where the
    driver allows), the points are installed as the worker's watcher installs them, and each candidate's
    protection settings are applied as a hot configure."""

    def __init__(self, args: argparse.Namespace) -> None:
        from hogwild.config import ServingProtection
        from hogwild.handles import read_manifest
        from hogwild.sharing import wait_for_manifest
        from hogwild.worker.model import map_model
        from hogwild.worker.protection import install_preemption_points, serving_gate

        if torch.cuda.is_available():
            torch.cuda.init()
        wait_for_manifest(args.run_dir, 300)
        manifest = read_manifest(args.run_dir)
        assert manifest is not None
        started = time.perf_counter()
        self.mapped = map_model(manifest)
        self.map_s = time.perf_counter() - started
        self.trainer = build_trainer(self.mapped, optimizer=args.optimizer, lr=1e-6, clip_grad_norm=1.0)
        self.gate = serving_gate(args.run_dir, ServingProtection())
        # Every point goes through the recorder, which only records while a `start(timeline=True)` runs.
        self.point = PointRecorder(self.gate.point, self.mapped.module, now_s)
        self.trainer.preemption_point = self.point
        self.remove_points = install_preemption_points(
            self.mapped.module, self.point, split_while=lambda: self.gate.settings.yield_when_busy
        )
        self.vocab = int(self.mapped.module.config.vocab_size)
        self.device = self.mapped.device
        self.thread: threading.Thread | None = None
        self.stop_event = threading.Event()
        self.completions: list[tuple[float, int]] = []
        self.counted_before: dict[str, float] = {}
        self.duty = 1.0
        self.error: str | None = None

    def ready(self) -> dict[str, Any]:
        return {"map_s": self.map_s, "params": sum(p.numel() for p in self.mapped.module.parameters())}

    def _protection(self, protection: dict[str, Any] | None) -> None:
        """`protection`: hogwild.config.ServingProtection fields, applied as the worker applies a configure."""
        from hogwild.config import validate_changes

        values = dict(protection or {})
        settings = validate_changes({"protection": values})["protection"]
        self.trainer.configure({"protection": values})
        self.gate.update(settings)
        self.duty = settings.max_duty_cycle

    def start(
        self,
        micro_batch: int,
        seq: int,
        accumulation: int,
        protection: dict[str, Any] | None = None,
        warmup_steps: int = 1,
        timeline: bool = False,
    ) -> dict[str, Any]:
        self.stop()
        self._protection(protection)
        self.point.clear()
        self.point.recording = timeline
        self.counted_before = {name: getattr(self.gate.stats, name) for name in GATE_COUNTERS}
        batch = token_batch(micro_batch, seq, accumulation, self.vocab, self.device)
        self.completions = []
        self.error = None
        self.stop_event = threading.Event()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(batch, warmup_steps, ready), daemon=True)
        self.thread.start()
        ready.wait(600)
        return {"started": True, "tokens_per_step": batch.tokens, "error": self.error}

    def _run(self, batch: Any, warmup_steps: int, ready: threading.Event) -> None:
        from hogwild.worker.trainer import duty_cycle_sleep_s

        try:
            for _ in range(warmup_steps):
                self.trainer.step(batch)
            ready.set()
            while not self.stop_event.is_set():
                stats = self.trainer.step(batch)
                self.gate.idle()  # as the worker's on_step: between steps the trainer is neither training nor held
                self.completions.append((now_s(), stats.tokens))
                rest = duty_cycle_sleep_s(stats.seconds, self.duty)
                if rest > 0:
                    self.stop_event.wait(rest)
        except Exception as err:  # reported through `rate` / `stop`
            import traceback

            traceback.print_exc()
            self.error = f"{type(err).__name__}: {err}"
        finally:
            ready.set()

    def configure(self, protection: dict[str, Any]) -> dict[str, Any]:
        self._protection(protection)
        return {"configured": True}

    def rate(self, begin: float, end: float) -> dict[str, Any]:
        inside = [(t, n) for t, n in self.completions if begin <= t <= end]
        if len(inside) >= 2:
            tokens = sum(n for _, n in inside[1:])
            tokens_per_s = tokens / (inside[-1][0] - inside[0][0])
        else:
            tokens_per_s = sum(n for _, n in inside) / (end - begin)
        return {"tokens_per_s": tokens_per_s, "steps": len(inside), "error": self.error}

    def timeline(self, begin: float, end: float) -> dict[str, Any]:
        """The preemption points passed in [begin, end] (`gpu_timeline.PointRecorder`); clears the record."""
        return {"points": self.point.take(begin, end)}

    def stop(self) -> dict[str, Any]:
        self.point.recording = False
        if self.thread is not None:
            self.stop_event.set()
            self.thread.join(600)
            self.thread = None
        stats = dataclasses.asdict(self.gate.stats)
        for name in GATE_COUNTERS:  # what the gate counted in this run
            stats[name] -= self.counted_before.get(name, 0)
        return {
            "steps": len(self.completions),
            "error": self.error,
            **{f"gate_{name}": value for name, value in stats.items()},
            "peak_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--optimizer", default="apollo")
    args = parser.parse_args(argv)
    loop = TrainLoop(args)
    serve_commands(
        {
            "start": loop.start,
            "stop": loop.stop,
            "rate": loop.rate,
            "configure": loop.configure,
            "timeline": loop.timeline,
        },
        loop.ready(),
    )
    loop.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

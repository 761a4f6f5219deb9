"""The benchmark's training process: the real worker mapping and training step, beside the serving process.

    python bench/gpu_trainer.py --run-dir DIR

It maps the weights the serving process exported (`hogwild.worker.model.map_model`: CUDA IPC, HF module
over views), trains them in place with `hogwild.worker.trainer.Trainer` (APOLLO by default), and protects
serving with `hogwild.worker.protection` (preemption points at layer boundaries, reading the server's load
hint). Commands: `start` (train in a loop on a thread until `stop`; micro-batch shape, duty cycle and
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
from collections.abc import Callable
from pathlib import Path
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


def preemptible_tail(trainer: Any, point: Callable[[], None], chunk: int = 32) -> Callable[[], None]:
    """Preemption points inside the step's tail (gradient clip, optimizer step). Returns an undo.

    Bench-only emulation of an API proposed to the trainer and optimizer owners: without it, the clip and
    the APOLLO step run as one unpreemptible piece of GPU work after the last backward point (~30 ms at
    1.5B, ~60 ms at 7B). Here a point comes before every `chunk` parameters of the clip and before each of
    APOLLO's same-shape buckets, by wrapping the instance's methods; the arithmetic is the same.
    """
    from hogwild.worker.protection.pieces import preemptible_clip

    optimizer = trainer.optimizer
    wrapped: list[str] = []
    for name in ("_apollo_update", "_adamw_update"):
        original = getattr(optimizer, name, None)
        if original is None:
            continue

        def with_point(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            point()
            return _original(*args, **kwargs)

        setattr(optimizer, name, with_point)
        wrapped.append(name)
    trainer._grad_norm_and_clip = lambda: preemptible_clip(
        [p for _, p in trainer.named_params], trainer.config.clip_grad_norm, point, chunk
    )

    def undo() -> None:
        for name in wrapped:
            delattr(optimizer, name)
        del trainer._grad_norm_and_clip

    return undo


def chunked_head(trainer: Any, point: Callable[[], None], rows: int = 1024) -> Callable[[], None]:
    """The output head and the loss in chunks of `rows` tokens, a preemption point before each. Returns an undo.

    Bench-only emulation of a proposed Trainer change. `Trainer.backward` computes [tokens, vocab] logits,
    their fp32 copy and the cross-entropy as one piece of GPU work (~10 ms at 1.5B and 4k tokens): longer
    than the serving step can absorb. Here the body runs once, the head and the loss run per chunk of rows
    on a detached copy of the last hidden state, and the body's backward takes the summed gradient: the
    same loss and gradients (summed in another order), and no full fp32 logits in memory.
    """
    from hogwild.worker.protection.pieces import chunked_head_backward

    def backward(batch: Any) -> float:
        device = trainer.named_params[0][1].device
        total = torch.zeros((), device=device)
        for micro in batch.micro_batches:
            ids, labels, mask = (t.to(device) for t in (micro.input_ids, micro.labels, micro.attention_mask))
            total += chunked_head_backward(trainer.module, ids, labels, mask, batch.targets, point, rows)
        return float(total)

    trainer.backward = backward

    def undo() -> None:
        del trainer.backward

    return undo


class TrainLoop:
    def __init__(self, args: argparse.Namespace) -> None:
        from hogwild.handles import read_manifest
        from hogwild.load_hint import HINT_NAME
        from hogwild.sharing import wait_for_manifest
        from hogwild.worker.model import map_model
        from hogwild.worker.protection import ServingGate, install_preemption_points
        from hogwild.worker.protection.probes import HintFileProbe

        if torch.cuda.is_available():
            torch.cuda.init()
        wait_for_manifest(args.run_dir, 300)
        manifest = read_manifest(args.run_dir)
        assert manifest is not None
        started = time.perf_counter()
        self.mapped = map_model(manifest)
        self.map_s = time.perf_counter() - started
        self.trainer = build_trainer(self.mapped, optimizer=args.optimizer, lr=1e-6, clip_grad_norm=1.0)
        self.run_dir = args.run_dir
        self.gate = ServingGate(HintFileProbe(Path(args.run_dir) / HINT_NAME))
        # Every point goes through the recorder, which only records while a `start(timeline=True)` runs.
        self.point = PointRecorder(self.gate.point, self.mapped.module, now_s)
        self.granularity = ("layer", True, True)
        self.remove_points = install_preemption_points(self.mapped.module, self.point, "layer")
        self.remove_tail: Callable[[], None] | None = None
        self.remove_head: Callable[[], None] | None = None
        self.vocab = int(self.mapped.module.config.vocab_size)
        self.device = self.mapped.device
        self.thread: threading.Thread | None = None
        self.stop_event = threading.Event()
        self.completions: list[tuple[float, int]] = []
        self.duty = 1.0
        self.error: str | None = None

    def ready(self) -> dict[str, Any]:
        return {"map_s": self.map_s, "params": sum(p.numel() for p in self.mapped.module.parameters())}

    def _protection(self, protection: dict[str, Any] | None) -> None:
        """Bench-only keys: `native` (the worker's own pieces, see below); `granularity` "layer" | "linear" (the gate's preemption points) or "step"
        (Trainer's own yield before a step); `tail` (points inside the clip and the optimizer step);
        `chunked_head` (the output head and the loss in preemptible chunks); `embed_point` (a point before
        the input embedding, default on); `depth` (chunks allowed in flight; default: the gate's adaptive depth);
        `queue_budget_ms` (the adaptive depth's budget; default protection.QUEUE_BUDGET_S); `split_matmuls`
        (projections above preemptible_linear.PIECE_FLOPS in pieces, default on as in the worker). A native
        candidate waits in the GPU stream (hogwild.worker.protection.device) as the worker does, unless its
        `gpu_wait` setting is off."""
        from hogwild.config import ServingProtection, validate_changes
        from hogwild.worker.protection import install_preemption_points
        from hogwild.worker.protection.gate import QUEUE_BUDGET_S

        values = dict(protection or {})
        native = bool(values.pop("native", False))
        granularity = values.pop("granularity", "linear" if native else "layer")
        tail = bool(values.pop("tail", False))
        head = bool(values.pop("chunked_head", False))
        embeddings = bool(values.pop("embed_point", True))
        depth = values.pop("depth", None)  # chunks in flight; default: the gate's own (ChunkQueue)
        self.gate.queue.fixed_depth = None if depth is None else int(depth)
        budget_ms = values.pop("queue_budget_ms", None)
        self.gate.queue.budget_s = QUEUE_BUDGET_S if budget_ms is None else float(budget_ms) / 1e3
        split = bool(values.pop("split_matmuls", True))
        settings = validate_changes({"protection": values})["protection"]
        self._device_wait(native and settings.gpu_wait)
        self.trainer.configure({"protection": values})
        # `native`: the worker's own path, as `hogwild.worker.service` wires it: the gate's point is the
        # trainer's, so with yield_when_busy the head and loss, the clip and the optimizer step run in
        # pieces (`hogwild.worker.protection.pieces`) with no bench emulation.
        self.trainer.preemption_point = self.point if native else None
        if granularity == "step":
            self.trainer.serving_busy = self.gate.busy
            self.gate.update(ServingProtection(yield_when_busy=False))
        else:
            self.trainer.serving_busy = None
            self.gate.update(settings)
            if (granularity, embeddings, split) != self.granularity:
                self.remove_points()
                self.remove_points = install_preemption_points(
                    self.mapped.module,
                    self.point,
                    granularity,
                    embeddings,
                    split,
                    split_while=lambda: self.gate.settings.yield_when_busy,  # as the worker's watcher
                )
                self.granularity = (granularity, embeddings, split)
        if self.remove_tail is not None:
            self.remove_tail()
            self.remove_tail = None
        if tail:
            self.remove_tail = preemptible_tail(self.trainer, self.point)
        if self.remove_head is not None:
            self.remove_head()
            self.remove_head = None
        if head:
            self.remove_head = chunked_head(self.trainer, self.point)
        self.duty = settings.max_duty_cycle

    def _device_wait(self, wanted: bool) -> None:
        from hogwild.load_hint import HINT_NAME
        from hogwild.worker.protection.device import try_device_gate

        if wanted and self.gate.device is None:
            device = try_device_gate(Path(self.run_dir) / HINT_NAME, self.gate.settings, self.gate.stats)
            if device is None:
                raise RuntimeError("device_wait: the GPU-side gate could not start here (see the log)")
            self.gate.use_device(device)
        elif not wanted and self.gate.device is not None:
            self.gate.device.close(torch.cuda.synchronize)
            self.gate.use_device(None)

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
        stats = self.gate.stats
        out = {
            "steps": len(self.completions),
            "error": self.error,
            **{f"gate_{name}": value for name, value in dataclasses.asdict(stats).items()},
            "peak_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
        }
        self.gate.stats = type(stats)()
        if self.gate.device is not None:
            self.gate.device.stats = self.gate.stats
        return out


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

"""The in-place training step over the served weights, hot reconfiguration, and the optimizer state.

One `Trainer` lives as long as the worker. It trains whatever module is attached (the HF module over vLLM's
weights, see `model`); when the exporter restarts, the service attaches the new mapping and the optimizer is
rebuilt over the new parameters. `lock` guards the weights and the optimizer: a step (forward, backward,
optimizer step), a checkpoint and a restore each hold it, so none of them sees the others half done.
Serving never takes it: vLLM reads the weights while they change, which is the point (HOGWILD).

A step whose loss or gradient is not finite is skipped before the optimizer runs: the weights stay bit for
bit what they were, and the skip is counted. Hyperparameter changes apply between steps; those in
`STATE_RESET_FIELDS` replace the optimizer (its state is gone, and the reply says so).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hogwild.config import TrainingConfig, apply_changes, config_to_dict
from hogwild.faults import fault_point
from hogwild.optim import factory
from hogwild.protocol import ConfigureReply, ProtocolError, Sample, TrainRequest, TrainSteps
from hogwild.worker import batches, protection
from hogwild.worker.batches import Encoded, StepBatch

log = logging.getLogger("hogwild.worker")

STATE_FORMAT = 1


def build_optimizer(
    named_params: Sequence[tuple[str, torch.Tensor]], config: TrainingConfig
) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names, over the model's param groups (hogwild.optim's factory).

    No fallback to torch's AdamW: an import error in hogwild.optim must fail loudly, not train on quietly with
    another optimizer whose state a checkpoint would then carry."""
    return factory.build_optimizer(factory.param_groups(named_params), config)


def duty_cycle_sleep_s(compute_s: float, max_duty_cycle: float) -> float:
    """How long to rest after `compute_s` of work so that work takes at most `max_duty_cycle` of wall time."""
    if max_duty_cycle >= 1.0 or compute_s <= 0.0:
        return 0.0
    return compute_s * (1.0 / max_duty_cycle - 1.0)


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class StepStats:
    step: int  # global optimizer step after this one
    loss: float
    grad_norm: float
    update_norm: float
    tokens: int
    targets: int
    truncated_tokens: int
    skipped: bool
    seconds: float


@dataclass
class TrainResult:
    step: int = 0
    losses: list[float | None] = field(default_factory=list)
    tokens: int = 0
    skipped: int = 0
    truncated_tokens: int = 0
    stopped: str | None = None  # "paused" when a pause ended the request early

    def reply(self) -> TrainSteps:
        finite = [x for x in self.losses if x is not None]
        return {
            "step": self.step,
            "loss": finite[-1] if finite else None,
            "losses": self.losses,
            "tokens": self.tokens,
            "skipped": self.skipped,
            "steps": len(self.losses),
            "truncated_tokens": self.truncated_tokens,
            "stopped": self.stopped,
        }


@dataclass
class Counters:
    step: int = 0
    tokens_trained: int = 0
    skipped_steps: int = 0
    loss: float | None = None


class Trainer:
    def __init__(self, config: TrainingConfig, *, on_step: Callable[[StepStats], None] | None = None) -> None:
        self.config = config
        self.counters = Counters()
        self.lock = threading.RLock()  # weights + optimizer; see the module docstring
        self._config_lock = threading.Lock()
        # A lock is not fair: a train loop re-takes it between steps before a waiting checkpoint wakes up.
        # `exclusive()` registers the waiter, and a step does not start while one waits.
        self._turn = threading.Condition()
        self._waiters = 0
        self._on_step = on_step
        self._pending_hot: dict[str, Any] = {}
        self._pending_reset = False
        self.module: Any = None
        self.tokenizer: Any = None
        self.vocab_size = 0
        self.max_positions: int | None = None
        self.named_params: list[tuple[str, torch.Tensor]] = []
        self.optimizer: torch.optim.Optimizer | None = None
        # The serving gate's preemption point (the service sets it). While protection.yield_when_busy is on,
        # the pieces no module hook cuts (head and loss, clip, optimizer step) run in chunks with it between.
        self.preemption_point: Callable[[], None] | None = None
        # Replicas (hogwild.worker.group): this rank's share of every step's samples, and the collective that
        # sums (loss, tokens) and the gradients over the group between backward and the optimizer step.
        self.shard: tuple[int, int] = (0, 1)
        self.sum_gradients: Callable[[float, int], tuple[float, int]] | None = None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the weights still (checkpoint, restore, re-map): waits for the running step, then goes first."""
        with self._turn:
            self._waiters += 1
        try:
            with self.lock:
                yield
        finally:
            with self._turn:
                self._waiters -= 1
                self._turn.notify_all()

    # ---- attaching a model -----------------------------------------------------------------------------
    def attach(self, module: Any, tokenizer: Any, vocab_size: int) -> None:
        """Train `module` from now on, with a fresh optimizer (state is reloaded by the caller if wanted)."""
        with self.lock:
            self.module, self.tokenizer, self.vocab_size = module, tokenizer, vocab_size
            # Positions past these have no embedding (learned) or were never trained (rotary): never train them.
            positions = getattr(getattr(module, "config", None), "max_position_embeddings", None)
            self.max_positions = positions if isinstance(positions, int) and positions > 0 else None
            self.named_params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            self.optimizer = build_optimizer(self.named_params, self.config)
            self._pending_hot, self._pending_reset = {}, False

    def detach(self) -> None:
        with self.lock:
            for _, param in self.named_params:
                param.grad = None  # the optimizer's gradient buffers go with it (see `step`)
            self.module = self.tokenizer = self.optimizer = None
            self.named_params = []

    @property
    def attached(self) -> bool:
        return self.module is not None

    # ---- configuration ---------------------------------------------------------------------------------
    def configure(self, changes: Mapping[str, Any]) -> ConfigureReply:
        """Apply hyperparameter changes: now if no step runs, else before the next one. Raises ConfigError."""
        with self._config_lock:
            new, reset = apply_changes(self.config, changes)
            changed = {k: getattr(new, k) for k in changes if getattr(new, k) != getattr(self.config, k)}
            self.config = new
            self._pending_reset |= reset
            self._pending_hot.update(changed)
        if self.lock.acquire(blocking=False):
            try:
                self._sync_optimizer()
            finally:
                self.lock.release()
        return {"applied": sorted(changed), "state_reset": reset, "config": config_to_dict(new)}

    def _sync_optimizer(self) -> None:
        """Bring the optimizer up to the config (call with `lock` held)."""
        with self._config_lock:
            hot, reset = self._pending_hot, self._pending_reset
            self._pending_hot, self._pending_reset = {}, False
        if self.module is None:
            return
        if reset or self.optimizer is None:
            self.optimizer = build_optimizer(self.named_params, self.config)
            log.info(
                "optimizer state reset",
                extra={"event": "optimizer_reset", "optimizer": self.config.optimizer},
            )
        elif hot:
            factory.apply_hot_update(self.optimizer, hot)

    # ---- one step ---------------------------------------------------------------------------------------
    def encode(self, samples: Sequence[Sample]) -> list[Encoded]:
        return [batches.encode_sample(self.tokenizer, s, self.vocab_size) for s in samples]

    def _point(self) -> Callable[[], None] | None:
        """The preemption point for the step's own pieces, or None: run them whole (see `protection.pieces`)."""
        return self.preemption_point if self.config.protection.yield_when_busy else None

    def backward(self, batch: StepBatch) -> float:
        """Forward and backward over every micro-batch; gradients sum to those of the mean loss. Returns it."""
        device = self.named_params[0][1].device
        point = self._point()
        total = torch.zeros((), dtype=torch.float64, device=device)  # read once: no sync per micro-batch
        for micro in batch.micro_batches:
            total += protection.micro_batch_backward(self.module, micro, batch.targets, device, point)
        return float(total)

    def _grad_norm_and_clip(self) -> float:
        params = [p for _, p in self.named_params]
        return protection.grad_norm_and_clip(params, self.config.clip_grad_norm, self._point())

    def _optimizer_step_with_update_norm(self) -> float:
        assert self.optimizer is not None
        # APOLLO takes a point between its buckets; torch's AdamW runs whole.
        if hasattr(self.optimizer, "preemption_point"):
            self.optimizer.preemption_point = self._point()
        sample = protection.UpdateNormSample([p for _, p in self.named_params], self._point())
        self.optimizer.step()
        return sample.norm()

    def step(self, batch: StepBatch) -> StepStats:
        """One optimizer step on the shared weights (or a counted skip when the loss/gradient is not finite)."""
        with self._turn:
            self._turn.wait_for(lambda: self._waiters == 0)
        with self.lock:
            if self.module is None:
                raise ProtocolError("not_connected", "the weights are not mapped (the exporter is gone)")
            started = time.perf_counter()
            self._sync_optimizer()
            assert self.optimizer is not None
            # APOLLO batches its step when a same-shape bucket's gradients lie in one buffer (prepare_grads,
            # for its smaller weights): it zeroes those buffers instead of freeing the gradients, so they stay
            # allocated between steps (2 bytes per element of those bf16 weights: what their gradients take
            # during a step anyway). After the step, release_grads frees the other gradients.
            prepare_grads = getattr(self.optimizer, "prepare_grads", None)
            if prepare_grads is not None:
                prepare_grads()
            else:
                self.optimizer.zero_grad(set_to_none=True)
            loss = self.backward(batch)
            tokens = batch.tokens
            if self.sum_gradients is not None:  # every rank leaves with the group's loss and gradients
                loss, tokens = self.sum_gradients(loss, tokens)
            grad_norm = self._grad_norm_and_clip()
            skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
            update_norm = 0.0 if skipped else self._optimizer_step_with_update_norm()
            if prepare_grads is None:
                self.optimizer.zero_grad(set_to_none=True)
            else:
                self.optimizer.release_grads()  # type: ignore[attr-defined]
            if batch.micro_batches and self.named_params[0][1].is_cuda:
                torch.cuda.synchronize()
            c = self.counters
            if skipped:
                c.skipped_steps += 1
                log.warning(
                    "skipped a step: loss or gradient not finite",
                    extra={"event": "step_skipped", "loss": loss},
                )
            else:
                c.step += 1
                c.tokens_trained += tokens
                c.loss = loss
                # The moment this step's update is in the served weights: bench/replicas.py compares it
                # across the replicas of a group (how long they may differ after a step).
                log.debug("step applied", extra={"event": "step_applied", "step": c.step})
            stats = StepStats(
                c.step,
                loss,
                grad_norm,
                update_norm,
                tokens,
                batch.targets,
                batch.truncated_tokens,
                skipped,
                time.perf_counter() - started,
            )
        if self._on_step:
            self._on_step(stats)
        # Crash tests: die with this step in the served weights, before any reply acknowledges it.
        fault_point("train.after_step")
        return stats

    # ---- a train request ---------------------------------------------------------------------------------
    def train(
        self, request: TrainRequest, *, should_stop: Callable[[], str | None], rest: Callable[[float], object]
    ) -> TrainResult:
        """Run the request's steps. `should_stop` may raise ProtocolError (timeout) or return a reason to stop."""
        if not self.attached:
            raise ProtocolError("not_connected", "the weights are not mapped yet")
        encoded = self.encode(request.samples)
        result = TrainResult(step=self.counters.step)
        for index in range(request.steps):
            reason = should_stop()
            if reason:
                result.stopped = reason
                break
            config = self.config
            batch = batches.step_batch(
                encoded,
                max_tokens=config.max_tokens_per_step,
                grad_accumulation=config.grad_accumulation,
                pad_id=batches.pad_id_of(self.tokenizer),
                max_positions=self.max_positions,
                shard=self.shard,
            )
            stats = self.step(batch)
            result.step = stats.step
            result.losses.append(None if stats.skipped else finite_or_none(stats.loss))
            result.skipped += int(stats.skipped)
            result.tokens += 0 if stats.skipped else stats.tokens
            result.truncated_tokens += stats.truncated_tokens
            wait_s = duty_cycle_sleep_s(stats.seconds, config.protection.max_duty_cycle)
            if wait_s > 0 and index + 1 < request.steps:
                rest(wait_s)
        return result

    # ---- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state + counters + config: tensors and plain values only (torch.load weights_only)."""
        with self.lock:
            self._sync_optimizer()
            c = self.counters
            return {
                "format": STATE_FORMAT,
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "counters": {
                    "step": c.step,
                    "tokens_trained": c.tokens_trained,
                    "skipped_steps": c.skipped_steps,
                    "loss": c.loss,
                },
                "config": config_to_dict(self.config),
                "param_names": [n for n, _ in self.named_params],
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> bool:
        """Restore counters, and the optimizer state if it fits (same parameters, same state-shaping config).

        Returns whether the optimizer state was loaded.
        """
        with self.lock:
            counters = state.get("counters") or {}
            self.counters = Counters(
                int(counters.get("step", 0)),
                int(counters.get("tokens_trained", 0)),
                int(counters.get("skipped_steps", 0)),
                counters.get("loss"),
            )
            reason = self._incompatible(state)
            if reason:
                log.warning(
                    "optimizer state not restored: %s", reason, extra={"event": "optimizer_state_skipped"}
                )
                self.optimizer = (
                    build_optimizer(self.named_params, self.config) if self.module is not None else None
                )
                return False
            self.optimizer = build_optimizer(self.named_params, self.config)
            self.optimizer.load_state_dict(state["optimizer"])
            return True

    def adopt(self, state: Mapping[str, Any]) -> bool:
        """Take another replica's config, counters and optimizer state (a group forming: hogwild.worker.group).

        The config comes first, so the optimizer is rebuilt the way the state was made. Returns whether the
        optimizer state was loaded."""
        from hogwild.config import config_from_dict

        with self.lock:
            with self._config_lock:
                self.config = config_from_dict(state.get("config") or {})
                self._pending_hot, self._pending_reset = {}, False
            return self.load_state_dict(state)

    def reset(self) -> None:
        """Zero the counters and start a fresh optimizer: the weights hold no saved training."""
        with self.lock:
            self.counters = Counters()
            self.optimizer = (
                build_optimizer(self.named_params, self.config) if self.module is not None else None
            )

    def _incompatible(self, state: Mapping[str, Any]) -> str | None:
        from hogwild.config import STATE_RESET_FIELDS, config_from_dict

        if self.module is None:
            return "no model attached"
        if state.get("format") != STATE_FORMAT or state.get("optimizer") is None:
            return "no optimizer state in it"
        if list(state.get("param_names") or []) != [n for n, _ in self.named_params]:
            return "it was saved for different parameters"
        saved = config_from_dict(state.get("config") or {})
        differ = sorted(f for f in STATE_RESET_FIELDS if getattr(saved, f) != getattr(self.config, f))
        return f"it was made with different {', '.join(differ)}" if differ else None

    @property
    def optimizer_state_bytes(self) -> int:
        return 0 if self.optimizer is None else factory.state_bytes(self.optimizer)

"""Serving protection: the trainer computes only while the server is idle, and yields within a step.

Why not leave it to the GPU: without MPS, kernels of two processes never overlap; the GPU time-slices between
the contexts, and stream priorities do not cross them (FACTS.md, "Training beside serving"). A trainer that
keeps the GPU busy makes every serving step wait for its share of time slices, and sleeping between whole
steps (a duty cycle) only makes fewer serving steps slow, not the slow ones faster. What works is not to have
training work running when a serving step arrives:

- The server publishes how many requests it has in flight in a small shared file, or the worker polls
  vLLM's `/metrics` (`hogwild.worker.serving_load`).
- `ServingGate.point()` is a preemption point. `install_preemption_points` puts one before the forward and
  the backward of the input embedding, every decoder layer, every projection inside it, and the output head,
  so training work is cut into chunks of about a millisecond; a projection whose matmul is larger than that
  (7B's MLP, the head's chunks) also runs in pieces with a point before each (`preemptible_linear`).
- At a point the trainer waits while the server reports requests in flight, up to `max_wait_s` per point.
  Where it can (`settings.gpu_wait`, a hint file, CUDA), it waits in the GPU: the point enqueues a stream wait
  on the hint's gate word (`hogwild.worker.device_gate`) and the host goes on launching. Otherwise it waits
  here on the host: first until at most ~QUEUE_BUDGET_S of its work is left queued on the GPU (`ChunkQueue`),
  then it launches nothing while the server is busy. A server that is never idle (continuous batching under
  steady traffic) would then slow training to a trickle, so the gate also keeps `min_training_share` of the
  trainer's own time for training: a token bucket (`hogwild.worker.training_share`) that running fills and
  holding drains; the gate holds only while it has credit. The time between steps counts as neither (`idle`).
- Some pieces of a training step are long and outside any module: the output head with the loss over the
  whole vocabulary, the gradient clip, and the update norm's weight sample. `hogwild.worker.pieces` computes
  the same things in preemptible pieces, and APOLLO has a point between its buckets.

Measured on an H100 (bench/RESULTS.md), half-capacity load: waiting in the GPU, serving p99 rose 1.06-1.09x at
1.5B and 1.13-1.14x at 7B while training kept 0.57-0.62 and 0.49-0.50 of its idle-server speed; waiting on the
host, 1.11-1.12x and 1.17-1.19x, kept 0.42-0.50 and 0.49-0.51. Layer-level points alone gave about 2x, a 50 %
duty cycle 7x, and no protection let the serving queue grow without bound.

Settings come from `hogwild.config.ServingProtection` and apply hot (`ServingGate.update`). With
`yield_when_busy` off, a point costs one Python call and does nothing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hogwild.config import ServingProtection
from hogwild.worker import preemptible_linear
from hogwild.worker.serving_load import LoadProbe
from hogwild.worker.training_share import TrainingShare

if TYPE_CHECKING:  # device_gate imports this module
    from hogwild.worker.device_gate import DeviceGate

log = logging.getLogger("hogwild.worker")

POLL_S = 0.0002
# GPU time of training work the gate lets be queued at a point (ChunkQueue): what a serving step that
# arrives then may have to wait behind. From 1 to MAX_DEPTH chunks.
QUEUE_BUDGET_S = 0.002
MAX_DEPTH = 4
# Time between two points longer than this is not training (a pause the trainer's caller took, not a chunk).
IDLE_GAP_S = 1.0
# How often a gate without its GPU-side wait tries again to set one up (the hint file may not exist yet).
DEVICE_RETRY_S = 10.0


@dataclass
class GateStats:
    points: int = 0
    waits: int = 0
    waited_s: float = 0.0
    gave_up: int = 0  # waits that ended at max_wait_s with the server still busy
    share_kept: int = 0  # waits limited (or skipped) to keep min_training_share of the time for training
    training_share: float = 1.0  # the share of its recent time the trainer kept (ran / (ran + held))
    training_share_floor: float = 0.0  # min_training_share while protection is on, else 0
    gpu_wait_error: str = ""  # why the GPU-side wait could not start or stopped ("" while it never failed)


class ChunkQueue:
    """The training chunks launched but maybe not yet run on the GPU, bounded by their measured GPU time.

    At each point `mark` ends the chunk launched since the previous point with an event, then waits for the
    oldest chunks until at most `depth() - 1` are unfinished, so the one launched next makes `depth()`. The
    depth is QUEUE_BUDGET_S over the chunks' recent GPU time (an average of the time between the events of
    consecutive points), from 1 to MAX_DEPTH; `fixed_depth` overrides it.

    Why not a fixed count: two chunks in flight was ~0.3 ms of queued work at 1.5B but ~3 ms at 7B (one
    backward projection is ~1.5 ms there), and a serving step that arrived behind them lost about twice that
    to time-slicing (bench --timeline). Where chunks are short, a deeper queue keeps the GPU fed while the
    host reaches the next point.
    """

    def __init__(
        self,
        budget_s: float = QUEUE_BUDGET_S,
        fixed_depth: int | None = None,
        new_event: Callable[[], Any] = lambda: torch.cuda.Event(enable_timing=True),
    ) -> None:
        self.budget_s = budget_s
        self.fixed_depth = fixed_depth
        self.chunk_s = 0.0  # recent GPU time of a chunk; 0 until measured
        self._new_event = new_event
        self._pending: deque[tuple[Any, bool]] = deque()  # (event, the chunk before it began after a wait)
        self._last_done: Any = None
        self._after_wait = False

    def depth(self) -> int:
        if self.fixed_depth is not None:
            return max(1, self.fixed_depth)
        if self.chunk_s <= 0.0:
            return 2
        return max(1, min(MAX_DEPTH, int(self.budget_s / self.chunk_s)))

    def waited(self) -> None:
        """The point waited after `mark`: the next chunk's event-to-event time would hold the wait."""
        self._after_wait = True

    def mark(self) -> None:
        event = self._new_event()
        event.record()
        self._pending.append((event, self._after_wait))
        self._after_wait = False
        while len(self._pending) > self.depth() - 1:
            done, after_wait = self._pending.popleft()
            done.synchronize()
            if self._last_done is not None and not after_wait:
                # Capped: a gap between steps (host work, a sync) is not a chunk's length.
                sample = min(self._last_done.elapsed_time(done) / 1e3, 4 * self.budget_s)
                self.chunk_s = sample if self.chunk_s == 0.0 else 0.8 * self.chunk_s + 0.2 * sample
            self._last_done = done


class ServingGate:
    """Preemption points for the training step; see the module docstring."""

    def __init__(
        self,
        probe: LoadProbe | None,
        settings: ServingProtection | None = None,
        queue: ChunkQueue | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        device_factory: Callable[[], DeviceGate | None] | None = None,
    ) -> None:
        self.probe = probe
        self.settings = settings or ServingProtection()
        self.queue = queue or ChunkQueue()
        self.stats = GateStats()
        self._set_floor(self.settings)
        # Where set (`use_device`, or made by `device_factory` on a point while settings.gpu_wait), points wait
        # in the GPU stream instead (hogwild.worker.device_gate). The factory returns None while it cannot
        # start yet (tried again after DEVICE_RETRY_S) and raises where it never can (then the host it is).
        self.device: DeviceGate | None = None
        self._device_factory = device_factory
        self._device_retry_at = 0.0
        self._clock, self._sleep = clock, sleep
        self.share = TrainingShare(self.settings.min_training_share, clock())  # on the host path
        self._last: float | None = None  # when the trainer left its last point; None between steps

    def update(self, settings: ServingProtection) -> None:
        """Hot change: the next point uses the new settings."""
        self.settings = settings
        self.share.set_floor(settings.min_training_share)
        self._set_floor(settings)
        if self.device is not None:
            self.device.update(settings)

    def _set_floor(self, settings: ServingProtection) -> None:
        self.stats.training_share_floor = settings.min_training_share if settings.yield_when_busy else 0.0

    def idle(self) -> None:
        """The trainer finished a step: the time until its next point is not training (nor held)."""
        self._ran_until(self._clock())
        self._last = None
        if self.device is not None:
            self.device.idle()

    def _ran_until(self, now: float) -> None:
        if self._last is not None and now - self._last <= IDLE_GAP_S:
            self.share.ran(now - self._last, now)
        self.stats.training_share = self.share.delivered(now)

    def _start_device(self) -> DeviceGate | None:
        if self._device_factory is None or self._clock() < self._device_retry_at:
            return None
        self._device_retry_at = self._clock() + DEVICE_RETRY_S
        try:
            device = self._device_factory()
        except Exception as err:  # the driver, the file or the writer cannot support it: keep the host gate
            log.warning("serving protection waits on the host: the GPU-side wait cannot start (%s)", err)
            self.stats.gpu_wait_error = f"cannot start: {err}"
            self._device_factory = None
            return None
        if device is not None:
            log.info("serving protection waits in the GPU stream", extra={"event": "device_gate"})
            self.use_device(device)
        return device

    def close(self) -> None:
        """Let any wait enqueued in the GPU through and release the GPU-side gate (at shutdown)."""
        if self.device is not None:
            self.device.close(torch.cuda.synchronize if torch.cuda.is_available() else lambda: None)
            self.device = None

    def use_device(self, device: DeviceGate | None) -> None:
        """Wait in the GPU stream from the next point on (None: on the host again)."""
        self.device = device
        if device is not None:
            device.update(self.settings)

    def busy(self) -> bool:
        return self.probe is not None and self.probe.busy()

    def point(self) -> None:
        if not self.settings.yield_when_busy or self.probe is None:
            return
        if self.settings.gpu_wait:
            device = self.device or self._start_device()
            if device is not None:
                try:
                    device.wait_here()
                    return
                except Exception as err:  # a driver error mid-run: on the host from here on, never stuck
                    log.warning(
                        "serving protection goes back to the host: the GPU-side wait failed (%s)", err
                    )
                    self.stats.gpu_wait_error = f"failed: {err}"
                    self._device_factory = None
                    self.close()
        self.stats.points += 1
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.queue.mark()
        started = self._clock()
        self._ran_until(started)  # since the last point: a chunk of training
        self._last = started
        if not self.probe.busy():
            return
        allowed = min(self.settings.max_wait_s, self.share.hold_allowed_s())
        if allowed < self.settings.max_wait_s:
            self.stats.share_kept += 1
            if allowed <= 0.0:
                return
        deadline = started + allowed
        while self.probe.busy():
            if self._clock() >= deadline:
                if allowed >= self.settings.max_wait_s:  # else the share cut it short (counted above)
                    self.stats.gave_up += 1
                break
            self._sleep(POLL_S)
        ended = self._clock()
        self.share.held(ended - started, ended)
        self.stats.training_share = self.share.delivered(ended)
        self._last = ended
        self.queue.waited()
        self.stats.waits += 1
        self.stats.waited_s += ended - started


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of an HF causal LM (`model.layers`), else the longest ModuleList."""
    inner = getattr(module, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return list(layers)
    lists = [list(m) for m in module.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else []


def _first_grad_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_grad_tensor(item)
            if found is not None:
                return found
    return None


GRANULARITIES = ("layer", "linear")


def preemption_blocks(
    module: torch.nn.Module, granularity: str = "linear", embeddings: bool = True
) -> list[torch.nn.Module]:
    """Where the points go: the input embedding, each decoder layer (and, with "linear", each linear layer
    inside it), then the head.

    The embedding matters in backward: its gradient is a dense [vocab, hidden] tensor whatever the batch
    size (~2 ms at 1.5B), work that otherwise runs unannounced at the end of every micro-batch.

    A chunk of training work is what runs between two points: one decoder layer of one micro-batch, or one
    projection of it (at 7B and 4k tokens, ~2.6 ms forward for a layer, ~0.8 ms for one MLP projection).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    blocks: list[torch.nn.Module] = []
    get_embeddings = getattr(module, "get_input_embeddings", None)
    embedding = get_embeddings() if callable(get_embeddings) else None
    if embeddings and isinstance(embedding, torch.nn.Module):
        blocks.append(embedding)
    for layer in decoder_layers(module):
        blocks.append(layer)
        if granularity == "linear":
            blocks.extend(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
    head = getattr(module, "lm_head", None)
    if isinstance(head, torch.nn.Module):
        blocks.append(head)
    return blocks


def install_preemption_points(
    module: torch.nn.Module,
    point: Callable[[], None],
    granularity: str = "linear",
    embeddings: bool = True,
    split_matmuls: bool = True,
    split_while: Callable[[], bool] = lambda: True,
) -> Callable[[], None]:
    """Call `point` before each block's forward and before its backward (see `preemption_blocks`); with
    "linear" granularity and `split_matmuls`, a projection's matmuls above `preemptible_linear.PIECE_FLOPS`
    also run in pieces with a point before each (7B's MLP projections; none at 1.5B), on the calls made while
    `split_while()` (the worker passes "serving protection is on").

    Returns a function that removes them again.
    """

    def before_forward(_module: torch.nn.Module, _args: Any) -> None:
        point()

    def after_forward(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        tensor = _first_grad_tensor(output)
        if tensor is not None and torch.is_grad_enabled():
            # Runs when the gradient of this block's output is ready: just before the block's backward.
            tensor.register_hook(_backward_point(point))

    handles: list[Any] = []
    blocks = preemption_blocks(module, granularity, embeddings)
    for block in blocks:
        handles.append(block.register_forward_pre_hook(before_forward))
        handles.append(block.register_forward_hook(after_forward))
    # The head too: a 512-row chunk of it (pieces.chunked_head_backward) is ~0.8 ms a matmul at 7B.
    linears = [b for b in blocks if isinstance(b, torch.nn.Linear)]
    splits = split_matmuls and granularity == "linear"
    unsplit = preemptible_linear.install(linears, point, split_while) if splits else None

    def remove() -> None:
        for handle in handles:
            handle.remove()
        if unsplit is not None:
            unsplit()

    return remove


def _backward_point(point: Callable[[], None]) -> Callable[[torch.Tensor], None]:
    def hook(_grad: torch.Tensor) -> None:
        point()

    return hook

"""Serving protection: training yields to serving inside every step, and keeps a guaranteed share of its time.

Why not leave it to the GPU: without MPS, kernels of two processes never overlap; the GPU time-slices between
the contexts, and stream priorities do not cross them (docs/facts.md, "Training beside serving"). A trainer
that keeps the GPU busy makes every serving step wait for its share of time slices, and sleeping between whole
steps (a duty cycle) only makes fewer serving steps slow, not the slow ones faster. What works is not to have
training work running when a serving step arrives:

- The server publishes how many requests it has in flight in the load-hint file (`hogwild.load_hint`), or the
  worker polls vLLM's `/metrics` (`probes`).
- Preemption points (`points`) before the forward and the backward of the input embedding, every decoder
  layer, every projection inside it and the output head cut training work into chunks of about a
  millisecond; a projection whose matmul is larger than that runs in pieces with a point before each
  (`preemptible_linear`), and so do the pieces of a step that no module hook cuts: the head with the loss, the
  clip, the update norm's sample (`pieces`).
- At a point the gate (`gate.ServingGate`) holds training while the server reports requests in flight, up to
  `max_wait_s` per point: on the host, or in the GPU stream itself where the driver allows (`device`: the host
  keeps launching and the GPU resumes microseconds after the server goes idle).
- A server that never idles (continuous batching under steady traffic) would starve training, so the gate
  holds only while a token bucket of the trainer's own time has credit (`share`): training keeps
  `min_training_share` of it.

Settings come from `hogwild.config.ServingProtection` and apply hot (`ServingGate.update`). With
`yield_when_busy` off, a point costs one Python call and does nothing. The rest of the worker uses the names
below; the modules are this package's own.
"""

from __future__ import annotations

import os
from pathlib import Path

from hogwild.config import ServingProtection
from hogwild.load_hint import HINT_NAME
from hogwild.worker.protection.device import try_device_gate
from hogwild.worker.protection.gate import GateStats, ServingGate
from hogwild.worker.protection.pieces import UpdateNormSample, grad_norm_and_clip, micro_batch_backward
from hogwild.worker.protection.points import decoder_layers, install_preemption_points
from hogwild.worker.protection.probes import HintFileProbe, default_probe

__all__ = [
    "GateStats",
    "ServingGate",
    "UpdateNormSample",
    "decoder_layers",
    "grad_norm_and_clip",
    "install_preemption_points",
    "micro_batch_backward",
    "serving_gate",
]


def serving_gate(
    run_dir: str | os.PathLike[str], settings: ServingProtection, metrics_url: str | None = None
) -> ServingGate:
    """The worker's gate: it reads the run dir's load hint (else vLLM's metrics at `metrics_url`), and waits in
    the GPU stream once the hint file is there and the driver allows (vLLM's /metrics has no gate word)."""
    probe = default_probe(run_dir, metrics_url)
    hint = Path(run_dir) / HINT_NAME
    gate = ServingGate(probe, settings)
    if isinstance(probe, HintFileProbe):
        gate.device_factory = lambda: try_device_gate(hint, gate.settings, gate.stats)
    return gate

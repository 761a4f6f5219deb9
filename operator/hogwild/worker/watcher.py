"""Following vLLM's weight export: map the served weights, re-map them when vLLM restarts, let go when it dies.

vLLM writes the weight-handle manifest (hogwild.handles) after it loads the model; a new exporter nonce means
a new vLLM process and new memory. The watcher is the only code that attaches weights to the trainer or
detaches them, and it keeps what goes with a mapping together: the mapped model, the last mapping error
(answered by status), and the optimizer state that belongs to the served weights (restored on every map).

Its own module because this is the one part of the worker that follows another process; the request side
(hogwild.worker.service) only reads `mapped`. The socket loop drives it through the service's `tick`, from
the same thread that handles requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from hogwild import checkpoint, handles, sharing
from hogwild.worker import persistence, protection, status
from hogwild.worker.metrics import WorkerMetrics
from hogwild.worker.model import MappedModel, load_tokenizer, map_model
from hogwild.worker.trainer import Trainer

log = logging.getLogger("hogwild.worker")
MAP_RETRY_S = 10.0  # a manifest whose mapping failed is tried again after this long, not on every tick


class Watcher:
    def __init__(
        self,
        *,
        run_dir: Path,
        checkpoint_dir: Path,
        device: str | None,
        trainer: Trainer,
        preemption_point: Callable[[], None],
        metrics: WorkerMetrics,
        protecting: Callable[[], bool] = lambda: True,
    ) -> None:
        self.run_dir = run_dir
        self.checkpoint_dir = checkpoint_dir
        self.device = device
        self.trainer = trainer
        self.preemption_point = preemption_point
        self.protecting = protecting  # whether serving protection is on now (hot): large matmuls split then
        self.metrics = metrics
        self.mapped: MappedModel | None = None
        self.mapping_error: str | None = None
        self._failed_map: tuple[str, float] | None = None
        self.restored_from: str | None = None  # the checkpoint whose state the mapped weights resumed

    def poll(self) -> None:
        """Read the manifest once and act on it: map, re-map, disconnect, or nothing."""
        try:
            manifest = handles.read_manifest(self.run_dir)
        except handles.ManifestError as err:
            self.mapping_error = str(err)
            return
        alive = manifest is not None and sharing.exporter_alive(manifest.exporter)
        current = self.mapped.manifest.exporter.nonce if self.mapped else None
        action = status.watch_action(current, manifest, alive)
        if action == status.DISCONNECT:
            self._disconnect("the exporter is gone")
        elif action == status.MAP and manifest is not None:
            failed = self._failed_map
            if failed and failed[0] == manifest.exporter.nonce and time.monotonic() - failed[1] < MAP_RETRY_S:
                return
            self._map(manifest)

    def _disconnect(self, why: str) -> None:
        with self.trainer.exclusive():
            self.trainer.detach()
            self.mapped = None
        self.metrics.connected.set(0)
        log.warning("weights unmapped: %s", why, extra={"event": "disconnected"})

    def _map(self, manifest: handles.Manifest) -> None:
        started = time.monotonic()
        with self.trainer.exclusive():  # waits for a running step; the next one trains the new mapping
            self.trainer.detach()
            self.mapped = None
            try:
                mapped = map_model(manifest, self.device)
                tokenizer = load_tokenizer(manifest.model_path)
            except Exception as err:  # the worker stays up and answers status with the error
                self.mapping_error = f"{type(err).__name__}: {err}"
                self._failed_map = (manifest.exporter.nonce, time.monotonic())
                self.metrics.connected.set(0)
                log.exception("mapping the weights failed", extra={"event": "map_failed"})
                return
            protection.install_preemption_points(
                mapped.module, self.preemption_point, split_while=self.protecting
            )
            self.trainer.attach(mapped.module, tokenizer, int(mapped.module.config.vocab_size))
            self.mapped, self.mapping_error, self._failed_map = mapped, None, None
            restored = self.restored_from = self._restore_optimizer_state()
        self.metrics.connected.set(1)
        self.metrics.remaps.inc()
        self.metrics.weight_bytes.set(mapped.weight_bytes)
        self.metrics.optimizer_state_bytes.set(self.trainer.optimizer_state_bytes)
        log.info(
            "weights mapped",
            extra={
                "event": "mapped",
                "nonce": manifest.exporter.nonce,
                "backend": manifest.backend,
                "bytes": mapped.weight_bytes,
                "seconds": round(time.monotonic() - started, 3),
                "restored": restored,
            },
        )

    def _restore_optimizer_state(self) -> str | None:
        """Resume the optimizer state and counters that belong to the served weights (see resume_point)."""
        assert self.mapped is not None
        manifest = self.mapped.manifest
        served = str(Path(manifest.model_path).resolve())
        found = persistence.resume_point(
            [
                checkpoint.Checkpoint(c.path.resolve(), c.step, c.time, c.meta)
                for c in checkpoint.list_complete(self.checkpoint_dir)
            ],
            manifest.exporter.nonce,
            served,
        )
        if found is None:
            self.trainer.reset()  # these weights hold no saved training
            return None
        try:
            self.trainer.load_state_dict(checkpoint.load_optimizer_state(found))
        except Exception:
            log.exception(
                "could not read the optimizer state of %s", found.path, extra={"event": "restore_failed"}
            )
            self.trainer.reset()
            return None
        return str(found.path)

"""Mixed into vLLM's worker by `--worker-extension-cls`; reached with `collective_rpc`.

An RPC runs inside the model loop and pauses generation, so this is used once, for control (the export),
never for data. Method names carry a `hogwild_` prefix: vLLM refuses extensions that shadow its own.
"""

from __future__ import annotations

import logging
from typing import Any

from hogwild import handles, sharing
from hogwild.vllm_plugin import compat

log = logging.getLogger("hogwild.vllm")


class HogwildWorkerExtension:
    def hogwild_export(self, run_dir: str) -> dict[str, Any]:
        """Share this worker's weights and write the manifest. Returns a summary for the caller's log."""
        model = compat.worker_model(self)
        params = list(model.named_parameters())
        device = params[0][1].device
        model_path, hf_config = compat.worker_model_path(self), compat.worker_hf_config(self)
        version = compat.vllm_version()
        if device.type == "cuda":
            manifest = sharing.export_cuda_ipc(
                params, run_dir=run_dir, model_path=model_path, hf_config=hf_config, vllm_version=version
            )
        else:
            sharing.sweep_stale_shm()
            manifest = sharing.export_shm(
                params, model_path=model_path, hf_config=hf_config, vllm_version=version
            )
        handles.write_manifest(run_dir, manifest)
        total = sum(p.numel() * p.element_size() for _, p in params)
        log.info(
            "hogwild: exported %d tensors (%d bytes) via %s (vLLM %s)",
            len(params),
            total,
            manifest.backend,
            version,
        )
        return {
            "backend": manifest.backend,
            "tensors": len(params),
            "bytes": total,
            "nonce": manifest.exporter.nonce,
        }

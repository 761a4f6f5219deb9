"""`vllm.general_plugins` entry point. vLLM runs it in every process (API server, engine core, workers),
possibly more than once, before the model loads: everything here is idempotent."""

from __future__ import annotations

import logging

from hogwild.vllm_plugin import compat

log = logging.getLogger("hogwild.vllm")


def register() -> None:
    version = compat.vllm_version()
    if not compat.version_supported(version):
        log.warning("hogwild: vLLM %s is untested; supported: %s", version, ", ".join(compat.SUPPORTED_VLLM))
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        compat.patch_cpu_linear()

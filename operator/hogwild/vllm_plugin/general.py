"""`vllm.general_plugins` entry point. vLLM runs it in every process (API server, engine core, workers),
possibly more than once, before the model loads: everything here is idempotent.

vLLM configures only its own `vllm` logger, so without a handler hogwild's INFO lines in vLLM's processes
(the export summary, the worker's protection mode) would be dropped and its warnings printed bare. We give
the `hogwild` logger one handler in vLLM's format, once per process, unless logging is configured already;
it then stops propagating, since a library may configure the root logger later (seen in vLLM 0.26's engine
process: every line twice).
"""

from __future__ import annotations

import logging
import sys

from hogwild.vllm_plugin import compat

log = logging.getLogger("hogwild.vllm")
_HANDLER_ATTR = "_hogwild_vllm_handler"
LOG_FORMAT = "%(levelname)s %(asctime)s [%(name)s] %(message)s"


def configure_logging(root: logging.Logger | None = None) -> bool:
    """Give `hogwild` loggers a stderr handler in this process; True when one was added now."""
    hogwild = logging.getLogger("hogwild")
    root = root if root is not None else logging.getLogger()
    if hogwild.handlers or root.handlers:
        return False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%m-%d %H:%M:%S"))
    setattr(handler, _HANDLER_ATTR, True)
    hogwild.addHandler(handler)
    hogwild.propagate = False
    if hogwild.level == logging.NOTSET:
        hogwild.setLevel(logging.INFO)
    return True


def register() -> None:
    configure_logging()
    warning = compat.version_warning(compat.vllm_version())
    if warning:
        log.warning(warning)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        compat.patch_cpu_linear()

"""`vllm.endpoint_plugins` entry point: adds hogwild's training routes to vLLM's OpenAI server.

vLLM loads it only when `VLLM_PLUGINS` names it (`hogwild vllm` sets that). `init_state` runs once at
start-up, before the server listens: it refuses unsafe settings, checks that a token exists, and asks the
worker extension (one `collective_rpc`) to export the weight handles.
"""

from __future__ import annotations

import logging
import os
from argparse import Namespace
from pathlib import Path
from typing import Any

from hogwild import auth, checkpoint, defaults, versions
from hogwild.client import WorkerClient
from hogwild.load_hint import HINT_NAME, LoadHint
from hogwild.vllm_plugin import routes as routes_module
from hogwild.vllm_plugin.in_flight import ServingLoadMiddleware
from hogwild.vllm_plugin.safety import unsafe_settings
from hogwild.vllm_plugin.versions import WeightsVersionMiddleware, write_start_version

log = logging.getLogger("hogwild.vllm")


class UnsafeSettingsError(RuntimeError):
    pass


def run_dir() -> Path:
    return Path(os.environ.get(defaults.ENV_RUN_DIR, defaults.RUN_DIR))


class HogwildRoutesPlugin:
    name = "hogwild_routes"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.routes: routes_module.TrainingRoutes | None = None

    def attach_router(self, app: Any) -> None:
        routes_module.attach(app, lambda: self.routes)
        auth.redact_access_log()  # a token sent as ?token= must not land in the serving log
        # The serving-load hint lives in the run dir that both containers share.
        hint = LoadHint(run_dir() / HINT_NAME)
        app.add_middleware(ServingLoadMiddleware, hint=hint)
        # Every OpenAI response names the weight version that produced it (hogwild.vllm_plugin.versions).
        app.add_middleware(
            WeightsVersionMiddleware, path=run_dir() / versions.VERSION_FILE, on_version=self.weights_changed
        )

    async def weights_changed(self, version: str) -> None:
        if self.routes is not None:
            await self.routes.weights_changed_elsewhere(version)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:
            log.warning("hogwild: no engine (render-only server); training routes answer 503")
            return
        problems = unsafe_settings(vars(args), os.environ)
        if problems:
            raise UnsafeSettingsError(
                "hogwild cannot train in place with these vLLM settings:\n- " + "\n- ".join(problems)
            )
        token = auth.load_token()
        if token is None:
            raise auth.CredentialError(
                f"no /train token: set {defaults.ENV_TOKEN} or {defaults.ENV_TOKEN_FILE} (weight-changing routes "
                "always require one)"
            )
        directory = run_dir()
        directory.mkdir(parents=True, exist_ok=True)
        # New weights in memory: a version of a fresh lineage until the worker maps them and starts its own.
        served = checkpoint.read_meta(Path(str(getattr(args, "model", "")))) or {}
        log.info(
            "hogwild: serving weights version %s", write_start_version(directory, int(served.get("step", 0)))
        )
        results = await engine_client.collective_rpc("hogwild_export", args=(str(directory),))
        log.info("hogwild: weights exported: %s", results)
        address = (
            os.environ.get(defaults.ENV_WORKER_ADDRESS) or f"ipc://{directory / defaults.WORKER_SOCKET_NAME}"
        )
        self.routes = routes_module.TrainingRoutes(WorkerClient(address), token, engine_client)
        state.hogwild_routes = self.routes


def make_plugin() -> HogwildRoutesPlugin:
    return HogwildRoutesPlugin()

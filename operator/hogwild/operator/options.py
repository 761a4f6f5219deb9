"""The operator's own settings (flags and environment of `hogwild operator`). Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from hogwild import defaults
from hogwild.operator.spec import Images


@dataclass(frozen=True)
class OperatorOptions:
    # How often each session's status is refreshed from its pod and worker (and hot changes re-relayed).
    status_interval_s: float = 10.0
    status_timeout_s: float = 5.0
    configure_timeout_s: float = 15.0
    # While an old pod terminates, or a delete waits for the final checkpoint, how soon to look again.
    restart_poll_s: float = 2.0
    # The longest the operator waits for a final checkpoint before it replaces or deletes a pod; a session's
    # spec.checkpoint.timeoutSeconds can only shorten it. 0: never wait (and never ask).
    final_checkpoint_timeout_s: float = 300.0
    # Images for sessions that name none (the Helm chart sets them to its own version).
    image_defaults: Images = field(default_factory=Images)
    # Honour the hogwild.dev/worker-address annotation (tests and debugging only: it redirects the relay).
    allow_address_override: bool = False
    # /metrics and /healthz; None turns the endpoint off.
    metrics_port: int | None = defaults.OPERATOR_HTTP_PORT
    # Talk to this API server without credentials (the emulator in tests); None: kopf's usual login.
    api_server: str | None = None

"""Ports, paths and limits that every hogwild process agrees on (docs/design.md "Contracts").

Pure constants: importing this module does no I/O.
"""

from __future__ import annotations

# Ports.
VLLM_HTTP_PORT = 8000
WORKER_METRICS_PORT = 9400
WORKER_CONTROL_PORT = 5555  # tcp, CURVE-authenticated: the operator's channel to the worker
OPERATOR_HTTP_PORT = 8080  # operator /metrics and /healthz
# Replicas (docs/replicas.md): replica 0's worker hosts the group's torch.distributed TCPStore on this port;
# every replica's worker reaches it through the session's headless Service `<session>-replicas`.
RENDEZVOUS_PORT = 29500

# Paths inside a session pod. In local mode both are redirected under a state dir (see hogwild.local).
RUN_DIR = "/run/hogwild"
CHECKPOINT_DIR = "/var/lib/hogwild"
MANIFEST_NAME = "weights.json"
WORKER_SOCKET_NAME = "worker.sock"

# Environment variables.
ENV_RUN_DIR = "HOGWILD_RUN_DIR"
ENV_CHECKPOINT_DIR = "HOGWILD_CHECKPOINT_DIR"
ENV_TOKEN = "HOGWILD_TOKEN"
ENV_TOKEN_FILE = "HOGWILD_TOKEN_FILE"
ENV_WORKER_ADDRESS = "HOGWILD_WORKER_ADDRESS"
ENV_RESTORE = "HOGWILD_RESTORE"  # what `hogwild vllm` serves at start-up: "Newest" checkpoint or "Base" model
# Replicas: this pod's ordinal (0..replicas-1), and where the group's store listens (host:port). Without
# ENV_RENDEZVOUS the worker trains alone, as a one-replica session always has. ENV_HOST_STORE=1: this
# worker hosts the store (the operator sets it on replica 0; local mode hosts it in `hogwild serve`).
ENV_REPLICA = "HOGWILD_REPLICA"
ENV_RENDEZVOUS = "HOGWILD_RENDEZVOUS"
ENV_HOST_STORE = "HOGWILD_HOST_STORE"
ENV_FAULT = "HOGWILD_FAULT"  # fault-injection point for crash tests, e.g. "checkpoint.after_weights"

# Limits on the /train route.
MAX_TRAIN_BODY_BYTES = 8 * 1024 * 1024
MAX_SAMPLES_PER_REQUEST = 1024
MAX_STEPS_PER_REQUEST = 10_000
DEFAULT_TRAIN_TIMEOUT_S = 600.0
MAX_TRAIN_TIMEOUT_S = 24 * 3600.0
# How long a router waits for a quick (non-train) reply from the worker.
CONTROL_TIMEOUT_S = 30.0

API_GROUP = "hogwild.dev"
API_VERSION = "v1alpha1"
KIND = "TrainingSession"

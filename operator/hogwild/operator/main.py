"""`hogwild operator`: run the TrainingSession operator.

Replicas coordinate through kopf peering (a ClusterKopfPeering or KopfPeering named "hogwild", which the
chart installs): the replica with the highest priority acts and the others pause. Each replica picks a
random priority unless one is given, so identical Deployment replicas never tie (a tie pauses them all);
when the active one goes away, the next-highest resumes once its peering entry expires.
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Sequence
from typing import Any

from hogwild import defaults
from hogwild.operator.options import OperatorOptions
from hogwild.operator.spec import DEFAULT_TRAINER_IMAGE, DEFAULT_VLLM_IMAGE, Images


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(prog="hogwild operator", description=__doc__.splitlines()[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch only this namespace (repeatable)"
    )
    parser.add_argument(
        "--peering", default=env.get("HOGWILD_PEERING", "hogwild"), help="kopf peering object name"
    )
    parser.add_argument("--standalone", action="store_true", help="no peering (a single replica)")
    parser.add_argument(
        "--priority",
        type=int,
        default=int(env["HOGWILD_OPERATOR_PRIORITY"]) if env.get("HOGWILD_OPERATOR_PRIORITY") else None,
        help="peering priority (default: random, so that replicas never tie)",
    )
    parser.add_argument(
        "--status-interval", type=float, default=10.0, help="seconds between status refreshes"
    )
    parser.add_argument(
        "--status-timeout", type=float, default=5.0, help="seconds to wait for a worker's status reply"
    )
    parser.add_argument(
        "--configure-timeout", type=float, default=15.0, help="seconds to wait for a hot change's reply"
    )
    parser.add_argument(
        "--restart-poll", type=float, default=2.0, help="seconds between looks at a terminating pod"
    )
    parser.add_argument(
        "--final-checkpoint-timeout",
        type=float,
        default=300.0,
        help="most seconds to wait for a worker's final checkpoint before replacing or deleting its pod "
        "(a session's spec.checkpoint.timeoutSeconds can only shorten it; 0: never wait)",
    )
    parser.add_argument(
        "--allow-worker-address-override",
        action="store_true",
        help="honour the hogwild.dev/worker-address annotation (tests and debugging only: it redirects the relay)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=defaults.OPERATOR_HTTP_PORT, help="0 turns it off"
    )
    parser.add_argument("--vllm-image", default=env.get("HOGWILD_VLLM_IMAGE") or DEFAULT_VLLM_IMAGE)
    parser.add_argument("--trainer-image", default=env.get("HOGWILD_TRAINER_IMAGE") or DEFAULT_TRAINER_IMAGE)
    parser.add_argument("--log-format", choices=("full", "plain", "json"), default="full")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(list(argv))


def options_from_args(args: argparse.Namespace) -> OperatorOptions:
    return OperatorOptions(
        status_interval_s=args.status_interval,
        status_timeout_s=args.status_timeout,
        configure_timeout_s=args.configure_timeout,
        restart_poll_s=args.restart_poll,
        final_checkpoint_timeout_s=args.final_checkpoint_timeout,
        allow_address_override=args.allow_worker_address_override,
        image_defaults=Images(vllm=args.vllm_image, trainer=args.trainer_image),
        metrics_port=args.metrics_port or None,
    )


def run_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """kopf.run's scope and peering arguments for these flags."""
    priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
    return {
        "standalone": args.standalone,
        # Any peering name makes kopf's peering mandatory: standalone with a name pauses every watch-stream
        # ("peering CRD is missing") and handles nothing, so a standalone operator names none.
        "peering_name": None if args.standalone else args.peering,
        "priority": priority,
        "clusterwide": not args.namespace,
        "namespaces": args.namespace,
    }


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    import kopf  # only this subcommand needs kopf

    from hogwild.operator.handlers import build_operator

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    operator = build_operator(options_from_args(args))
    kopf.run(registry=operator.registry, settings=operator.settings, **run_arguments(args))
    return 0

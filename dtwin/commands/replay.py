"""``dtwin replay``: stream recorded or synthetic KPI samples into Kafka, keyed by site."""

from __future__ import annotations

import argparse
import threading

from contracts.topics import Topics
from dtwin.args import add_data_args, add_kafka_args, env, load_sites_from_args


def replay_site_list(args: argparse.Namespace) -> list:
    """``--sites`` sites cycling over the selected recorded sites, derived beyond them; synthetic without data."""
    from forecaster.data import resolve_data_dir
    from replay.sites import replay_sites

    bases = load_sites_from_args(args) if resolve_data_dir(args.data) is not None else None
    sites = replay_sites(args.sites, bases=bases, seed=args.synthetic_seed)
    if args.limit_samples:
        sites = [s.slice(0, args.limit_samples) for s in sites]
    return sites


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


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="stream recorded or synthetic KPI samples into Kafka, keyed by site")
    add_kafka_args(p)
    add_data_args(p)
    p.add_argument("--sites", type=int, default=1,
                   help="sites to replay: they cycle over the chosen recorded sites (--site-ids), then further ones "
                        "are derived by time shift and scaling (default %(default)s)")
    p.add_argument("--speed", default="max", help="real, max, or a factor of real pace like 60 (default %(default)s)")
    p.add_argument("--start-offset", type=int, default=0, help="first interval to send (default 0)")
    p.add_argument("--limit", type=int, default=None, help="intervals to send (default: to the end)")
    p.add_argument("--loop", action="store_true", help="start over at the end, timestamps still increasing")
    p.add_argument("--base-ts", type=int, default=int(env("DTWIN_BASE_TS", "1704067200")),
                   help="epoch seconds added to the recorded timestamps (default %(default)s, 2024-01-01 UTC)")
    p.set_defaults(func=cmd_replay)

"""Arguments shared by several command groups, and the sites they select."""

from __future__ import annotations

import argparse
import os

from contracts.topics import DEFAULT_PREFIX
from forecaster.data import DEFAULT_SERIES, Site


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def parse_site_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--site-ids takes site numbers like 1,4,5, got {text!r}") from None
    if not ids or len(set(ids)) != len(ids) or any(not 1 <= i <= 10 for i in ids):
        raise argparse.ArgumentTypeError(f"--site-ids takes distinct site numbers 1..10 like 1,4,5, got {text!r}")
    return ids


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="dataset folder (data_series_info.txt, data_series/); default $DTWIN_DATA, "
                        "else synthetic sites")
    p.add_argument("--site-ids", type=parse_site_ids, default=None,
                   help="real sites by number, e.g. 1,4,5 (site i = series s{i},s{10+i},s{30+i},s{40+i})")
    p.add_argument("--series", default=None,
                   help="one explicitly named site: INTERNET,SESSIONS,VPN,DOWNSTREAM series ids "
                        f"(default {','.join(DEFAULT_SERIES)}, the paper's, when --site-ids is not given)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic sites (default 0)")
    p.add_argument("--limit-samples", type=int, default=None,
                   help="use only the first N samples of each site (for quick runs)")


def add_kafka_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", default=env("DTWIN_BOOTSTRAP", "127.0.0.1:9092"),
                   help="Kafka bootstrap host:port (default $DTWIN_BOOTSTRAP or %(default)s)")
    p.add_argument("--topic-prefix", default=env("DTWIN_TOPIC_PREFIX", DEFAULT_PREFIX),
                   help="topic name prefix (default $DTWIN_TOPIC_PREFIX or %(default)s)")


def load_sites_from_args(args: argparse.Namespace, synthetic_count: int = 1) -> list[Site]:
    """The real sites named by --site-ids, or the one named by --series, or synthetic ones."""
    from forecaster.data import load_site, parse_series_arg, resolve_data_dir, site_series

    data_dir = resolve_data_dir(args.data)
    if data_dir is None:
        if args.site_ids or args.series:
            raise SystemExit(f"dtwin {args.command}: --site-ids and --series need --data (or $DTWIN_DATA)")
        from forecaster.synthetic import generate_sites

        sites = generate_sites(synthetic_count, seed=args.synthetic_seed)
    elif args.site_ids:
        if args.series:
            raise SystemExit(f"dtwin {args.command}: give --site-ids or --series, not both")
        sites = [load_site(data_dir, site_series(i), name=str(i)) for i in args.site_ids]
    else:
        sites = [load_site(data_dir, parse_series_arg(args.series or ",".join(DEFAULT_SERIES)))]
    if args.limit_samples:
        sites = [s.slice(0, args.limit_samples) for s in sites]
    return sites


def load_site_from_args(args: argparse.Namespace) -> Site:
    """Commands that take one site: the first selected."""
    return load_sites_from_args(args)[0]

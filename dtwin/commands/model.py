"""``dtwin model``: the model registry (publish, stage, promote, rollback, list) and the live comparison."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_REGISTRY = "models"
REGISTRY_ENV = "DTWIN_MODEL_REGISTRY"
METRICS_ENV = "DTWIN_METRICS_URLS"


def _registry(args: argparse.Namespace):
    from export.registry import Registry

    return Registry(args.registry or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)


def _metrics_urls(args: argparse.Namespace) -> list[str]:
    from export.compare import DEFAULT_METRICS_URL

    if args.metrics:
        return list(args.metrics)
    env = [u.strip() for u in os.environ.get(METRICS_ENV, "").split(",") if u.strip()]
    return env or [DEFAULT_METRICS_URL]


def _compare(args: argparse.Namespace, timeout: float = 3.0):
    from export.compare import compare_live, read_live_scores

    live = read_live_scores(_metrics_urls(args), timeout=timeout)
    return live, compare_live(live, args.current_allocator, args.candidate_allocator,
                              min_intervals=args.min_intervals, strict=args.strict)


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def _pointers(reg) -> dict[str, str | None]:
    from export.registry import POINTERS, RegistryError

    out: dict[str, str | None] = {}
    for p in POINTERS:
        try:
            out[p] = reg.pointer_version(p)
        except RegistryError as exc:
            out[p] = f"<invalid: {exc}>"
    return out


def cmd_publish(args: argparse.Namespace) -> int:
    reg = _registry(args)
    version = reg.publish(args.dir)
    print(f"published {version} in {reg.root}")
    if args.stage:
        reg.stage(version)
        print(f"staged {version} as the candidate")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    reg = _registry(args)
    reg.stage(args.version)
    print(f"staged {args.version} as the candidate; the workers score it in shadow as 'candidate'")
    return 0


def cmd_unstage(args: argparse.Namespace) -> int:
    old = _registry(args).unstage()
    print(f"unstaged {old}" if old else "no candidate was staged")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    reg = _registry(args)
    before = reg.pointer_version("current")
    if args.force:
        version = reg.promote(args.version, force=True)
    elif before is None:
        version = reg.promote(args.version)
        print("no current model yet: nothing to compare against")
    else:
        _, comparison = _compare(args)
        print(comparison.text())
        print()
        version = reg.promote(args.version, comparison=comparison)
    if version == before:
        print(f"{version} is already current")
    else:
        print(f"promoted {version} (previous: {before or 'none'}){' by force' if args.force else ''}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    reg = _registry(args)
    before = reg.pointer_version("current")
    version = reg.rollback()
    print(f"rolled back to {version} (previous is now {before or 'none'})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    infos = reg.list()
    pointers = _pointers(reg)
    if not infos:
        print(f"no versions in {reg.root}")
    else:
        width = max(len(i.version) for i in infos)
        print(f"{'version':<{width}}  {'created':<25}  {'sha256':<12}  pointers")
        for i in infos:
            print(f"{i.version:<{width}}  {i.created or '-':<25}  {(i.sha256 or '-')[:12]:<12}  "
                  f"{', '.join(i.pointers)}")
    for p, v in pointers.items():
        if v is not None and not reg.has_version(v):
            print(f"warning: {p} names {v}, which is not in {reg.versions}")
    live, comparison = _compare(args, timeout=1.0)
    payload: dict = {"registry": str(reg.root), "pointers": pointers, "versions": [i.to_dict() for i in infos],
                     "comparison": None}
    if not live.sources:
        print("\nlive scores: no worker reachable (" + "; ".join(live.unreachable) + ")")
    else:
        print("\nlive scores (" + ", ".join(live.sources) + "):")
        print(comparison.text())
        payload["comparison"] = comparison.to_dict()
    _write_json(args.json, payload)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    reg = _registry(args)
    _, comparison = _compare(args)
    pointers = _pointers(reg) if reg.root.is_dir() else {}
    if pointers:
        print(f"registry {reg.root}: current {pointers.get('current') or 'none'}, "
              f"candidate {pointers.get('candidate') or 'none'}")
        for role, key in (("candidate", "candidate"), ("active", "current")):
            reported = comparison.candidate_versions if role == "candidate" else comparison.current_versions
            if reported and pointers.get(key) not in reported:
                print(f"note: the workers report {role} {', '.join(reported)}, the registry's {key} is "
                      f"{pointers.get(key) or 'unset'} (not switched yet?)")
    print(comparison.text())
    _write_json(args.json, {"registry": str(reg.root), "pointers": pointers, **comparison.to_dict()})
    return 0 if comparison.wins else 1


def _refusing(func):
    def run(args: argparse.Namespace) -> int:
        from export.artifact import ArtifactError
        from export.registry import RegistryError

        try:
            return func(args)
        except (RegistryError, ArtifactError, OSError) as exc:
            print(f"dtwin model {args.model_command}: refused: {exc}", file=sys.stderr)
            return 2
    return run


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None,
                        help=f"registry folder (default ${REGISTRY_ENV}, else {DEFAULT_REGISTRY}/)")
    live = argparse.ArgumentParser(add_help=False)
    live.add_argument("--metrics", action="append", default=None, metavar="URL",
                      help=f"a worker's Prometheus endpoint, repeatable (default ${METRICS_ENV}, comma-separated, "
                           "else http://127.0.0.1:9108/metrics); scores are summed over workers")
    live.add_argument("--min-intervals", type=int, default=1000,
                      help="fewest intervals scored before the candidate can win (default %(default)s)")
    live.add_argument("--strict", action="store_true",
                      help="also require the lower miss rate to be significant at 95 %%")
    live.add_argument("--current-allocator", default="current",
                      help="allocator label of the current model on the candidate's intervals (default %(default)s)")
    live.add_argument("--candidate-allocator", default="candidate", help="allocator label of the candidate "
                                                                         "(default %(default)s)")

    p = sub.add_parser("model", help="the model registry: publish, stage, promote, rollback, list, compare")
    msub = p.add_subparsers(dest="model_command", required=True)

    q = msub.add_parser("publish", parents=[common], help="verify an artifact folder and add it as a version")
    q.add_argument("dir", help="artifact folder (model.onnx + manifest.json), e.g. from dtwin export")
    q.add_argument("--stage", action="store_true", help="also stage it as the candidate")
    q.set_defaults(func=_refusing(cmd_publish))

    q = msub.add_parser("stage", parents=[common], help="make a version the candidate (scored in shadow)")
    q.add_argument("version")
    q.set_defaults(func=_refusing(cmd_stage))

    q = msub.add_parser("unstage", parents=[common], help="clear the candidate")
    q.set_defaults(func=_refusing(cmd_unstage))

    q = msub.add_parser("promote", parents=[common, live],
                        help="make the candidate (or VERSION) current; refused unless it wins the live comparison")
    q.add_argument("version", nargs="?", default=None, help="default: the staged candidate")
    q.add_argument("--force", action="store_true", help="promote without (or against) the live comparison")
    q.set_defaults(func=_refusing(cmd_promote))

    q = msub.add_parser("rollback", parents=[common], help="make the previous version current again")
    q.set_defaults(func=_refusing(cmd_rollback))

    q = msub.add_parser("list", parents=[common, live], help="versions, pointers and (if reachable) live scores")
    q.add_argument("--json", default=None, help="also write it as JSON")
    q.set_defaults(func=_refusing(cmd_list))

    q = msub.add_parser("compare", parents=[common, live],
                        help="does the candidate beat current on the live scores? exit 0 if it wins, 1 if not")
    q.add_argument("--json", default=None, help="also write the comparison as JSON")
    q.set_defaults(func=_refusing(cmd_compare))

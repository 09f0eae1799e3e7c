"""Every command and subcommand of `dtwin` builds and prints its help (a bad help string or a missing
register() fails here, not in front of a user)."""

from __future__ import annotations

import argparse

import pytest

from dtwin.cli import build_parser, main


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, (*prefix, name))
    return paths


PATHS = command_paths(build_parser())


def test_the_command_groups_are_all_there():
    top = {p[0] for p in PATHS if len(p) == 1}
    assert {"train", "evaluate", "export", "broker", "topics", "replay", "controller", "up", "model", "whatif",
            "bench"} <= top
    assert {("bench", b) for b in ("model", "loop", "swap")} <= set(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "dtwin")
def test_help(path, capsys):
    with pytest.raises(SystemExit) as info:
        main([*path, "--help"])
    assert info.value.code == 0
    assert "usage: dtwin" in capsys.readouterr().out

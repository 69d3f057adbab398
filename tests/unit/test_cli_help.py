"""Every command's ``--help`` runs: a walk over the command table and every nested sub-command."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from largessl.cli import COMMANDS, build_parser, main


def _commands(parser: argparse.ArgumentParser, path: list[str]) -> Iterator[list[str]]:
    """``path`` and the path of every sub-command below ``parser``."""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, [*path, name])


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_runs(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``largessl <command> [<sub> ...] --help`` prints usage and exits 0 (a '%' in a help text would raise)."""
    paths = list(_commands(build_parser(command), []))
    paths = [p for p in paths if p and p[0] == command]
    assert paths, command
    for path in paths:
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0, path
        out = capsys.readouterr().out
        assert out.startswith("usage: largessl " + " ".join(path)), (path, out[:200])

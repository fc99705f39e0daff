"""The CLI's one error wrapper (sourcefree.cli.errors): the group and the commands share it.

A typed error is one ``error:`` line and its exit code, a bare KeyboardInterrupt is
``interrupted`` and 130, whether a command runs on its own or inside the group.
"""

from __future__ import annotations

import signal

import click
import pytest
from click.testing import CliRunner

from sourcefree.cli import commands_adapt
from sourcefree.cli.app import _Group
from sourcefree.cli.errors import EXIT_ERROR, EXIT_INTERRUPTED, typed_errors_command
from sourcefree.errors import (
    EXIT_RESUMABLE,
    ConfigError,
    Interrupted,
    RunInterruptedError,
)

ERRORS: list[tuple[BaseException, int, str]] = [
    (
        ConfigError("bad key", "it is unknown", "fix it"),
        EXIT_ERROR,
        "error: bad key. It is unknown. Fix: fix it.",
    ),
    (RunInterruptedError("stopped", "", "resume"), EXIT_RESUMABLE, "error: stopped"),
    (Interrupted(signal.SIGTERM), 143, "error: interrupted by SIGTERM"),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted"),
]


def _raiser(exc: BaseException) -> click.Command:
    def fail() -> None:
        raise exc

    return click.command("fail")(fail)


@pytest.mark.parametrize(("exc", "code", "first_line"), ERRORS)
def test_a_command_ends_the_same_alone_and_in_the_group(
    exc: BaseException, code: int, first_line: str
) -> None:
    alone = click.command("fail")(typed_errors_command(lambda: _raise(exc)))
    group = _Group("cli")
    group.add_command(_raiser(exc))
    for cmd, args in ((alone, []), (group, ["fail"])):
        result = CliRunner().invoke(cmd, args)
        assert result.exit_code == code, result.output
        assert result.output.startswith(first_line), result.output
        assert "Traceback" not in result.output


def _raise(exc: BaseException) -> None:
    raise exc


def test_the_adapt_commands_use_the_one_wrapper() -> None:
    wrapper_code = typed_errors_command(lambda: None).__code__
    for command in commands_adapt.COMMANDS:
        assert getattr(command.callback, "__code__", None) is wrapper_code, command.name

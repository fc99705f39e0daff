"""Every ``sourcefree`` command's --help has a runnable example (issue 21, point 10).

Each example line is parsed by the command's own click parser, so an option that
does not exist, an option without its value, a missing required option or
argument, a bad choice or an out-of-range number fails here, not in a user's shell.
"""

from __future__ import annotations

import shlex

import click
import pytest
from click.testing import CliRunner

from sourcefree.cli.app import main

COMMANDS = sorted(main.commands)
#: Shell words that end a command (the rest is another command or a redirection).
_SEPARATORS = {";", "|", "&&", "||"}
_REDIRECTIONS = {">", ">>", "<", "2>", "2>&1"}


def _help(name: str) -> str:
    result = CliRunner().invoke(main, [name, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def example_lines(help_text: str) -> list[str]:
    """The example commands of a help page: the block after ``Example:`` up to a blank
    line, with ``\\`` continuations joined (text after ``Example:`` on its line counts)."""
    lines: list[str] = []
    inside = False
    for raw in help_text.splitlines():
        text = raw.strip()
        if text.startswith("Example:"):
            inside = True
            text = text[len("Example:") :].strip()
            if not text:
                continue
        elif not inside:
            continue
        if not text:
            break
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1].rstrip() + " " + text
        else:
            lines.append(text)
    return lines


def shell_commands(line: str) -> list[list[str]]:
    """The commands of one shell line, comments and redirections removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";|&<>")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    skip = False
    for word in lexer:
        if skip:
            skip = False
        elif word in _SEPARATORS:
            commands.append([])
        elif word in _REDIRECTIONS:
            skip = True  # its target
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def check_invocation(words: list[str]) -> str:
    """Parse ``sourcefree [GROUP OPTIONS] VERB ARGS`` as click would; return VERB.

    Raises ``click.UsageError`` (or ``AssertionError``) for anything click would refuse
    before running the command: unknown options, missing values, required options or
    arguments, extra arguments, bad choices or ranges. Paths are not opened.
    """
    assert words[0] == "sourcefree", f"an example runs something else: {words}"
    group_ctx = click.Context(main, info_name="sourcefree")
    parsed, rest, _ = main.make_parser(group_ctx).parse_args(list(words[1:]))
    _cast(main, group_ctx, parsed)
    assert rest, f"no command in {shlex.join(words)!r}"
    verb, args = rest[0], rest[1:]
    command = main.commands.get(verb)
    assert command is not None, f"no command {verb!r} in {shlex.join(words)!r}"
    ctx = click.Context(command, info_name=verb, parent=group_ctx)
    values, extra, _ = command.make_parser(ctx).parse_args(list(args))
    if extra and not ctx.allow_extra_args:
        raise click.UsageError(f"extra arguments {extra} in {shlex.join(words)!r}")
    for param in command.params:
        given = values.get(param.name)
        if param.required and (given is None or param.value_is_missing(given)):
            raise click.UsageError(f"missing {param.name!r} in {shlex.join(words)!r}")
    _cast(command, ctx, values)
    return verb


def _cast(command: click.Command, ctx: click.Context, values: dict[str, object]) -> None:
    """Convert every given value by its parameter type (not paths: they need not exist)."""
    for param in command.params:
        value = values.get(param.name)
        if value is None or param.value_is_missing(value):
            continue
        if isinstance(param.type, (click.Path, click.File)):
            continue
        param.type_cast_value(ctx, value)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_help_page_has_a_runnable_example(name: str) -> None:
    text = _help(name)
    assert "Example" in text, f"`sourcefree {name} --help` has no example"
    lines = example_lines(text)
    assert lines, f"`sourcefree {name} --help`: nothing after 'Example:'"
    verbs = []
    for line in lines:
        commands = shell_commands(line)
        assert commands, f"empty example line in `{name} --help`: {line!r}"
        for words in commands:
            try:
                verbs.append(check_invocation(words))
            except click.UsageError as err:
                pytest.fail(f"`sourcefree {name} --help` example {line!r}: {err.format_message()}")
    assert name in verbs, f"no example of `sourcefree {name}` itself in its --help: {lines}"


def test_the_commands_walked_are_the_cli() -> None:
    """The walk sees every verb of ``sourcefree --help``, the new ``optimize`` included."""
    listed = CliRunner().invoke(main, ["--help"]).output.split("Commands:")[1]
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    assert names == COMMANDS and "optimize" in names


@pytest.mark.parametrize(
    "line",
    [
        "sourcefree predict PKG photos/ --no-such-option",  # unknown option
        "sourcefree predict PKG photos/ --top-k",  # option without its value
        "sourcefree predict PKG photos/ --format xml",  # bad choice
        "sourcefree predict PKG photos/ --top-k 0",  # out of range
        "sourcefree predict PKG",  # a required argument missing
        "sourcefree adapt PKG faces/ -o out/",  # a required option (-m) missing
        "sourcefree sign PKG extra --key k.key",  # an extra argument
        "sourcefree --no-such-group-option predict PKG photos/",
        "sourcefree no-such-verb",
    ],
)
def test_the_checker_refuses_wrong_examples(line: str) -> None:
    (words,) = shell_commands(line)
    with pytest.raises((click.UsageError, AssertionError)):
        check_invocation(words)


def test_example_lines_join_continuations_and_drop_comments() -> None:
    text = (
        "Usage: x\n\n  Example:\n    sourcefree export --arch smallcnn \\\n"
        "      --out pkg   # a comment\n    sourcefree -q predict pkg a/ > p.csv\n\nOptions:\n"
    )
    lines = example_lines(text)
    assert lines == [
        "sourcefree export --arch smallcnn --out pkg   # a comment",
        "sourcefree -q predict pkg a/ > p.csv",
    ]
    assert shell_commands(lines[0]) == [
        ["sourcefree", "export", "--arch", "smallcnn", "--out", "pkg"]
    ]
    assert shell_commands(lines[1]) == [["sourcefree", "-q", "predict", "pkg", "a/"]]

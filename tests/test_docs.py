"""README.md, SKILL.md and --help agree: commands, flags, environment and exit codes."""

from __future__ import annotations

import argparse
import os
import re

import pytest

import ollama_generate as og

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "SKILL.md"]


def read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


def parser_commands() -> dict[str, set[str]]:
    """Each command's option strings, with the top-level ones under ''."""
    parser = og.build_parser()
    options = {"": _options(parser)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                options[name] = _options(sub)
    return options


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings} - {"-h", "--help"}


def documented_flags(text: str) -> set[str]:
    """Long flags anywhere, short flags in our own command lines and code spans."""
    flags = set()
    for line in text.splitlines():
        if any(tool in line for tool in ("pytest", "pip install", "bench/", "llama-server", "vllm serve",
                                         "sglang.launch_server", "llama_cpp.server")):
            continue  # flags of pip, pytest, the benchmark scripts and the servers in "Other servers"
        flags.update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
        flags.update(re.findall(r"`(-[a-zA-Z])[` ]", line))
    return flags


def documented_commands(text: str) -> set[str]:
    return set(re.findall(r"(?:ollama-generate|ollama_generate\.py) ([a-z]+)\b", text))


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_exists(doc):
    assert documented_commands(read(doc)) - set(parser_commands()) == set()


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_is_documented(doc):
    assert set(parser_commands()) - {""} <= documented_commands(read(doc))


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_flag_exists(doc):
    known = set().union(*parser_commands().values()) | {"-h", "--help"}
    assert documented_flags(read(doc)) - known == set()


@pytest.mark.parametrize("doc", DOCS)
def test_every_parser_flag_is_documented(doc):
    known = set().union(*parser_commands().values())
    assert known - documented_flags(read(doc)) == set()


def test_every_flag_is_in_help(capsys):
    for command, flags in parser_commands().items():
        with pytest.raises(SystemExit):
            og.main([command, "--help"] if command else ["--help"])
        shown = capsys.readouterr().out
        for flag in flags:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", shown), (command, flag)


def help_table(section: str) -> dict[str, str]:
    """Rows of a two-column table in the module docstring (what --help prints)."""
    block = og.__doc__.split(section + ":\n", 1)[1].split("\n\n", 1)[0]
    return dict(line.split(None, 1) for line in block.strip().splitlines())


def doc_table_first_column(text: str, header: str) -> dict[str, str]:
    """First and second cells of the markdown table whose header row starts with header."""
    rows = {}
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lower().replace(" ", "").startswith(header))
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1]
    return rows


@pytest.mark.parametrize("doc", DOCS)
def test_exit_codes_agree_with_help(doc):
    codes = doc_table_first_column(read(doc), "|code|")
    assert set(codes) == set(help_table("Exit status"))


@pytest.mark.parametrize("doc", DOCS)
def test_environment_defaults_agree_with_help(doc):
    text = read(doc)
    for name, meaning in help_table("Environment").items():
        default = re.search(r"\(default (\S+)\)", meaning).group(1)
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}`"))
        assert row.rstrip(" |").endswith((f"`{default}`", f"| {default}")), (doc, name)


def test_help_shows_the_environment_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        og.main(["--help"])
    shown = capsys.readouterr().out
    assert "OLLAMA_VISION_MODEL  vision model (default qwen3-vl:32b)" in shown
    assert "130  interrupted (Ctrl-C)" in shown


def test_skill_front_matter():
    text = read("SKILL.md")
    assert text.startswith("---\nname: ollama-generate\ndescription: >-\n")
    front = text.split("---\n")[1]
    assert "Use when" in front
    assert "{baseDir}/ollama_generate.py" in text


def test_readme_test_command_is_what_ci_runs():
    ci = read(".ci/run")
    assert "<!-- the test command -->" in ci
    readme = read("README.md")
    block = readme.split("<!-- the test command -->\n", 1)[1]
    command = block.split("\n")[1]
    assert command.startswith("python3 -m venv .venv && ")
    assert "--cov-fail-under=90" in command


@pytest.mark.parametrize("doc", DOCS)
def test_flags_in_example_command_lines_belong_to_that_command(doc):
    commands = parser_commands()
    for line in read(doc).splitlines():
        match = re.search(r"(?:ollama-generate|ollama_generate\.py) ([a-z]+)\b(.*)", line)
        if not match or match.group(1) not in commands:
            continue
        allowed = commands[match.group(1)] | commands[""] | {"-h", "--help"}
        flags = set(re.findall(r"(?<![\w-])--?[a-zA-Z][a-z0-9-]*", match.group(2)))
        assert flags <= allowed, (doc, line, flags - allowed)


@pytest.mark.parametrize("doc", DOCS)
def test_documented_choices_match_the_parser(doc):
    parser = og.build_parser()
    choices = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for option in sub._actions:
                    if option.choices:
                        choices[option.option_strings[0]] = set(option.choices)
    for flag, values in choices.items():
        for written in re.findall(rf"{re.escape(flag)} \[?<?([a-z0-9|]+\|[a-z0-9|]+)", read(doc)):
            assert set(written.split("|")) == values, (doc, flag, written)

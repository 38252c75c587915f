"""Every ``bivlm`` command explains itself: each leaf command has a description with an
example, and every option and argument has a help text."""

from __future__ import annotations

import argparse

from bivlm_plugin.cli import build_parser


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaves(sub, (*path, name))


def test_every_command_has_a_description_with_an_example_and_every_option_a_help() -> None:
    leaves = list(_leaves(build_parser()))
    assert len(leaves) >= 14  # zoo list/build, eval ppl/vqa, quantize, serve, report, ...
    missing = []
    for path, parser in leaves:
        name = " ".join(path)
        if "Example" not in (parser.description or ""):
            missing.append(f"{name}: no description with an example")
        for a in parser._actions:
            if a.dest != "help" and not a.help:
                missing.append(f"{name}: {a.option_strings or a.dest} has no help")
    assert not missing, missing


def test_report_is_a_command() -> None:
    names = {" ".join(path) for path, _ in _leaves(build_parser())}
    assert {"report", "demo", "serve", "ask", "bench load", "analyze pruning"} <= names

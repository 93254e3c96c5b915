"""``tributary --help`` and every subcommand's help: rendered, plain text, every flag explained, defaults shown, and
every default taken from a TRIBUTARY_* variable naming that variable. No subprocess: ``format_help()`` in process."""

from __future__ import annotations

import argparse
import os
import re

import pytest

import tributary.cli as cli

COMMANDS = ["up", "demo-model", "gateway", "encoder", "export-onnx", "fingerprint", "backbone", "redis", "plan"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """The parser reads TRIBUTARY_* variables as defaults: build it from none, at a fixed width."""
    for name in [n for n in os.environ if n.startswith("TRIBUTARY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "100")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(found) == 1
    return dict(found[0].choices)


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return {"tributary": parser, **_subparsers(parser)}


def _flat(text: str) -> str:
    return " ".join(text.split())


def _action_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """One flag's block as ``--help`` prints it (its help with the default note expanded)."""
    return _flat(parser._get_formatter()._format_action(action))


def test_every_command_is_listed():
    parsers = _parsers()
    assert sorted(parsers) == sorted(["tributary", *COMMANDS])
    top = parsers["tributary"].format_help()
    for name in COMMANDS:
        assert f"\n    {name}" in top, name


@pytest.mark.parametrize("name", ["tributary", *COMMANDS])
def test_help_renders_as_plain_text(name):
    parser = _parsers()[name]
    text = parser.format_help()
    assert text.startswith(f"usage: {parser.prog}")
    assert "``" not in text and ":func:" not in text, f"{parser.prog} --help shows reStructuredText"
    assert not re.search(r":(class|mod|meth|attr|ref):`|^\s*\.\. \w+::", text, re.M), parser.prog
    assert isinstance(parser.formatter_class, type) and issubclass(parser.formatter_class, cli.HelpFormatter)


@pytest.mark.parametrize("name", ["tributary", *COMMANDS])
def test_every_flag_and_command_is_explained(name):
    parser = _parsers()[name]
    assert parser.description and parser.description.strip(), f"{parser.prog} has no description"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help and choice.help.strip(), f"tributary {choice.dest} has no summary"
            continue
        assert action.help and action.help.strip(), f"{parser.prog} {'/'.join(action.option_strings)} has no help"


@pytest.mark.parametrize("name", COMMANDS)
def test_defaults_are_shown(name):
    """A flag with a default worth showing either states one in its text or gets "(default: X)" appended."""
    parser = _parsers()[name]
    for action in parser._actions:
        if not action.option_strings or action.default in (None, False, "", argparse.SUPPRESS):
            continue
        assert "default" in _action_help(parser, action), f"{parser.prog} {action.option_strings[0]}"


def test_default_values_appear():
    up = _flat(_parsers()["up"].format_help())
    for shown in ("(default: 8000)", "(default: small)", "env TRIBUTARY_PREFIX; default: trib)",
                  "(default: 60.0)"):
        assert shown in up, shown


def test_redis_url_from_env_is_never_printed(monkeypatch):
    """A Redis URL may carry a password: help names the variable but never shows its value."""
    monkeypatch.setenv("TRIBUTARY_REDIS_URL", "redis://:hunter2-secret@redis.example:6379/0")
    for name, parser in _parsers().items():
        text = parser.format_help()
        assert "hunter2" not in text, name


def test_env_defaults_name_their_variable(monkeypatch):
    """Every flag whose default is read with ``_env("NAME")`` names TRIBUTARY_NAME in its help. The names are
    recorded as the parser is built (arguments are evaluated before ``add_argument`` runs), so a new flag cannot
    slip through."""
    real_env, real_add = cli._env, argparse._ActionsContainer.add_argument
    pending: list[str] = []
    read: list[tuple[argparse.Action, list[str]]] = []

    def env(name, default=None):
        pending.append(name)
        return real_env(name, default)

    def add_argument(self, *args, **kwargs):
        names = sorted(set(pending))
        pending.clear()
        action = real_add(self, *args, **kwargs)
        if names:
            read.append((action, names))
        return action

    monkeypatch.setattr(cli, "_env", env)
    monkeypatch.setattr(argparse._ActionsContainer, "add_argument", add_argument)
    parsers = _parsers()
    assert not pending, f"_env read outside any add_argument: {pending}"
    assert len(read) > 40, "too few env-backed flags recorded: did the recording break?"
    owner = {id(a): p for p in parsers.values() for a in p._actions}
    for action, names in read:
        parser = owner[id(action)]
        shown = _action_help(parser, action)
        for name in names:
            assert f"TRIBUTARY_{name}" in shown, f"{parser.prog} {action.option_strings[0]}: env TRIBUTARY_{name}"


def test_up_help_says_where_things_are():
    text = _flat(_parsers()["up"].format_help())
    assert "$XDG_CACHE_HOME/tributary/demo-<size>" in text
    assert "~/.cache/tributary/demo-<size>" in text
    assert str(cli.default_demo_dir("small")) in text  # the real path, for this user
    assert "embedded" in text and "unless --redis-url" in text


def test_export_onnx_help_says_where_the_output_goes():
    text = _flat(_parsers()["export-onnx"].format_help())
    assert "<model>/onnx/<modality>/model.onnx" in text
    assert "$XDG_CACHE_HOME/tributary/onnx/<fingerprint>/<modality>/" in text


def test_demo_model_help_says_where_the_weights_go():
    text = _flat(_parsers()["demo-model"].format_help())
    assert "--out" in text and "$XDG_CACHE_HOME/tributary/demo-<size>" in text


def test_backbone_is_described_as_a_pipeline_shard():
    parser = _parsers()["backbone"]
    text = _flat(parser.format_help())
    assert "every layer, for now" not in text
    assert "pipeline shard" in text and "--num-shards" in text
    summary = _flat(_parsers()["tributary"].format_help())
    assert "for now" not in summary


@pytest.mark.parametrize(("text", "want"), [
    ("x", "x (N)"),
    ("x (y)", "x (y; N)"),
    ("x (0: min(8, cores))", "x (0: min(8, cores); N)"),
    ("f(x) y", "f(x) y (N)"),
])
def test_notes_join_a_closing_parenthesis(text, want):
    assert cli._add_note(text, "N") == want


def test_fingerprint_keeps_the_hash_beside_the_checkpoint(tmp_path, capsys):
    """What every process reads at start rather than hashing the checkpoint (a read-only mount cannot keep it)."""
    from models.checkpoint import FINGERPRINT_FILE, fingerprint

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    assert cli.main(["fingerprint", "--model", str(model)]) == 0
    digest = capsys.readouterr().out.strip()
    assert len(digest) == 64 and (model / FINGERPRINT_FILE).is_file() and fingerprint(model) == digest
    assert cli.main(["fingerprint", "--model", str(tmp_path / "absent")]) == 2

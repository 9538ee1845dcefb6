"""Flags that catch typos: no prefix matching, "did you mean" for unknown flags and commands,
``--heads`` checked against the model's config before the weights load."""

from __future__ import annotations

import argparse

import pytest

from qkcov.cli import build_parser, main
from qkcov.models import loading
from qkcov.tasks.builtin import build_task_records
from qkcov.tasks.records import save_records


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_no_parser_matches_prefixes():
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 15 and all(p.allow_abbrev is False for p in parsers)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["agreement", "--hedas", "L13H8"], "qkcov agreement: error: unknown flag --hedas; did you mean --heads"),
        (["run", "--data", "x.jsonl", "--head", "L1H1"], "qkcov run: error: unknown flag --head; did you mean --heads"),
        (["run", "--hedas=L1H1"], "qkcov run: error: unknown flag --hedas; did you mean --heads"),
        (["rnu", "--data", "x"], "qkcov: error: unknown command 'rnu'; did you mean run?"),
        (["tasks", "export", "agreemnt"], "qkcov tasks export: error: unknown command 'agreemnt'; did you mean agreement?"),
        (["compare", "a", "b", "--jsn", "c"], "qkcov compare: error: unknown flag --jsn; did you mean --json?"),
    ],
)  # fmt: skip
def test_unknown_words_get_one_line_and_a_suggestion(argv, expected, capsys):
    assert main(argv) == 2
    assert _one_line(capsys).startswith(expected)


def test_export_keeps_its_own_head_flag(capsys):
    # --head is a real flag of `qkcov export`; there it is not refused as unknown
    assert main(["export", "/nonexistent/run", "--head", "L0H0", "--out", "x.safetensors"]) == 2
    assert "unknown flag" not in capsys.readouterr().err


def test_heads_out_of_range_refused_from_the_config_before_the_weights(
    tmp_path, monkeypatch, capsys
):
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(loading, "_load_cached", no_weights)
    data = tmp_path / "a.jsonl"
    save_records(data, build_task_records("agreement", n=20))
    out = tmp_path / "out"
    argv = ["run", "--data", str(data), "--out", str(out), "--heads", "L99H0", "--quiet"]
    assert main(argv) == 2
    line = _one_line(capsys)
    assert "L99H0" in line and "layer must be in [0, 29]" in line and "smollm2-135m" in line
    assert not out.exists()
    assert loading.config_geometry("smollm2-135m") == (30, 9)

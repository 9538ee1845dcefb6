"""Replacing a run folder says so in one line; a folder of run folders is refused with a
message that says what it is (not "files qkcov did not write")."""

from __future__ import annotations

from qkcov.artifacts import RunFolder, write_json
from qkcov.cli import main
from qkcov.tasks.builtin import build_task_records
from qkcov.tasks.records import save_records


def _fake_run(out, records="pronouns.jsonl"):
    with RunFolder(out, command="run") as staging:
        write_json(
            staging / "run.json",
            {"model": "m", "n_records": 3, "provenance": {"records": {"path": f"/d/{records}"}}},
        )


def test_replacing_a_run_says_which_run_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    _fake_run(out)
    assert capsys.readouterr().err == ""  # a new folder: nothing to say
    _fake_run(out, "other.jsonl")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"--out {out}: replacing the run of 20")
    assert "UTC on pronouns.jsonl (m)" in err[0]
    _fake_run(out)
    assert "on other.jsonl" in capsys.readouterr().err


def test_folder_of_runs_refused_as_such_before_the_model(tmp_path, capsys):
    root = tmp_path / "runs"
    _fake_run(root / "seed0")
    _fake_run(root / "seed1")
    data = tmp_path / "a.jsonl"
    save_records(data, build_task_records("agreement", n=12))
    argv = ["run", "--data", str(data), "--out", str(root), "--model", "/nonexistent/model"]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder of qkcov runs (seed0, seed1)" in err[0], err
    assert "did not write" not in err[0] and f"--out {root / 'new-run'}" in err[0]
    assert sorted(p.name for p in root.iterdir()) == ["seed0", "seed1"]


def test_a_run_json_of_another_shape_still_gets_its_line(tmp_path, capsys):
    out = tmp_path / "run"
    for _ in range(2):
        with RunFolder(out, command="run") as staging:
            (staging / "run.json").write_text("7")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("on unknown records (kept if this run fails)")

"""Hostile folders beside and inside ``--out``: qkcov removes or overwrites a path only if it
created it in this process or its content matches a hash qkcov wrote for it (issue 23).

Each test asserts a clear one-line error (or the correct result) and the user's files intact,
compared by content."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qkcov import artifacts
from qkcov.artifacts import RunFolder, atomic_write_bytes, verify_run_folder, write_json
from qkcov.cli import main


def _snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _one_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _forged_manifest(folder: Path, paths: list[str]) -> None:
    """A manifest in qkcov's format listing the user's files with wrong hashes."""
    files = [{"path": p, "size": 1, "sha256": "0" * 64} for p in paths]
    manifest = {"format": "qkcov-run/1", "command": "run", "files": files, "shared": True}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_force_never_deletes_a_listed_file_whose_hash_does_not_match(tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("\\documentclass{book}")
    (thesis / "chapters" / "ch1.tex").write_text("\\chapter{One}")
    _forged_manifest(thesis, ["thesis.tex", "chapters/ch1.tex"])
    before = {k: v for k, v in _snapshot(thesis).items() if k != "manifest.json"}
    with pytest.raises(ValueError, match="manifest.json is one the run would replace"):
        RunFolder(thesis, command="run", force=True)  # an unsealed manifest listing edited files
    (thesis / "manifest.json").unlink()
    _forged_manifest(thesis, ["thesis.tex", "chapters/ch1.tex"])
    forged = (thesis / "manifest.json").read_bytes()
    (thesis / "manifest.json").write_bytes(
        json.dumps(artifacts.seal_json(json.loads(forged))).encode()  # even a sealed one
    )
    with RunFolder(thesis, command="run", force=True) as stage:
        atomic_write_bytes(stage / "run.json", b"{}")
    after = _snapshot(thesis)
    assert {k: after[k] for k in before} == before  # both files kept, content unchanged
    assert verify_run_folder(thesis)["shared"] is True


def test_users_dot_folders_beside_out_are_left_alone_even_when_the_run_fails(tmp_path, capsys):
    out = tmp_path / "NAME"
    for name in (".NAME.staging-notes", ".NAME.old-2024", ".NAME.old-1-abc"):
        (tmp_path / name / "run").mkdir(parents=True)
        (tmp_path / name / "run" / "mine.txt").write_text(f"user {name}")
    before = _snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), RunFolder(out, command="x"):
        raise RuntimeError("boom")
    assert _snapshot(tmp_path) == before and not out.exists()  # nothing moved into --out
    err = capsys.readouterr().err
    assert err.count("was not made by qkcov") == 3 and ".NAME.staging-notes" in err


def test_users_checkpoint_folder_is_not_deleted_by_a_fresh_run(tmp_path, capsys):
    from qkcov.tasks.records import save_records
    from test_user_files import _records

    data = tmp_path / "r.jsonl"
    save_records(data, _records())
    ckpt = tmp_path / ".out.checkpoint"
    ckpt.mkdir()
    (ckpt / "fingerprint.json").write_text('{"mine": true}')
    before = _snapshot(ckpt)
    argv = ["run", "--data", str(data), "--model", "/nonexistent/model", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--checkpoint-every", "1"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert ".out.checkpoint exists and was not made by qkcov" in line
    assert _snapshot(ckpt) == before


def test_tasks_export_refuses_an_existing_file_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my own records\n")
    argv = ["tasks", "export", "agreement", "--out", str(mine)]
    assert main(argv) == 2
    assert "exists and was not written by qkcov" in _one_line(capsys.readouterr().err)
    assert mine.read_text() == "my own records\n"
    assert main([*argv, "--force"]) == 0  # asked for: replaced
    written = mine.read_bytes()
    assert main(argv) == 0 and mine.read_bytes() == written  # the same records again: fine


def test_lock_symlink_to_a_users_file_is_refused_and_the_file_untouched(tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("do not truncate")
    (tmp_path / ".out.lock").symlink_to(precious)
    with pytest.raises(ValueError, match="is a symbolic link, not a qkcov lock"):
        RunFolder(tmp_path / "out", command="x")
    assert precious.read_text() == "do not truncate" and (tmp_path / ".out.lock").is_symlink()


def test_users_lock_named_file_is_neither_truncated_nor_deleted(tmp_path):
    lock = tmp_path / ".out.lock"
    lock.write_text("my notes about locks\n")
    with pytest.raises(ValueError, match="was not written by qkcov"):
        RunFolder(tmp_path / "out", command="x")
    assert lock.read_text() == "my notes about locks\n"


def test_lock_is_created_exclusively_and_released(tmp_path):
    with RunFolder(tmp_path / "out", command="x") as stage:
        lock = tmp_path / ".out.lock"
        assert lock.read_text().split()[:2] == ["qkcov-lock", str(os.getpid())]
        atomic_write_bytes(stage / "a.json", b"1")
    assert not lock.exists()


def test_compare_json_overwrites_only_its_own_unedited_file(tmp_path, capsys):
    mine = tmp_path / "mine.json"
    mine.write_text('{"only_in_one": "this text does not make it qkcov\'s"}')
    assert main(["compare", "a", "b", "--json", str(mine)]) == 2  # refused before any work
    assert "exists and was not written by qkcov" in _one_line(capsys.readouterr().err)
    assert "only_in_one" in mine.read_text() and "this text" in mine.read_text()
    page = tmp_path / "page.html"
    page.write_text("<meta name='generator' content='qkcov-multi-run'> my page")
    assert main(["compare", "a", "b", "--out", str(page)]) == 2
    assert page.read_text().endswith("my page")
    ours = tmp_path / "ours.json"
    write_json(ours, {"format": "qkcov-compare/1"}, seal=True)
    assert artifacts.is_sealed(ours)
    artifacts.check_replaceable(ours)  # qkcov's own, unedited: replaceable
    ours.write_text(ours.read_text().replace("qkcov-compare/1", "edited"))
    with pytest.raises(ValueError, match="was not written by qkcov"):
        artifacts.check_replaceable(ours)


def test_out_inside_a_complete_run_is_refused(tmp_path, capsys):
    outer = tmp_path / "outer"
    with RunFolder(outer, command="x") as stage:
        atomic_write_bytes(stage / "run.json", b"{}")
    before = _snapshot(outer)
    with pytest.raises(ValueError, match="is inside the complete qkcov run"):
        RunFolder(outer / "inner", command="y")
    assert _snapshot(outer) == before and not (outer / "inner").exists()
    verify_run_folder(outer)


def test_force_refuses_a_colliding_figure_name_before_any_work(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    (project / "L13H8.scree.png").write_bytes(b"my own figure")
    with pytest.raises(ValueError, match=r"L13H8\.scree\.png is one the run would replace"):
        RunFolder(project, command="run", force=True)  # at once, not after the compute
    assert (project / "L13H8.scree.png").read_bytes() == b"my own figure"


def test_second_force_run_keeps_a_run_file_the_user_edited(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with RunFolder(project, command="a", force=True) as stage:
        atomic_write_bytes(stage / "run.json", b"A")
        atomic_write_bytes(stage / "extra.json", b"A")
    (project / "run.json").write_text("my edit of run.json")
    with pytest.raises(ValueError, match="changed since"):
        RunFolder(project, command="b", force=True)
    assert (project / "run.json").read_text() == "my edit of run.json"
    (project / "run.json").unlink()
    (project / "extra.json").write_text("my edit of extra.json")  # listed, not rewritten
    with RunFolder(project, command="b", force=True) as stage:
        atomic_write_bytes(stage / "run.json", b"B")
    assert (project / "extra.json").read_text() == "my edit of extra.json"
    assert (project / "notes.txt").read_text() == "mine"


def test_force_collision_at_commit_keeps_the_computed_run(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "figure.svg").write_text("my figure")
    with (
        pytest.raises(ValueError, match="the new run is in"),
        RunFolder(project, command="run", force=True) as stage,
    ):
        atomic_write_bytes(stage / "figure.svg", b"new")
    assert (project / "figure.svg").read_text() == "my figure"
    assert (tmp_path / "project.new-run" / "figure.svg").read_bytes() == b"new"


CHILD = """
import argparse, sys, time
import qkcov.cli as c
from qkcov.artifacts import RunFolder, atomic_write_bytes
def slow(args):
    with RunFolder(sys.argv[1], command="x") as s:
        atomic_write_bytes(s / "half.json", b"1")
        print("writing", flush=True)
        time.sleep(60)
p = argparse.ArgumentParser()
p.set_defaults(func=slow, command="slow")
c.build_parser = lambda: p
sys.exit(c.main([]))
"""


def test_sigterm_cleans_the_lock_and_the_staging_folder(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == b"writing"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "terminated (SIGTERM)" in _one_line(err.decode())
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock, no staging, no run

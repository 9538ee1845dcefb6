"""One complete run per output folder; the report reads only verified files inside it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from qkcov.artifacts import (
    MANIFEST_FILE,
    RunFolder,
    atomic_write_bytes,
    verify_run_folder,
    write_json,
)
from qkcov.cli import main
from qkcov.report.html import write_section


def _run(out, files: dict[str, bytes], command: str = "qkcov test") -> None:
    with RunFolder(out, command=command) as stage:
        for rel, data in files.items():
            atomic_write_bytes(stage / rel, data)


def _section_run(out, extra: dict[str, bytes] | None = None) -> None:
    with RunFolder(out, command="qkcov test") as stage:
        (stage / "exp").mkdir()
        atomic_write_bytes(stage / "exp" / "fig.png", b"\x89PNG fake")
        write_section(stage / "exp", key="k", title="T", figures=[{"file": "fig.png"}])
        for rel, data in (extra or {}).items():
            atomic_write_bytes(stage / rel, data)


def test_success_writes_manifest_last_and_replaces_whole_folder(tmp_path):
    out = tmp_path / "run"
    _run(out, {"a.json": b"1", "sub/b.bin": b"22"})
    _run(out, {"c.json": b"333"}, command="qkcov second")
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["c.json", MANIFEST_FILE]
    manifest = verify_run_folder(out)
    assert manifest["command"] == "qkcov second"
    assert [(f["path"], f["size"]) for f in manifest["files"]] == [("c.json", 3)]
    # nothing left beside it, not even the lock file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_manifest_lists_sub_runs_recursively(tmp_path):
    _run(tmp_path / "run", {"toy/ranks/r.json": b"{}", "filter/x.bin": b"x"})
    paths = [f["path"] for f in verify_run_folder(tmp_path / "run")["files"]]
    assert paths == ["filter/x.bin", "toy/ranks/r.json"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_run_killed_halfway_leaves_previous_run_intact(tmp_path, exc):
    out = tmp_path / "run"
    _run(out, {"a.json": b"old"})
    with pytest.raises(type(exc)), RunFolder(out, command="qkcov x") as stage:
        atomic_write_bytes(stage / "a.json", b"new, half written")
        raise exc
    assert (out / "a.json").read_bytes() == b"old"
    verify_run_folder(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # staging and lock gone
    _run(out, {"a.json": b"again"})  # the lock was released


def test_second_concurrent_run_is_refused(tmp_path):
    out = tmp_path / "run"
    first = RunFolder(out, command="qkcov a")
    with first as stage:
        atomic_write_bytes(stage / "x", b"1")
        with pytest.raises(
            ValueError,
            match=rf"--out .*run: another qkcov run is writing there \(pid {os.getpid()}\)",
        ):
            RunFolder(out, command="qkcov b")
    assert (out / "x").read_bytes() == b"1"


def test_lock_held_by_another_process_is_refused(tmp_path):
    out = tmp_path / "run"
    code = (
        "import sys,time;from qkcov.artifacts import RunFolder;"
        f"r=RunFolder({str(out)!r},command='x');print('locked',flush=True);time.sleep(30)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(
            ValueError, match=rf"another qkcov run is writing there \(pid {proc.pid}\)"
        ):
            RunFolder(out, command="y")
    finally:
        proc.kill()
        proc.wait()
    RunFolder(out, command="z").close()  # released when the holder died


def test_bad_out_is_refused_immediately(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, expected a folder"):
        RunFolder(tmp_path / "file", command="x")
    with pytest.raises(ValueError, match="cannot create its parent folder"):
        RunFolder(tmp_path / "file" / "sub" / "out", command="x")
    with pytest.raises(ValueError, match="--out"):
        RunFolder("", command="x")


def test_verify_names_first_mismatch(tmp_path):
    out = tmp_path / "run"
    _run(out, {"a.json": b"1", "b.json": b"2"})
    (out / "a.json").write_bytes(b"9")
    with pytest.raises(ValueError, match="a.json was modified"):
        verify_run_folder(out)
    (out / "a.json").write_bytes(b"1")
    (out / "b.json").unlink()
    with pytest.raises(ValueError, match="b.json is missing"):
        verify_run_folder(out)
    (out / "b.json").write_bytes(b"2")
    (out / "stray.json").write_bytes(b"{}")
    with pytest.raises(ValueError, match="stray.json is not in the manifest"):
        verify_run_folder(out)
    (out / MANIFEST_FILE).unlink()
    with pytest.raises(ValueError, match="no manifest: incomplete run"):
        verify_run_folder(out)


def test_report_verifies_then_records_itself(tmp_path, capsys):
    out = tmp_path / "run"
    _section_run(out)
    assert main(["report", str(out)]) == 0
    paths = [f["path"] for f in verify_run_folder(out)["files"]]
    assert "report.html" in paths and "report_index.json" in paths
    page = (out / "report.html").read_text()
    assert 'src="exp/fig.png"' in page and "exp/fig.png" in paths  # the manifest's own copy
    assert main(["report", str(out)]) == 0  # re-running replaces its own entries
    verify_run_folder(out)


def test_report_refuses_tampered_or_incomplete_folder(tmp_path, capsys):
    out = tmp_path / "run"
    _section_run(out)
    (out / "exp" / "fig.png").write_bytes(b"tampered")
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fig.png was modified" in err
    assert not (out / "report.html").exists()
    # a folder of runs: its index refuses the mixed run inside, naming the file
    assert main(["report", str(tmp_path)]) == 2
    assert "fig.png was modified" in capsys.readouterr().err
    assert not (tmp_path / "index.html").exists()
    bare = tmp_path / "bare"  # a section without a manifest: an incomplete run
    bare.mkdir()
    write_json(bare / "section.json", {"key": "k", "title": "t"})
    assert main(["report", str(bare)]) == 2
    assert "no manifest: incomplete run" in capsys.readouterr().err


@pytest.mark.parametrize("escape", ["../../outside.png", "ABS", "LINK"])
def test_report_refuses_files_outside_the_folder(tmp_path, escape):
    secret = tmp_path / "outside.png"
    secret.write_bytes(b"secret bytes")
    root = tmp_path / "a" / "b"
    sec = root / "exp"
    sec.mkdir(parents=True)
    if escape == "LINK":
        (sec / "fig.png").symlink_to(secret)
        rel = "fig.png"
    else:
        rel = str(secret) if escape == "ABS" else escape
    write_json(sec / "section.json", {"key": "evil", "title": "t", "figures": [{"file": rel}]})
    from qkcov.report import build_report

    with pytest.raises(ValueError, match=r"section 'evil'.*outside the report folder"):
        build_report(root)
    assert not (root / "report.html").exists()


def test_report_refuses_etc_hostname(tmp_path):
    write_json(
        tmp_path / "section.json",
        {"key": "h", "title": "t", "interactive": [{"file": "/etc/hostname"}]},
    )
    from qkcov.report import build_report

    with pytest.raises(ValueError, match="/etc/hostname.*outside"):
        build_report(tmp_path)


@pytest.mark.parametrize("text", ['{"key": "x", "title": "t", "fig', "\xff\xfe", "[1, 2]"])
def test_invalid_section_file_is_one_line_naming_it(tmp_path, text):
    (tmp_path / "section.json").write_bytes(text.encode("latin-1"))
    from qkcov.report import build_report

    with pytest.raises(ValueError, match=r"section\.json: not a valid section file") as info:
        build_report(tmp_path)
    assert "\n" not in str(info.value)


def test_files_and_folders_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        _run(tmp_path / "run", {"sub/b.bin": b"1"})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.json") == 0o644
    assert mode(tmp_path / "run" / "sub" / "b.bin") == 0o644
    assert mode(tmp_path / "run" / MANIFEST_FILE) == 0o644
    assert mode(tmp_path / "run") == 0o755
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_toy_command_writes_through_a_run_folder(tmp_path, monkeypatch, capsys):
    import torch

    from qkcov.toy import experiments

    out = tmp_path / "toy"
    seen = []

    def fake(out_dir, cfg, **kw):
        seen.append(out_dir)
        write_json(out_dir / "interaction.json", {"ok": len(seen)})
        if len(seen) == 2:
            raise KeyboardInterrupt
        return {"off_block_fraction": 0.5, "G": torch.zeros(2, 2)}

    monkeypatch.setattr(experiments, "run_interaction", fake)
    assert main(["toy", "interaction", "--out", str(out), "--quiet"]) == 0
    assert seen[0] != out and not seen[0].exists()  # it wrote into the staging folder
    manifest = verify_run_folder(out)
    assert manifest["command"].startswith("qkcov toy interaction --out")
    assert main(["toy", "interaction", "--out", str(out), "--quiet"]) == 130  # Ctrl-C halfway
    assert json.loads((out / "interaction.json").read_text()) == {"ok": 1}
    verify_run_folder(out)
    assert capsys.readouterr().err.strip() == "qkcov toy: interrupted"

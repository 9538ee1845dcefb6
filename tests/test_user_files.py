"""A user's files are never removed: --out is replaced only when empty or a verified qkcov
run, --force writes beside foreign files, names from records never become paths."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from qkcov import artifacts
from qkcov.artifacts import (
    MANIFEST_FILE,
    RunFolder,
    atomic_write_bytes,
    read_run_files,
    save_tensors,
    verify_run_folder,
)
from qkcov.cli import main
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.naming import safe_component
from qkcov.pipeline import RunConfig, RunState, analyze
from qkcov.results import AnalysisResult
from qkcov.tasks.records import ContrastRecord, Span, save_records

FAST = dict(n_random=20, n_permutations=20, n_bootstrap=0, batch_size=16)
FAST_FLAGS = ["--n-random", "20", "--n-permutations", "20", "--n-bootstrap", "0", "--quiet"]
NO_MODEL = ["--model", "/nonexistent/model"]  # reaching the model load fails differently


def _snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` (hidden ones too) with its sha256."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _user_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in {
        "notes.txt": "my notes",
        ".hidden": "dotfile",
        "src/model.py": "print(1)",
        "data/deep/x.csv": "a,b\n1,2",
        "figures/scan.png": "not qkcov's",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _records(n: int = 24, feature: str | None = None, groups=("red", "blue")) -> list:
    recs = []
    for i in range(n):
        word = ["cat", "dog", "cow", "pig"][i % 4]
        prompt = f"the {word} and the hen met {i % 7}"
        pos, neg = Span(4, 7, label=word), Span(16, 19, label="hen")
        g = None if groups is None else groups[i % len(groups)]
        recs.append(ContrastRecord(prompt, (pos,), (neg,), group=g, feature=feature))
    return recs


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "records" / "r.jsonl"
    path.parent.mkdir()
    save_records(path, _records())
    return path


# --------------------------------------------------------------------------- output folder
def test_a_users_folder_is_refused_before_the_model_loads(tmp_path, data, capsys):
    project = _user_folder(tmp_path / "project")
    before = _snapshot(project)
    rc = main(["run", "--data", str(data), "--out", str(project), *NO_MODEL])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert str(project) in err and "--force" in err and "new folder" in err
    assert "no qkcov manifest" in err
    assert _snapshot(project) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "records"]


def test_a_run_folder_with_an_added_file_is_refused(tmp_path, data, capsys):
    out = tmp_path / "run"
    with RunFolder(out, command="x") as stage:
        atomic_write_bytes(stage / "run.json", b"{}")
    (out / "mine.txt").write_text("keep me")
    rc = main(["run", "--data", str(data), "--out", str(out), *NO_MODEL])
    err = capsys.readouterr().err
    assert rc == 2 and "mine.txt is not in the manifest" in err and "--force" in err
    assert (out / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", ["cwd", "parent-of-cwd", "home", "records-folder", "root"])
def test_protected_places_are_refused(where, tmp_path, data, monkeypatch, capsys):
    work = _user_folder(tmp_path / "work" / "sub")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    out = {
        "cwd": ".",
        "parent-of-cwd": str(tmp_path / "work"),
        "home": "~",
        "records-folder": str(data.parent),
        "root": "/",
    }[where]
    before = _snapshot(tmp_path)
    rc = main(["run", "--data", str(data), "--out", out, "--force", *NO_MODEL])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "pick a new folder" in err and "qkcov-run" in err
    expected = {
        "cwd": "the working directory",
        "parent-of-cwd": "a parent of the working directory",
        "home": "your home folder",
        "records-folder": "a folder holding",
        "root": "the filesystem root",
    }[where]
    assert expected in err
    assert _snapshot(tmp_path) == before


def test_empty_out_is_refused_by_the_parser_and_runfolder(tmp_path, data, monkeypatch, capsys):
    work = _user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    before = _snapshot(work)
    with pytest.raises(SystemExit) as info:
        main(["run", "--data", str(data), "--out", "", *NO_MODEL])
    assert info.value.code == 2
    assert "--out: expected a folder path, got ''" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--out"):
        RunFolder("", command="x")
    with pytest.raises(ValueError, match="the working directory"):
        RunFolder(Path(""), command="x")  # Path('') is '.'
    assert _snapshot(work) == before


def test_force_writes_inside_and_keeps_every_foreign_file(tmp_path, tiny_dir, data, capsys):
    project = _user_folder(tmp_path / "project")
    before = _snapshot(project)
    argv = ["run", "--data", str(data), "--model", str(tiny_dir), "--heads", "L0H1", *FAST_FLAGS]
    assert main([*argv, "--out", str(project), "--force"]) == 0
    after = _snapshot(project)
    assert {k: after[k] for k in before} == before  # every user file as it was
    manifest = verify_run_folder(project)
    assert manifest["shared"] is True and "run.json" in after and "report.html" in after
    assert not set(before) & {f["path"] for f in manifest["files"]}
    assert AnalysisResult.load(project).n_records == 24
    # without --force the shared folder is still refused; with it, the run is replaced
    assert main([*argv, "--out", str(project), "--seed", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--out", str(project), "--seed", "1", "--force"]) == 0
    again = _snapshot(project)
    assert {k: again[k] for k in before} == before
    assert set(again) - set(before) == {f["path"] for f in verify_run_folder(project)["files"]} | {
        MANIFEST_FILE
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "records"]


def test_force_refuses_when_a_run_file_name_is_taken(tmp_path, data, capsys):
    project = _user_folder(tmp_path / "project")
    (project / "run.json").write_text("my own run.json")
    before = _snapshot(project)
    rc = main(["run", "--data", str(data), "--out", str(project), "--force", *NO_MODEL])
    err = capsys.readouterr().err
    assert rc == 2 and "run.json is one the run would replace" in err
    assert _snapshot(project) == before
    # a name known only at commit (a sub-run file) is refused then, still keeping everything
    (project / "run.json").unlink()
    before = _snapshot(project)
    refused = pytest.raises(ValueError, match="notes.txt is one the run would replace")
    with refused, RunFolder(project, command="x", force=True) as stage:
        atomic_write_bytes(stage / "notes.txt", b"qkcov")
    assert _snapshot(project) == before


def test_previous_run_is_replaced_whole_and_kept_until_commit(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, command="a") as stage:
        atomic_write_bytes(stage / "old.json", b"old")
    seen = []
    with RunFolder(out, command="b") as stage:
        atomic_write_bytes(stage / "new.json", b"new")
        seen.append(_snapshot(out))  # during the run the previous one is untouched
    assert "old.json" in seen[0] and verify_run_folder(out)["command"] == "b"
    assert sorted(_snapshot(out)) == [MANIFEST_FILE, "new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_files_added_during_a_run_are_kept_and_the_new_run_set_beside(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, command="a") as stage:
        atomic_write_bytes(stage / "a.json", b"1")
    refused = pytest.raises(ValueError, match="appeared there during the run")
    with refused as info, RunFolder(out, command="b") as stage:
        atomic_write_bytes(stage / "a.json", b"2")
        (out / "late.txt").write_text("user")
    assert (out / "late.txt").read_text() == "user" and (out / "a.json").read_bytes() == b"1"
    assert (tmp_path / "run.new-run" / "a.json").read_bytes() == b"2"
    assert "run.new-run" in str(info.value)


def test_commit_is_one_exchange_and_a_killed_two_rename_commit_is_put_back(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if artifacts._exchange(a, b):  # Linux: out is never missing during a replace
        assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    out = tmp_path / "run"
    with RunFolder(out, command="first") as stage:
        atomic_write_bytes(stage / "a.json", b"first")
    # a commit killed between its two renames: only the hidden old copy is left
    dead = tmp_path / ".run.old-999999999-abc"
    _dead_run_dir(dead, "abc")
    os.replace(out, dead / "run")
    _dead_run_dir(tmp_path / ".run.staging-999999999-def", "def")
    (tmp_path / ".run.lock").write_text("999999999\n")
    RunFolder(out, command="next").close()
    assert verify_run_folder(out)["command"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "run"]


def _dead_run_dir(path, token):
    """A leftover folder as a killed qkcov run leaves it: its marker names a gone pid."""
    artifacts.make_owned_dir(path, token)
    marker = path / artifacts.OWNER_FILE
    marker.write_text(marker.read_text().replace(f'"pid": {os.getpid()}', '"pid": 999999999'))


def test_stale_leftovers_of_a_killed_run_are_cleaned(tmp_path, capsys):
    out = tmp_path / "run"
    for name in (".run.staging-999999999-x", ".run.old-999999999-y"):
        _dead_run_dir(tmp_path / name, name.rsplit("-", 1)[1])
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "f").write_text("stale")
    (tmp_path / ".run.staging-oldformat").mkdir()  # no marker: the user's, left alone
    (tmp_path / ".run.lock").write_text("999999999\n")
    (tmp_path / ".other.staging-1-x").mkdir()  # another folder's: not ours to touch
    with RunFolder(out, command="x") as stage:
        atomic_write_bytes(stage / "a.json", b"1")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".other.staging-1-x", ".run.staging-oldformat", "run"]
    assert ".run.staging-oldformat was not made by qkcov" in capsys.readouterr().err


def test_a_reader_never_mixes_two_runs(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with RunFolder(out, command="a") as stage:
        atomic_write_bytes(stage / "run.json", b"A")
        atomic_write_bytes(stage / "run.safetensors", b"AA")
    real, calls = artifacts.verify_run_folder, []

    def verify_then_replace(path):
        manifest = real(path)
        if not calls:  # a new run commits right after the reader verified the old one
            calls.append(1)
            with RunFolder(out, command="b") as stage:
                atomic_write_bytes(stage / "run.json", b"B")
                atomic_write_bytes(stage / "run.safetensors", b"BB")
        return manifest

    monkeypatch.setattr(artifacts, "verify_run_folder", verify_then_replace)
    assert read_run_files(out, ["run.json", "run.safetensors"]) == {
        "run.json": b"B",
        "run.safetensors": b"BB",
    }


def test_disk_full_is_one_line_naming_the_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kw):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(artifacts, "save_file", full)
    with pytest.raises(OSError, match="disk full") as info:
        save_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    assert info.value.filename == str(tmp_path / "t.safetensors")
    assert list(tmp_path.iterdir()) == []  # no temp file left
    from qkcov.cli import _describe

    assert "\n" not in _describe(info.value) and "t.safetensors" in _describe(info.value)


# --------------------------------------------------------------------------- names
TRICKY = ["../x", "/abs", "a/b", "a\x00b", "x" * 300, "A", "a", "a.b", "b.c", "c", "É", "e", "",
          "$\\frac{a}$", "CON", ".", "..", "a~b", "a b", "\u202e"]  # fmt: skip


def test_safe_component_is_a_plain_injective_file_name():
    comps = [safe_component(n) for n in TRICKY]
    assert len(set(comps)) == len(TRICKY)
    assert len({c.lower() for c in comps}) == len(TRICKY)  # case-insensitive filesystems
    for c in comps:
        assert c and len(c) <= 48 and c == c.lower() and c.isascii()
        assert not set(c) & set("/\\\x00.:$ ") and c not in (".", "..")
    assert safe_component("order") == "order" and safe_component("a") == "a"


def test_feature_names_never_become_paths(tmp_path, tiny_dir):
    data = tmp_path / "in" / "r.jsonl"
    data.parent.mkdir()
    save_records(data, _records(feature="/../../../victim/model"))
    out = tmp_path / "deep" / "er" / "out"
    argv = ["run", "--data", str(data), "--model", str(tiny_dir), "--heads", "L0H1", *FAST_FLAGS]
    assert main([*argv, "--out", str(out), "--checkpoint-every", "1"]) == 0
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert all(f.startswith(("in/", "deep/er/out/")) for f in files), files
    assert not any("victim" in f or f.endswith("model.safetensors") for f in files)
    cfg = RunConfig(checkpoint_every=1)
    state = RunState(out, cfg, _records(), resume=False)
    ck = state.contrast("/../../../victim/model")
    assert Path(ck.path).parent == state.dir and "/" not in Path(ck.path).name[:-12]
    state.finish()


def test_tricky_names_survive_a_run_and_load(tmp_path):
    """``a.b``/``c`` and ``a``/``b.c`` (once one tensor name), case twins, TeX, NUL."""
    recs = (
        _records(12, feature="a.b", groups=("c", "$\\frac{a}$"))
        + _records(12, feature="a", groups=("b.c", "C"))
        + _records(12, feature="A\x00/..", groups=("x" * 200, "É"))
    )
    model, tok = tiny_model("llama"), tiny_tokenizer()
    result = analyze(model, tok, recs, heads="L0H1", progress=False, **FAST)
    result.save(tmp_path / "out")
    loaded = AnalysisResult.load(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    for h, g in zip(result.heads, loaded.heads, strict=True):
        assert list(h.features) == list(g.features) == ["a.b", "a", "A\x00/.."]
        for f in h.features:
            assert list(h.features[f].groups) == list(g.features[f].groups)
            for name, s in h.features[f].groups.items():
                torch.testing.assert_close(g.features[f].groups[name].delta, s.delta)
    d = result.heads[0].features
    assert not torch.allclose(d["a.b"].groups["c"].delta, d["a"].groups["b.c"].delta)
    assert (tmp_path / "out" / "report.html").is_file()  # the TeX-like group was drawn as text


@pytest.mark.parametrize(
    ("feature", "group", "message"),
    [
        ("all", "g", "feature 'all' is a name qkcov uses"),
        ("null", "g", "feature 'null'"),
        ("ceiling", "g", "feature 'ceiling'"),
        ("residual", "g", "feature 'residual'"),
        ("x@energy", "g", "feature 'x@energy'"),
        ("x:groups", "g", "feature 'x:groups'"),
        ("f", "pooled", "group 'pooled' cannot be told from the pooled result"),
        ("f", "", "an empty group"),
    ],
)
def test_reserved_names_are_refused_naming_lines(feature, group, message, tmp_path, capsys):
    data = tmp_path / "r.jsonl"
    save_records(data, _records(8, feature="ok") + _records(4, feature=feature, groups=(group,)))
    rc = main(["run", "--data", str(data), "--out", str(tmp_path / "out"), *NO_MODEL])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "line 9, line 10, line 11, line 12" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_mixed_group_and_no_group_is_one_line_before_the_model(tmp_path, capsys):
    data = tmp_path / "r.jsonl"
    save_records(data, _records(6) + _records(3, groups=None))
    rc = main(["run", "--data", str(data), "--out", str(tmp_path / "out"), *NO_MODEL])
    err = capsys.readouterr().err
    assert rc == 2 and "3 have no group (line 7, line 8, line 9)" in err
    assert "a group on every record of a feature, or on none" in err


def test_kill_9_leftovers_are_cleaned_by_the_next_run(tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    code = (
        "import time;from qkcov.artifacts import RunFolder, atomic_write_bytes;"
        f"r=RunFolder({str(out)!r},command='x');s=r.__enter__();"
        "atomic_write_bytes(s/'half.json',b'1');print('writing',flush=True);time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert ".run.lock" in left and any(n.startswith(".run.staging-") for n in left)
    with RunFolder(out, command="next") as stage:
        atomic_write_bytes(stage / "a.json", b"1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert [f["path"] for f in verify_run_folder(out)["files"]] == ["a.json"]


def test_symlinked_out_writes_the_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with RunFolder(tmp_path / "link", command="x") as stage:
        atomic_write_bytes(stage / "a.json", b"1")
    assert (tmp_path / "link").is_symlink() and verify_run_folder(target)["command"] == "x"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is a broken symbolic link"):
        RunFolder(tmp_path / "dangling", command="x")


def test_concurrent_replaces_never_give_a_mixed_read(tmp_path):
    import threading

    out = tmp_path / "run"

    def commit(n: int) -> None:
        with RunFolder(out, command=f"run {n}") as stage:
            atomic_write_bytes(stage / "run.json", str(n).encode())
            atomic_write_bytes(stage / "run.safetensors", str(n).encode() * 2)

    commit(0)
    done, seen = threading.Event(), []

    def writer() -> None:
        for n in range(1, 40):
            commit(n)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while not done.is_set():
            got = read_run_files(out, ["run.json", "run.safetensors"])
            assert got["run.safetensors"] == got["run.json"] * 2  # both files from one run
            seen.append(int(got["run.json"]))
    finally:
        thread.join()
    assert seen and seen == sorted(seen)

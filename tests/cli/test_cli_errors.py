"""Every error reaching ``qkcov`` is one line naming the file (exit 2); Ctrl-C is exit 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from qkcov import cli
from qkcov.cli import main
from qkcov.tasks.records import load_records


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize(
    "exc",
    [
        PermissionError(13, "Permission denied", "/data/x.json"),
        IsADirectoryError(21, "Is a directory", "/data/dir"),
        OSError(28, "No space left on device", "/out/big.safetensors"),
    ],
)
def test_os_errors_are_one_line_naming_the_file(monkeypatch, capsys, exc):
    def boom(args):
        raise exc

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["report"].set_defaults(func=boom)
    assert main(["report", "x"]) == 2
    assert _one_line(capsys) == f"qkcov report: error: {exc.filename}: {exc.strerror}"


def test_real_os_error_names_the_file(tmp_path, capsys):
    from qkcov.artifacts import RunFolder, write_json

    with RunFolder(tmp_path / "run", command="qkcov test") as stage:
        write_json(stage / "section.json", {"key": "k", "title": "t"})
        (stage / "report.html").mkdir()  # the report cannot be written over a folder
    assert main(["report", str(tmp_path / "run")]) == 2
    line = _one_line(capsys)
    assert line == f"qkcov report: error: {tmp_path / 'run' / 'report.html'}: Is a directory"


def test_decode_and_json_errors_are_one_line(monkeypatch, capsys):
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    report = parser._subparsers._group_actions[0].choices["report"]
    for exc, text in [
        (b"\xff".decode, "not valid UTF-8"),
        (lambda: json.loads("{"), "invalid JSON"),
    ]:

        def boom(args, exc=exc):
            exc()

        report.set_defaults(func=boom)
        assert main(["report", "x"]) == 2
        assert text in _one_line(capsys)


def test_ctrl_c_anywhere_is_exit_130(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)  # i.e. while importing commands
    assert main(["contrast", "--help"]) == 130
    assert _one_line(capsys) == "qkcov contrast: interrupted"


def test_cli_entry_point_imports_no_torch():
    code = "import sys, qkcov.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["False", "False"], out.stderr


# Runs `python -m qkcov`; when the first heavy import (torch, numpy, ...) starts it says so on
# stdout and waits there for the signal, so the Ctrl-C lands inside the CLI's own imports
# however loaded the machine is (the KeyboardInterrupt leaves the hook through the import).
_SIGNAL_WHEN_IMPORTING = """
import runpy, sys, time
_seen = []
def _hook(event, args):
    if event == "import" and not _seen and str(args[0]).split(".")[0] in {"torch", "numpy", "plotly", "matplotlib"}:
        _seen.append(args[0])
        print("importing", args[0], flush=True)
        time.sleep(60)  # the test's SIGINT interrupts this
sys.addaudithook(_hook)
sys.argv = ["qkcov", *sys.argv[1:]]
runpy.run_module("qkcov", run_name="__main__", alter_sys=True)
"""


def test_sigint_during_heavy_imports_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGNAL_WHEN_IMPORTING, "report", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()  # blocks until the heavy imports begin
    assert line.startswith("importing "), line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["qkcov report: interrupted"]


def test_non_utf8_records_file_names_file_and_line(tmp_path):
    path = tmp_path / "recs.jsonl"
    good = '{"prompt": "a b", "positives": [{"text": "b"}]}\n'
    path.write_bytes(good.encode() + b'{"prompt": "caf\xe9 b", "positives": []}\n')
    with pytest.raises(
        ValueError, match=r"recs\.jsonl: line 2: not valid UTF-8 \(byte 0xe9 at column 16\)"
    ):
        load_records(path)


def test_line_separator_inside_a_prompt_stays_one_record(tmp_path):
    path = tmp_path / "recs.jsonl"
    rec = {"prompt": "a\u2028b\x85c d", "positives": [{"text": "d"}]}
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    (r,) = load_records(path)
    assert r.prompt == rec["prompt"] and r.line == 1

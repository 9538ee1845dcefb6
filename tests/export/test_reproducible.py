"""run.json provenance (dtype/device used, records file + sha256 + lines, versions, command
line), --device auto, explicit --heads without the all-head scan, to_rows and short reprs."""

from __future__ import annotations

import hashlib
import json

import torch

from qkcov.artifacts import read_json
from qkcov.cli import main
from qkcov.engine.contrast import resolve_records
from qkcov.engine.scan import attention_rows
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.pipeline import RunConfig, auto_device
from qkcov.tasks.builtin import build_task_records
from qkcov.tasks.records import save_records


def test_run_json_provenance(tiny_dir, tmp_path):
    data = tmp_path / "records.jsonl"
    save_records(data, build_task_records("agreement", n=30))
    lines = data.read_text().split("\n")
    data.write_text("\n".join(lines[:3] + [""] + lines[3:]))  # a blank line 4
    out = tmp_path / "run"
    argv = ["run", "--data", str(data), "--model", str(tiny_dir), "--heads", "L1H2", "--quiet",
            "--n-random", "20", "--n-permutations", "20", "--n-bootstrap", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    prov = read_json(out / "run.json")["provenance"]
    assert prov["dtype"] == "float32" and prov["device"] == "cpu"
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["qkcov"]
    assert prov["command_line"].startswith("qkcov run --data ")
    rec = prov["records"]
    assert rec["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert rec["path"] == str(data.absolute())
    build, held = rec["build_lines"], rec["heldout_lines"]
    assert 4 not in build + held and sorted(build + held) == [1, 2, 3, *range(5, 32)]
    assert len(held) == round(0.3 * 30)
    cfg = read_json(out / "run.json")["config"]
    assert cfg["device"] == "cpu"  # --device auto resolved (no CUDA here)
    # a record's line really is that record
    assert json.loads(data.read_text().split("\n")[held[0] - 1])["prompt"]


def test_device_auto():
    assert RunConfig().device == "auto"
    assert auto_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert auto_device("cpu") == "cpu"


def test_explicit_heads_rows_equal_full_scan():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    res = resolve_records(tok, build_task_records("agreement", n=8))
    full = attention_rows(model, tok, res, progress=False)
    part = attention_rows(model, tok, res, progress=False, layers=[0])
    assert torch.equal(part[:, 0], full[:, 0]) and not part[:, 1].any()


def test_to_rows_and_reprs(tiny_run):
    result, _ = tiny_run
    rows = result.to_rows()
    assert [r["head"] for r in rows] == ["L1H2", "L0H1"]
    assert all(isinstance(r["rank"], int) and "delta_p" in r for r in rows)
    for obj in (result, result.heads[0], result.heads[0].swaps, result.heads[0].attribution,
                result.heads[0].features["feature"], result.heads[0].headline):  # fmt: skip
        text = repr(obj)
        assert len(text) < 300 and "tensor(" not in text, text
    assert "<table>" in result._repr_html_() and "<table>" in result.heads[0]._repr_html_()

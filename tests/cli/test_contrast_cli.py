"""``qkcov contrast`` on small JSONL files (tiny random model through the CLI code path)."""

import json

import pytest
import torch

from qkcov.artifacts import load_tensors, read_json
from qkcov.cli import main
from qkcov.run_tensors import read_delta

GOOD = [
    {"prompt": "- apple\n- horse\n- pear\n- car\nFruits? Answer:", "positives": [{"text": "apple"}, {"text": "pear"}],
     "negatives": [{"text": "horse"}, {"text": "car"}], "group": "fruits"},
    {"prompt": "- dog\n- plum\n- bus\n- cat\nAnimals? Answer:", "positives": [{"text": "dog"}, {"text": "cat"}],
     "negatives": [{"text": "plum"}, {"text": "bus"}], "group": "animals"},
    {"prompt": "- kiwi\n- cow\n- fig\n- van\nFruits? Answer:", "positives": [{"text": "kiwi"}, {"text": "fig"}],
     "negatives": [{"text": "cow"}, {"text": "van"}], "group": "fruits"},
    {"prompt": "- lime\n- ant\n- taxi\n- bee\nAnimals? Answer:", "positives": [{"text": "ant"}, {"text": "bee"}],
     "negatives": [{"text": "lime"}, {"text": "taxi"}], "group": "animals"},
]  # fmt: skip


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in rows) + "\n")
    return path


@pytest.mark.parametrize("heads", ["L0H1,L1H3", "auto:2"])
def test_contrast_writes_artifacts(tmp_path, tiny_dir, heads):
    data = _write(tmp_path / "recs.jsonl", GOOD)
    out = tmp_path / "out"
    argv = ["contrast", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--quiet"]
    assert main([*argv, "--heads", heads]) == 0
    for name in ("run.json", "run.safetensors", "section.json", "report.html", "manifest.json"):
        assert (out / name).is_file()
    info = read_json(out / "run.json")
    assert info["features"][0]["groups"] == ["animals", "fruits"] and info["n_records"] == 4
    assert len(info["heads"]) == 2
    assert (info["scan"] is None) == (heads != "auto:2")
    tensors = load_tensors(out / "run.safetensors")
    for h in info["heads"]:
        groups = h["features"]["feature"]["groups"]
        assert set(groups) == {"animals", "fruits", "pooled"}
        assert (groups["pooled"]["n_pos"], groups["pooled"]["n_neg"]) == (
            4,
            4,
        )  # all records build ΔC
        assert (groups["fruits"]["n_pos"], groups["fruits"]["n_neg"]) == (2, 2)
        assert h["swaps"]["skipped"] == "step off (--steps)"
        # 4 records: too few for the null, so the energy rank is in force and says so
        assert groups["pooled"]["significance"]["available"] is False
        for g in ("animals", "fruits", "pooled"):
            p = f"{h['name']}.feature.{g}."
            assert read_delta(tensors, p).shape == (16, 16)
            # a group's ΔC from 2 records has rank <= 2: stored as float64 factors
            if g != "pooled":
                assert p + "delta" not in tensors
                assert tensors[p + "delta_left"].dtype == torch.float64
                assert tensors[p + "delta_left"].shape[1] <= 2


def test_bad_line_reports_line_number_and_writes_nothing(tmp_path, capsys):
    bad = dict(GOOD[1], positives=[{"text": "kiwi"}])  # not in that prompt
    data = _write(tmp_path / "bad.jsonl", [GOOD[0], bad, GOOD[2], "{not json"])
    out = tmp_path / "out"
    code = main(
        ["contrast", "--model", "smollm2-135m", "--data", str(data), "--out", str(out), "--quiet"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "kiwi" in err and "line 4" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--heads", "L0X1"], "--heads"),
        (["--heads", "auto:zero"], "auto:K"),
        (["--energy", "1.5"], "energy"),
    ],
)
def test_bad_arguments_exit_2_before_loading(tmp_path, capsys, argv, message):
    data = _write(tmp_path / "recs.jsonl", GOOD)
    out = tmp_path / "out"
    code = main(["contrast", "--data", str(data), "--out", str(out), "--quiet", *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_head_out_of_range(tmp_path, tiny_dir, capsys):
    data = _write(tmp_path / "recs.jsonl", GOOD)
    argv = [
        "contrast",
        "--model",
        str(tiny_dir),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*argv, "--heads", "L5H0", "--quiet"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_file_exit_2(tmp_path, capsys):
    code = main(["contrast", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert code == 2 and "not found" in capsys.readouterr().err

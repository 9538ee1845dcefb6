"""qkcov compare / qkcov.compare: two seeds agree, a coin-flip relabelling does not; different
models are refused; the page and the index page over a folder of runs come from artifacts."""

from __future__ import annotations

import pytest

import qkcov
from qkcov.cli import main
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.pipeline import analyze
from qkcov.tasks.builtin import build_task_records
from qkcov.tasks.records import coin_flip

CFG = dict(
    n_random=20, n_permutations=50, n_bootstrap=0, batch_size=16, rank_rule="energy",
    steps="projections", heads="L1H2,L0H1", progress=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    recs = build_task_records("agreement", n=96, order="subject-first")
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, r, seed in (("seed0", recs, 0), ("seed1", recs, 1), ("coin", coin_flip(recs), 1)):
        analyze(model, tok, r, seed=seed, **CFG).save(root / name)
        out[name] = root / name
    return root, out


def test_seeds_agree_coin_flip_does_not(runs):
    _, r = runs
    same = {p["head"]: p for p in qkcov.compare([r["seed0"], r["seed1"]]).pairs}
    coin = {p["head"]: p for p in qkcov.compare([r["seed0"], r["coin"]]).pairs}
    assert set(same) == set(coin) == {"L1H2", "L0H1"}
    for h in same:
        assert same[h]["key_top1_deg"] < 15 and coin[h]["key_top1_deg"] > 20
        assert same[h]["key_max_deg_common"] < coin[h]["key_max_deg_common"]
        assert same[h]["key_max_deg_common"] < same[h]["random_max_deg_common"] - 30


def test_different_models_refused(runs, tmp_path, capsys):
    _, r = runs
    other = analyze(
        tiny_model("qwen3"), tiny_tokenizer(), build_task_records("agreement", n=48), **CFG
    )
    with pytest.raises(ValueError, match="different models.*nothing was compared"):
        qkcov.compare([r["seed0"], other])
    other.save(tmp_path / "qwen")
    page = tmp_path / "cmp.html"
    assert main(["compare", str(r["seed0"]), str(tmp_path / "qwen"), "--out", str(page)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different models" in err[0] and not page.exists()


def test_cli_compare_page_and_index(runs, tmp_path, capsys):
    root, r = runs
    page = tmp_path / "cmp.html"
    assert (
        main(["compare", str(r["seed0"]), str(r["seed1"]), str(r["coin"]), "--out", str(page)]) == 0
    )
    text = page.read_text()
    assert "Principal angles" in text and text.count("<tr>") >= 1 + 2 * 3
    assert "L1H2" in capsys.readouterr().out
    # a folder of runs -> an index page linking each run's report
    assert main(["report", str(root)]) == 0
    index = (root / "index.html").read_text()
    for name in ("seed0", "seed1", "coin"):
        assert f"href='{name}/report.html'" in index
    # a partial run in the folder is refused and the index is not rewritten
    (r["coin"] / "run.json").write_text("{}")
    before = (root / "index.html").read_text()
    assert main(["report", str(root)]) == 2
    assert "modified" in capsys.readouterr().err and (root / "index.html").read_text() == before

"""The token view's saved numbers are the swap engine's and the attribution's, bounded, and
survive a save/load; its data block cannot close the page's script element."""

from __future__ import annotations

import json

import pytest
import torch

from qkcov.engine.tokenview import collect_token_view
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.pipeline import analyze
from qkcov.report.views import json_block
from qkcov.results import AnalysisResult
from qkcov.tasks.builtin import build_task_records

FAST = dict(n_random=20, n_permutations=50, n_bootstrap=20, batch_size=16)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    result = analyze(
        tiny_model("llama"), tiny_tokenizer(), build_task_records("agreement", n=40),
        heads="auto:2", progress=False, **FAST,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("tv") / "run"
    result.save(out)
    return result, out


def test_numbers_match_the_swap_and_the_attribution(run):
    result, _ = run
    for h in result.heads:
        tv = h.token_view
        assert tv is not None and tv.info["condition"] == h.swaps.headline
        t = tv.tensors
        assert t["parts"].shape == (len(tv.info["part_names"]), t["logit"].numel())
        torch.testing.assert_close(t["parts"].sum(0), t["logit"], atol=1e-4, rtol=1e-4)
        per = h.swaps.conditions[h.swaps.headline].per_prompt["delta_p"]
        assert len(tv.info["prompts"]) == min(len(per), tv.info["cap"])
        for i, p in enumerate(tv.info["prompts"]):
            s = slice(p["offset"], p["offset"] + p["length"])
            b, a = t["attn_before"][s].double(), t["attn_after"][s].double()
            assert float(b.sum()) == pytest.approx(1.0, abs=1e-4)
            assert float(a.sum()) == pytest.approx(1.0, abs=1e-4)
            o, g = p["orig"], p["target"]
            assert o in p["positives"] and g in p["negatives"]
            dp = float(a[g] / (a[o] + a[g]) - b[g] / (b[o] + b[g]))
            assert dp == pytest.approx(per[i], abs=1e-4)  # the same prompt as the swap's i-th
            assert len(p["tokens"]) == p["length"] == p["query"] + 1


def test_cap_and_token_limit_bound_the_view():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    from qkcov.engine.contrast import resolve_records

    resolved = resolve_records(tok, build_task_records("agreement", n=12), chat=False)
    pairs = [(r.positives[0], r.negatives[0]) for r in resolved]
    info, t = collect_token_view(
        model, tok, resolved, pairs, 0, 1, None, {}, condition=None, max_prompts=3
    )
    assert len(info["prompts"]) == 3 and info["n_eligible"] == 12 and "attn_after" not in t
    assert "parts" not in t and t["logit"].numel() == sum(p["length"] for p in info["prompts"])
    short = min(r.query for r in resolved) + 1
    info, _ = collect_token_view(
        model, tok, resolved, pairs, 0, 1, None, {}, condition=None, max_tokens=short
    )
    assert info["n_eligible"] == sum(r.query + 1 <= short for r in resolved) >= 1


def test_save_load_round_trip_keeps_the_view(run):
    result, out = run
    loaded = AnalysisResult.load(out)
    for h0, h1 in zip(result.heads, loaded.heads, strict=True):
        assert h1.token_view.info == json.loads(json.dumps(h0.token_view.info))
        for k, v in h0.token_view.tensors.items():
            torch.testing.assert_close(h1.token_view.tensors[k], v.float())


def test_json_block_cannot_close_its_script():
    hostile = "</script><script>alert(1)</script><!-- & \u2028"
    block = json_block({"t": hostile}, "x")
    inner = block[block.index(">") + 1 : block.rindex("</script>")]
    assert "<" not in inner and ">" not in inner and "&" not in inner
    assert json.loads(inner) == {"t": hostile}


def test_a_verdict_leads_each_head_block(run, tmp_path):
    """Whatever verdict a run holds is the head block's first line (escaped); without one a
    neutral summary of the saved numbers stands there."""
    from qkcov.artifacts import read_json, write_json
    from qkcov.report import build_report
    from qkcov.report.run import write_run_section

    _, out = run
    info = read_json(out / "run.json")
    h0 = info["heads"][0]
    h0["verdict"] = {
        "status": "supported",
        "sentence": "Attends <b>by</b> number.",
        "evidence": ["p = 0.01"],
    }
    h0["causal_rank"] = {
        "feature": "feature", "rank": 2, "R": 3, "fraction": 0.9, "condition": "feature@causal",
        "note": "", "curve": [
            {"r": r, "delta_p": d, "ci": [d - 0.05, d + 0.05], "random_mean": 0.01,
             "random_std": 0.01, "permuted_mean": 0.05, "permuted_std": 0.02}
            for r, d in ((1, 0.1), (2, 0.2), (3, 0.2))
        ],
    }  # fmt: skip
    info["heads"][1].pop("verdict", None)  # a run from before verdicts: the neutral line
    write_json(tmp_path / "run.json", info)
    (tmp_path / "run.safetensors").write_bytes((out / "run.safetensors").read_bytes())
    write_run_section(tmp_path)
    page = build_report(tmp_path).read_text()
    block = page[page.index(f'<article class="head" id="run-{h0["name"]}">') :]
    first = block[block.index("<p") : block.index("</p>")]
    assert "supported" in first and "Attends &lt;b&gt;by&lt;/b&gt; number." in first
    assert "<b>by</b>" not in page
    other = info["heads"][1]
    block = page[page.index(f'<article class="head" id="run-{other["name"]}">') :]
    first = block[block.index("<p") : block.index("</p>")]
    assert (
        'class="verdict neutral"' in first
        and f"{other['name']}: causal rank {other['rank']}" in first
    )
    # the headline swap named by the run is the one the summary quotes
    assert f"inside the {other['swap_condition']} subspace" in first

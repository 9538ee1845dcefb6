"""The one pipeline (`qkcov run`, `qkcov.analyze`) on tiny random models: the run.json
contract, typed results round trip, built-in tasks = export + run, bad input, dtype, flags."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from qkcov.artifacts import load_tensors, read_json
from qkcov.cli import build_parser, main
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.pipeline import RunConfig, analyze
from qkcov.results import VERDICTS, AnalysisResult, headline_of
from qkcov.tasks.builtin import build_task_records
from qkcov.tasks.records import ContrastRecord, Span, save_records

FAST = dict(n_random=20, n_permutations=50, n_bootstrap=20, batch_size=16)
SMALL_TASKS = {
    "filter": [
        "--n-build",
        "24",
        "--n-heldout",
        "12",
        "--categories",
        "fruits",
        "animals",
        "vehicles",
    ],
    "binding": ["--n-build", "16", "--n-heldout", "8"],
}


@pytest.fixture(scope="module")
def agreement_run(tmp_path_factory):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    records = build_task_records(
        "agreement", n=48, order="subject-first"
    )  # the offset-confounded design
    result = analyze(model, tok, records, heads="auto:2", progress=False, **FAST)
    out = tmp_path_factory.mktemp("run") / "agreement"
    result.save(out)
    return result, out


def test_run_json_contract(agreement_run):
    result, out = agreement_run
    info = read_json(out / "run.json")
    assert {"model", "n_records", "seconds", "heads"} <= set(info)
    assert info["n_records"] == 48 and len(info["heads"]) == 2
    for h in info["heads"]:
        assert {"layer", "head", "rank"} <= set(h)
        assert set(h["swap"]) >= {"delta_p", "flip_items", "logprob_shift"}
        assert set(h["random"]["delta_p"]) == {"mean", "std"}
        assert "delta_p" in h["ceiling"]
        assert 0.0 <= h["attribution"]["explained_fraction"] <= 1.0
        assert {"p_value", "rank_null", "rank_energy", "rank_ci", "stability_deg"} <= set(
            h["significance"]
        )
        # rank in force = the null rule's rank (0 when not significant)
        sig = h["significance"]
        if h["swap_condition"] == "feature":
            assert h["rank"] == (sig["rank_null"] if sig["significant"] else 0)
            if sig["rank_ci"] is not None:  # the point rank lies in its interval
                assert sig["rank_ci"][0] <= h["rank"] <= sig["rank_ci"][1]
    for name in (
        "run.safetensors",
        "section.json",
        "report.html",
        "manifest.json",
        f"{info['heads'][0]['name']}.scree.png",
        f"{info['heads'][0]['name']}.swaps.png",
    ):
        assert (out / name).is_file(), name


def test_attribution_is_exact_and_swaps_have_baselines(agreement_run):
    result, _ = agreement_run
    for h in result.heads:
        assert h.attribution.max_abs_error < 1e-9
        parts, total = h.attribution.example_parts, h.attribution.example_total
        torch.testing.assert_close(parts.sum(0), total, atol=1e-9, rtol=0)
        c = h.swaps.conditions[h.swaps.headline]
        assert len(c.random["delta_p"]["draws"]) == FAST["n_random"]
        assert h.headline.rank == h.headline.key_basis.shape[1]
        assert h.headline.query_basis.shape[1] == h.headline.rank
        assert 0.0 < c.p_value <= 1.0
        # the headline swap is the causal-rank subspace: the prefix of the ΔC key basis
        cr = h.swaps.causal_rank
        assert c.rank == cr["rank"] >= 1 and cr["R"] >= h.headline.rank
        assert c.metrics["delta_p"] == pytest.approx(cr["curve"][c.rank - 1]["delta_p"], abs=1e-5)
        best = max(p["delta_p"] for p in cr["curve"])
        assert all(p["delta_p"] < 0.9 * best for p in cr["curve"][: c.rank - 1])
        # both baselines beside every condition: random and label-permuted subspaces
        for cond in h.swaps.conditions.values():
            assert len(cond.permuted["delta_p"]["draws"]) == RunConfig().n_permuted
            assert 0 < cond.p_permuted <= 1


def test_save_load_round_trip(agreement_run):
    result, out = agreement_run
    loaded = AnalysisResult.load(out)
    assert loaded.to_dict()["heads"] == json.loads(json.dumps(result.to_dict()["heads"]))
    h0, l0 = result.heads[0], loaded.heads[0]
    torch.testing.assert_close(l0.headline.delta, h0.headline.delta)
    assert loaded.summary().splitlines()[0].split()[:2] == ["head", "verdict"]
    assert loaded.summary() == result.summary()
    # a mixed folder is refused: a file changed after the run
    (out / "scan.png").write_bytes(b"not the run's figure")
    with pytest.raises(ValueError, match="modified after the run"):
        AnalysisResult.load(out)


def test_figures_drawn_from_artifacts_only(agreement_run, tmp_path):
    _, out = agreement_run
    from qkcov.report.figures.run import plot_all

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("run.json", "run.safetensors"):
        (copy / name).write_bytes((out / name).read_bytes())
    figs, inter = plot_all(copy)
    heads = [h["name"] for h in read_json(out / "run.json")["heads"]]
    assert {f["file"] for f in figs} >= {"scan.png"} | {
        f"{h}.{kind}.png" for h in heads for kind in ("attends", "scree", "swaps")
    }
    assert {f["file"] for f in inter} == {f"{h}.projections.scatter.json" for h in heads}
    assert all((copy / f["file"]).is_file() for f in figs + inter)


def _strip(info: dict) -> dict:
    """Everything but timings and record provenance (a JSONL line exists only for records
    read from a file: the token view's ``line``, the projections' hover names)."""
    info = json.loads(json.dumps(info))
    for h in info["heads"]:
        for p in (h.get("token_view") or {}).get("prompts", []):
            p.pop("line")
        for pr in h["projections"].values():
            pr.pop("key_names", None), pr.pop("query_names", None)
    return {k: v for k, v in info.items() if k not in ("seconds", "timings_s", "provenance")}


@pytest.mark.parametrize("task", ["filter", "binding"])
def test_task_command_equals_export_plus_run(task, tiny_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--seed", "3", "--heads", "auto:1", "--quiet",
              "--n-random", "20", "--n-permutations", "40", "--n-bootstrap", "20"]  # fmt: skip
    assert main([task, *common, *SMALL_TASKS[task], "--out", str(tmp_path / "a")]) == 0
    data = tmp_path / "records.jsonl"
    assert (
        main(["tasks", "export", task, "--seed", "3", *SMALL_TASKS[task], "--out", str(data)]) == 0
    )
    assert main(["run", "--data", str(data), *common, "--out", str(tmp_path / "b")]) == 0
    a, b = read_json(tmp_path / "a" / "run.json"), read_json(tmp_path / "b" / "run.json")
    assert _strip(a) == _strip(b)
    ta, tb = (
        load_tensors(tmp_path / "a" / "run.safetensors"),
        load_tensors(tmp_path / "b" / "run.safetensors"),
    )
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    if task == "binding":
        assert [f["name"] for f in a["features"]] == ["order", "lexical"]


def _one_sided(n: int) -> list[ContrastRecord]:
    recs = []
    for i in range(n):
        word = ["red", "blue", "green", "pink"][i % 4]
        prompt = f"the {word} cat and the dog ran {i}"
        span = (Span(4, 4 + len(word), label=word),)
        recs.append(ContrastRecord(prompt, span if i % 2 else (), () if i % 2 else span))
    return recs


def test_one_sided_records_skip_swaps_with_a_reason():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    result = analyze(model, tok, _one_sided(30), heads="L0H1", progress=False, **FAST)
    h = result.heads[0]
    assert "no swap pair exists" in h.swaps.skipped
    assert h.headline.n_pos > 0 and h.headline.n_neg > 0
    assert "no swap pair exists" in " ".join(result.notes)
    if h.headline.rank:
        assert h.attribution.skipped is None and h.projections
    else:
        assert "significant" in h.attribution.skipped


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "cuda"], "--device cuda"),
        (["--dtype", "float8"], "--dtype"),
        (["--holdout", "1.5"], "--holdout"),
        (["--holdout", "0"], "--holdout"),
        (["--heads", "L1"], "heads"),
        # p floors above α: refused before the model loads
        (["--n-permuted", "10"], "--n-permuted 10 gives p-values no smaller than 1/11"),
        (["--n-random", "10"], "--n-random 10 gives p-values no smaller than 1/11"),
        (["--n-permutations", "15"], "--n-permutations 15"),
        (["--alpha", "0.01", "--n-random", "50"], "use --n-random 499 or more"),
        (["--control", "number"], "--control 'number': no key span of the records has"),
        (["--control", "offset,offset"], "--control must name distinct controls"),
    ],
)
def test_bad_flags_exit_2_and_write_nothing(argv, message, tmp_path, capsys):
    data = tmp_path / "r.jsonl"
    save_records(data, build_task_records("agreement", n=12))
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc = main(
        [
            "run",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
            "--model",
            "/nonexistent/model",
            *argv,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_no_negative_key_is_one_clear_error(tmp_path, capsys):
    data = tmp_path / "pos.jsonl"
    save_records(data, [r for r in _one_sided(20) if r.positives])
    rc = main(
        [
            "run",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
            "--model",
            "/nonexistent/model",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "no negative key" in err and "both sides" in err
    assert not (tmp_path / "out").exists()


def test_bfloat16_forward_float64_accumulation():
    tok = tiny_tokenizer()
    records = build_task_records("agreement", n=40)
    kw = dict(heads="L0H1", steps="", progress=False, **FAST)
    r32 = analyze(tiny_model("llama"), tok, records, **kw)
    r16 = analyze(tiny_model("llama").to(torch.bfloat16), tok, records, **kw)
    d32, d16 = r32.heads[0].headline.delta, r16.heads[0].headline.delta
    assert d16.dtype == torch.float64
    assert float((d16 - d32).norm() / d32.norm()) < 0.05


def test_flags_are_derived_from_the_config():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    run_flags = {a.dest: a for a in sub["run"]._actions}
    for f in dataclasses.fields(RunConfig):
        assert f.name in run_flags, f.name
        assert run_flags[f.name].default == f.default, f.name
    common = (
        "model",
        "device",
        "dtype",
        "device_map",
        "heads",
        "batch_size",
        "seed",
        "out",
        "quiet",
    )
    for cmd in ("run", "contrast", "filter", "binding", "agreement"):
        acts = {a.dest: a for a in sub[cmd]._actions}
        for name in common:
            assert name in acts, (cmd, name)
            assert acts[name].default == run_flags[name].default, (cmd, name)
            assert acts[name].option_strings == run_flags[name].option_strings


def test_core_does_not_import_transformers():
    code = (
        "import sys, qkcov.core.covariance, qkcov.core.subspace, qkcov.core.attribution, "
        "qkcov.core.intervention, qkcov.core.projection, qkcov.core.statistics; "
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_summary_prints_a_table(agreement_run):
    result, _ = agreement_run
    lines = result.summary().splitlines()
    assert [c.strip() for c in lines[0].split("  ") if c.strip()] == list(result.SUMMARY_COLUMNS)
    assert max(len(line) for line in lines) <= 120  # compact, verdict sentences wrapped
    wide = result.summary(wide=True).splitlines()
    assert [c.strip() for c in wide[0].split("  ") if c.strip()] == list(result.WIDE_COLUMNS)
    info = result.to_dict()
    rows = result.summary_rows()
    # best head first, marked
    assert rows[0][0] == result.best.name + "*" == result.ordered_heads()[0].name + "*"
    for h, d in zip(result.heads, info["heads"], strict=True):
        # one verdict, identical in summary(), run.json and the typed result
        assert d["verdict"]["status"] in VERDICTS and d["verdict"] == h.verdict.to_dict()
        assert d["verdict"]["sentence"] in " ".join(x.strip() for x in lines)
        row = next(r for r in rows if r[0].rstrip("*") == h.name)
        # one headline rank, named with its rule and condition, the other ranks by name
        hl = d["headline"]
        assert d["causal_rank"]["rank"] == int(row[2]) == hl["rank"] == d["rank"]
        assert hl["rule"] == d["rank_rule"] == "causal" and row[3] == hl["condition"]
        assert hl["condition"] == d["swap_condition"] and hl["feature"] == "feature"
        assert hl["ranks"]["causal"] == hl["rank"]
        assert hl["ranks"]["energy"] == h.headline.rank_energy
        assert headline_of({k: v for k, v in d.items() if k != "headline"}).to_dict() == hl
        wrow = next(r for r in result.summary_rows(wide=True) if r[0].rstrip("*") == h.name)
        assert wrow[4] == hl["condition"] and wrow[3] == "causal"
        trow = next(r for r in result.to_rows() if r["head"] == h.name)
        lab = h.swaps.label_test
        assert trow["rank"] == hl["rank"] and trow["headline_condition"] == hl["condition"]
        assert trow["label_effect"] == lab["effect"] and trow["p_label"] == lab["p_value"]
        assert trow["p_vs_permuted"] == h.swaps.conditions[hl["condition"]].p_permuted
    assert info["best_head"] == result.best.name
    assert any("(* best head)" in line for line in lines)
    assert "first token of each key span" in info["scored_token"]
    assert len(lines) >= 2 + len(result.heads)
    assert not math.isnan(result.best.swap_margin())


def test_duplicated_records_are_one_unit_and_said():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    records = build_task_records("agreement", n=16)
    result = analyze(model, tok, records * 3, heads="L0H0", steps="", progress=False, **FAST)
    sig = result.heads[0].headline.significance
    assert sig["n_records"] == 3 * sig["n_distinct"]
    assert "duplicate others exactly" in sig["duplicates"]
    assert any("duplicate others exactly" in note for note in result.notes)
    if sig["rank_ci"] is not None:
        assert sig["rank_ci"][0] <= result.heads[0].headline.rank <= sig["rank_ci"][1]


def test_answers_scored_and_rank_curve_clamped_to_head_dim():
    """Records naming an ``answer``: run.json says the answer token was scored and gives the
    model's accuracy on it; R above the head dimension (16 here) is clamped and said."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    records = [
        dataclasses.replace(r, answer=" a" if i % 2 else " b")
        for i, r in enumerate(build_task_records("agreement", n=60))
    ]
    result = analyze(model, tok, records, heads="L1H0", progress=False, causal_max_rank=32, **FAST)
    info = result.to_dict()
    assert info["scored_token"].startswith("answer")
    a = info["answers"]
    assert a["n"] == result.heads[0].swaps.n and 0 <= a["top1"] <= 1 and a["mean_rank"] >= 1
    cr = info["heads"][0]["causal_rank"]
    assert cr["R"] == 16 and "head dimension" in cr["note"]  # this tiny head's ΔC is significant
    assert [p["r"] for p in cr["curve"]] == list(range(1, 17))
    assert "model accuracy on the answers" in result.summary()
    with pytest.raises(ValueError, match="--causal-max-rank must be at most 32"):
        RunConfig(causal_max_rank=33)


def test_not_significant_head_gets_no_evidence_and_skip_reason():
    """A coin-flip relabelling has no subspace above the null: verdict no-evidence, the skip
    reason printed in the summary."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    gen = torch.Generator().manual_seed(0)
    records = []
    for r in build_task_records("agreement", n=40):
        if torch.rand(1, generator=gen).item() < 0.5:
            r = dataclasses.replace(r, positives=r.negatives, negatives=r.positives)
        records.append(r)
    result = analyze(model, tok, records, heads="L0H0,L1H1", progress=False, **FAST)
    for h in result.heads:
        assert not h.headline.significance["significant"]
        assert h.verdict.status == "no-evidence"
        assert f"{h.name}: swaps skipped" in result.summary()


def test_batch_size_larger_than_the_records_is_one_batch_with_the_same_numbers():
    """--batch-size beyond the record count runs each pass as one batch, no error, and gives
    the numbers of a small batch size (padding differs, so within float tolerance)."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    records = build_task_records("agreement", n=24)
    kw = {**FAST, "heads": "L0H1,L1H2", "progress": False}
    big = analyze(model, tok, records, **{**kw, "batch_size": 1000})
    small = analyze(model, tok, records, **{**kw, "batch_size": 4})
    for a, b in zip(big.heads, small.heads, strict=True):
        assert a.headline.rank == b.headline.rank
        assert a.swaps.n == b.swaps.n > 0
        for name, c in b.swaps.conditions.items():
            got = a.swaps.conditions[name].metrics
            for m, v in c.metrics.items():
                assert got[m] == pytest.approx(v, abs=1e-4), (name, m)
        assert a.attribution.explained_fraction == pytest.approx(
            b.attribution.explained_fraction, abs=1e-6
        )


def _with_roles(records: list[ContrastRecord]) -> list[ContrastRecord]:
    """Agreement records whose key spans name their role (the subject is always positive)."""

    def tag(spans, role):
        return tuple(dataclasses.replace(sp, attrs={"role": role}) for sp in spans)

    return [
        dataclasses.replace(r, positives=tag(r.positives, "subject"),
                            negatives=tag(r.negatives, "attractor"))
        for r in records
    ]  # fmt: skip


def test_verdict_is_conditioned_on_the_offset(agreement_run):
    """Agreement records put the subject (positive) always further from the verb than the
    attractor: within offset strata the labels are fixed (mixed fraction 0), so every
    conditional relabelling is the real one, the label test cannot reject and the verdict is
    never reads-feature (confounded once the swap beats random); what it was conditioned on,
    the mixed fraction and every p's floor are in the evidence and the sentence."""
    result, out = agreement_run
    info = read_json(out / "run.json")
    for h, d in zip(result.heads, info["heads"], strict=True):
        ev = d["verdict"]["evidence"]
        assert ev["conditioned_on"] == ["offset"] and ev["mixed_fraction"] == 0.0
        assert ev["confounded"] and ev["fixed_by"] == ["offset"]
        assert ev["p_floors"]["p_vs_permuted"] == pytest.approx(1 / 100)
        assert ev["p_floors"]["p_vs_random"] == pytest.approx(1 / 21)
        assert h.verdict.status != "reads-feature"
        lab = h.swaps.label_test
        if lab["available"]:
            assert lab["p_value"] == 1.0 and lab["p_floor"] == pytest.approx(0.01)
        if (
            ev.get("p_vs_random") is not None
            and ev["p_vs_random"] < 0.05
            and (ev["delta_p"] - ev["random_mean"] >= ev["min_swap_effect"])
        ):
            assert h.verdict.status == "confounded"
            assert "the labels are a function of the offset" in h.verdict.sentence
            assert "vary where the positives sit" in h.verdict.sentence
        assert "labels permuted within offset strata, mixed fraction 0]" in h.verdict.sentence
    row = result.summary_rows()[0]
    assert row[result.SUMMARY_COLUMNS.index("control (mixed)")] == "offset (0.00)"


def test_control_names_a_rival_attribute_and_none_turns_conditioning_off():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    records = _with_roles(build_task_records("agreement", n=48, order="subject-first"))
    kw = dict(heads="L0H1", progress=False, causal_max_rank=4, **FAST)
    res = analyze(model, tok, records, control="offset,role", **kw)
    ev = res.heads[0].verdict.evidence
    assert ev["conditioned_on"] == ["offset", "role"] and ev["mixed_fraction"] == 0.0
    assert ev["mixed_by_control"] == {"offset": 0.0, "role": 0.0}
    assert ev["fixed_by"] == ["offset", "role"] and res.heads[0].verdict.status != "reads-feature"
    plain = analyze(model, tok, records, control="none", **kw)
    ev = plain.heads[0].verdict.evidence
    assert ev["conditioned_on"] == [] and ev["mixed_fraction"] is None and not ev["confounded"]
    assert ev["conditioning_note"] == "unconditioned (--control none)"
    # unconditioned, the permuted draws differ from the real labels' subspace
    c = plain.heads[0].swaps.conditions[plain.heads[0].swaps.headline]
    assert len(set(c.permuted["delta_p"]["draws"])) > 1


def test_key_attrs_on_some_keys_only_is_one_line_before_the_model(tmp_path, capsys):
    recs = _with_roles(build_task_records("agreement", n=12))
    recs[5] = dataclasses.replace(recs[5], negatives=tuple(
        dataclasses.replace(sp, attrs={}) for sp in recs[5].negatives))  # fmt: skip
    data = tmp_path / "r.jsonl"
    save_records(data, recs)
    rc = main(["run", "--data", str(data), "--out", str(tmp_path / "out"),
               "--model", "/nonexistent/model", "--control", "offset,role"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "key attribute 'role' is on some key spans but not on every key span of line 6" in err
    assert not (tmp_path / "out").exists()

"""`--heads auto` in one forward: the head scan's rows and every head's q/k come from the
single pass over the build records, and the run equals the former two-pass run (its own scan
forward, then a ΔC forward of the chosen heads) — chosen heads, run.json numbers, tensors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from qkcov.engine.contrast import resolve_records
from qkcov.engine.scan import attention_rows, scan_capture
from qkcov.models.capture import QKSites, capture_prompts
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.pipeline import RunConfig, plan_records
from qkcov.pipeline.run import _analyze
from qkcov.runtime import Timer
from qkcov.tasks.builtin import build_task_records

FAST = dict(n_random=20, n_permutations=50, n_bootstrap=10, batch_size=5, n_scan=14)


def _records():
    # two features (so two ΔC record lists), uneven batches, a scan subset smaller than build
    recs = build_task_records("agreement", n=44)
    return [dataclasses.replace(r, feature="ab"[i % 2]) for i, r in enumerate(recs)]


def _close(a, b, path="run"):
    """Every number of two run.json trees equal to 1e-10 (relative), the rest exactly; the
    head scan's numbers to 1e-6: its attention rows are float32 (by design, as before) and
    the one pass computes them beside other batch-mates, which moves their last bits."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (path, set(a) ^ set(b))
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        tol = 1e-6 if ".scan" in path else 1e-10
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(
            a, b, rel_tol=tol, abs_tol=tol / 100
        ), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("frame", ["post", "query"])
def test_one_pass_equals_two_passes(frame):
    model = tiny_model("llama").to(torch.float64)
    tok = tiny_tokenizer()
    cfg = RunConfig(heads="auto:3", frame=frame, seed=5, **FAST)
    plan = plan_records(_records(), cfg)
    calls = []
    orig = model.forward

    def counting(*a, **kw):
        calls.append(kw["input_ids"].shape[0])
        return orig(*a, **kw)

    model.forward = counting
    results = {}
    forwards = {}
    for one_pass in (False, True):
        calls.clear()
        res = _analyze(model, tok, plan_records(_records(), cfg), cfg, Timer("t", quiet=True),
                       "tiny", one_pass=one_pass)  # fmt: skip
        results[one_pass] = res
        forwards[one_pass] = list(calls)
    two, one = results[False], results[True]
    assert [h.name for h in one.heads] == [h.name for h in two.heads]
    assert len(one.heads) == 3
    d1, d2 = one.to_dict(), two.to_dict()
    for d in (d1, d2):
        d.pop("seconds", None)
        d.pop("timings_s", None)
        d.pop("timings", None)
    _close(d1, d2)
    for h1, h2 in zip(one.heads, two.heads, strict=True):
        t1, t2 = h1.tensors(factor_deltas=False), h2.tensors(factor_deltas=False)
        assert t1.keys() == t2.keys() and len(t1) > 0
        for k in t1:
            assert torch.allclose(t1[k].double(), t2[k].double(), rtol=1e-10, atol=1e-12), k
    # the ΔC accumulators are folded from the very same captured rows: bit for bit
    for h1, h2 in zip(one.heads, two.heads, strict=True):
        for f in h1.features:
            assert torch.equal(h1.features[f].pooled.delta, h2.features[f].pooled.delta)
    # the one pass forwards the build records once; the two passes also the scan records
    assert sum(forwards[False]) - sum(forwards[True]) == FAST["n_scan"]
    assert sum(forwards[True]) >= len(plan.indices("build"))


def test_scan_capture_equals_its_parts():
    """The rows equal attention_rows' and each batch's capture equals a capture of its own."""
    model = tiny_model("llama").to(torch.float64)
    tok = tiny_tokenizer()
    resolved = resolve_records(tok, build_task_records("agreement", n=20))
    lists = [list(range(0, 20, 2)), list(range(1, 20, 2))]
    scan_idx = [3, 0, 8, 17, 11]
    sc = scan_capture(model, tok, resolved, lists, scan_idx, batch_size=3, progress=False)
    rows = attention_rows(model, tok, [resolved[i] for i in scan_idx], batch_size=2, progress=False)
    assert sc.rows.shape == rows.shape
    assert torch.allclose(sc.rows, rows, rtol=0, atol=1e-6)  # float32 rows, other batch-mates
    assert float(sc.rows.sum(-1).sub(1).abs().max()) < 1e-5  # each row is a distribution
    for ids, per in zip(lists, sc.captures, strict=True):
        recs = [resolved[i] for i in ids]
        sites = QKSites([[r.query] for r in recs], [r.key_positions for r in recs])
        ref = capture_prompts(model, tok, [r.text for r in recs], sites, [0, 1], [1, 2],
                              batch_size=3, progress=False)  # fmt: skip
        for layer in (0, 1):
            got = [caps[layer].select([1, 2]) for caps in per]
            assert torch.equal(torch.cat([c.q for c in got]), ref[layer].q)
            assert torch.equal(torch.cat([c.k for c in got]), ref[layer].k)
            assert torch.equal(torch.cat([c.k_index for c in got]), ref[layer].k_index)


class _Stop(Exception):
    pass


def test_resume_after_the_one_pass_equals_uninterrupted(tmp_path, monkeypatch):
    """A run stopped after its one pass (scan and ΔC accumulators checkpointed) resumes from
    those checkpoints and writes the uninterrupted run's numbers, bit for bit (the scan's
    checkpoint reads back: a safetensors file without tensors did not)."""
    import importlib

    from qkcov.artifacts import load_tensors, read_json
    from qkcov.pipeline import run

    run_mod = importlib.import_module("qkcov.pipeline.run")
    model = tiny_model("llama").to(torch.float64)
    tok = tiny_tokenizer()
    cfg = RunConfig(heads="auto:2", seed=5, checkpoint_every=1, **FAST)
    run(cfg, _records(), tmp_path / "ref", quiet=True, loaded=(model, tok))
    orig = run_mod._head_step
    calls = []

    def stop_second(inputs, head):
        calls.append(head)
        if len(calls) == 2:
            raise _Stop
        return orig(inputs, head)

    monkeypatch.setattr(run_mod, "_head_step", stop_second)
    with pytest.raises(_Stop):
        run(cfg, _records(), tmp_path / "out", quiet=True, loaded=(model, tok))
    ckpt = tmp_path / ".out.checkpoint"
    assert (ckpt / "scan.json").is_file() and any(ckpt.glob("contrast-*.safetensors"))
    monkeypatch.setattr(run_mod, "_head_step", orig)
    run(cfg, _records(), tmp_path / "out", quiet=True, loaded=(model, tok), resume=True)
    a, b = read_json(tmp_path / "out" / "run.json"), read_json(tmp_path / "ref" / "run.json")
    for d in (a, b):
        for k in ("seconds", "timings_s", "provenance"):
            d.pop(k, None)
    assert a == b
    ta, tb = (
        load_tensors(tmp_path / "out" / "run.safetensors"),
        load_tensors(tmp_path / "ref" / "run.safetensors"),
    )
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

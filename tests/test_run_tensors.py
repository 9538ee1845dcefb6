"""How ΔC is stored in run.safetensors: a low-rank ΔC as exact float64 factors, anything else
dense; every reader gets the same dense ΔC back, and folders saved densely still load."""

from __future__ import annotations

import pytest
import torch

from qkcov.artifacts import add_to_manifest, load_tensors, save_tensors
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.pipeline import analyze
from qkcov.results import AnalysisResult
from qkcov.run_tensors import (
    FACTOR_RTOL,
    delta_tensors,
    dense_run_tensors,
    load_run_tensors,
    read_delta,
)
from qkcov.tasks.builtin import build_task_records


def _low_rank(dq: int, dk: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dq, r, generator=g, dtype=torch.float64) @ torch.randn(
        r, dk, generator=g, dtype=torch.float64
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_low_rank_delta_is_stored_as_exact_float64_factors():
    d = _low_rank(16, 20, 3)
    t = delta_tensors("h.f.g.", d)
    assert set(t) == {"h.f.g.delta_left", "h.f.g.delta_right"}
    assert t["h.f.g.delta_left"].dtype == t["h.f.g.delta_right"].dtype == torch.float64
    assert t["h.f.g.delta_left"].shape == (16, 3) and t["h.f.g.delta_right"].shape == (20, 3)
    back = read_delta(t, "h.f.g.")
    assert back.dtype == torch.float64 and back.shape == (16, 20)
    assert _rel(back, d) <= FACTOR_RTOL
    # the tolerance is tight enough to see a wrong value: one entry off by 1e-9 of the scale
    wrong = d.clone()
    wrong[0, 0] += 1e-9 * float(d.abs().max())
    assert _rel(back, wrong) > FACTOR_RTOL


def test_small_but_real_directions_are_kept():
    """A singular value far below the top one but above the float64 floor is not dropped."""
    u = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    s = torch.tensor([1.0, 0.5, 1e-9], dtype=torch.float64)
    d = (u[:, :3] * s) @ v[:, :3].T
    t = delta_tensors("p.", d)
    assert t["p.delta_left"].shape[1] == 3
    assert _rel(read_delta(t, "p."), d) <= FACTOR_RTOL


@pytest.mark.parametrize(
    "d",
    [
        torch.randn(16, 16, dtype=torch.float64),  # full rank: dense
        _low_rank(16, 16, 8),  # 8 * 32 = 16 * 16: no saving, dense
        torch.zeros(8, 8, dtype=torch.float64),
        torch.full((4, 4), float("nan"), dtype=torch.float64),
    ],
)
def test_anything_else_stays_dense_and_bit_identical(d):
    t = delta_tensors("p.", d)
    assert set(t) == {"p.delta"} and t["p.delta"].dtype == torch.float64
    assert torch.equal(t["p.delta"], d) or bool(torch.isnan(d).all())
    assert read_delta(t, "p.") is t["p.delta"]


def test_dense_run_tensors_and_missing_delta():
    d = _low_rank(12, 12, 2)
    t = {**delta_tensors("a.", d), **delta_tensors("b.", torch.eye(12, dtype=torch.float64))}
    t["a.other"] = torch.ones(2)
    dense = dense_run_tensors(t)
    assert set(dense) == {"a.delta", "b.delta", "a.other"}
    assert _rel(dense["a.delta"], d) <= FACTOR_RTOL
    with pytest.raises(KeyError, match="no ΔC under 'c.'"):
        read_delta(t, "c.")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    result = analyze(
        tiny_model("llama"), tiny_tokenizer(), build_task_records("agreement", n=24),
        heads="L0H0,L1H1", steps="", n_permutations=20, n_bootstrap=5, progress=False,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("rt") / "run"
    result.save(out)
    return result, out


def _groups(result: AnalysisResult):
    for h in result.heads:
        for f, fr in h.features.items():
            for g, s in fr.groups.items():
                yield (h.name, f, g), s


def test_run_stores_group_deltas_factored_and_loads_them_back(saved):
    result, out = saved
    raw = load_tensors(out / "run.safetensors")
    loaded = dict(_groups(AnalysisResult.load(out)))
    n_factored = 0
    for key, s in _groups(result):
        p = ".".join(key) + "."
        sv = torch.linalg.svdvals(s.delta.double())
        r = int((sv > sv[0] * max(s.delta.shape) * torch.finfo(torch.float64).eps).sum())
        small = r * sum(s.delta.shape) < s.delta.numel()  # factors are smaller than dense
        assert (p + "delta_left" in raw) == small and (p + "delta" in raw) == (not small), key
        n_factored += small
        back = loaded[key].delta
        assert back.dtype == torch.float64 and back.shape == s.delta.shape
        if p + "delta" in raw:  # dense: exactly the computed ΔC
            assert torch.equal(back, s.delta.double())
        else:
            assert _rel(back, s.delta.double()) <= FACTOR_RTOL, key
    assert n_factored >= 1  # a group's ΔC: rank <= its build records (< 8 of 16 here)


def test_folder_saved_with_dense_deltas_still_loads(saved, tmp_path):
    """A run folder from before the factored form: every ΔC dense float64 under ``.delta``."""
    import shutil

    result, out = saved
    old = tmp_path / "old"
    shutil.copytree(out, old)
    dense = load_run_tensors(out / "run.safetensors")
    assert not any(k.endswith((".delta_left", ".delta_right")) for k in dense)
    save_tensors(old / "run.safetensors", dense, {"heads": [h.name for h in result.heads]})
    add_to_manifest(old, ["run.safetensors"])
    back = dict(_groups(AnalysisResult.load(old)))
    for key, s in _groups(result):
        assert _rel(back[key].delta, s.delta.double()) <= FACTOR_RTOL, key
    assert AnalysisResult.load(old).summary() == AnalysisResult.load(out).summary()

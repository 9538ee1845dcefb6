"""Position or feature: rotary-band profiles on planted subspaces, the offset warning on a
confounded and a balanced contrast, the position-only control, and the pipeline's keys."""

from __future__ import annotations

import math
import random

import pytest
import torch

from qkcov.core.position import offset_test, position_control, record_delta
from qkcov.core.rotary import RotarySpec, band_profile, rotate
from qkcov.core.subspace import random_orthonormal


def _spec(D=32, P=None, layout="half", base=10000.0):
    P = P or D // 2
    inv = 1.0 / base ** (torch.arange(P, dtype=torch.float64) * 2 / (2 * P))
    return RotarySpec(D, inv, layout)


def _pair_basis(spec, pairs):
    """Orthonormal basis spanning the two dims of each listed pair."""
    dims = spec.pairs()[pairs].flatten()
    return torch.eye(spec.head_dim, dtype=torch.float64)[:, dims]


@pytest.mark.parametrize(
    "layout, P", [("half", 16), ("interleaved", 16), ("half", 8), ("interleaved", 8)]
)
def test_planted_band_reads_positional_or_semantic(layout, P):
    spec = _spec(32, P, layout)
    fast = band_profile(_pair_basis(spec, [0, 1]), spec)  # highest frequencies
    slow = band_profile(_pair_basis(spec, [P - 2, P - 1]), spec)
    assert fast["positional_index"] > 0.9 and slow["positional_index"] < 0.1
    assert math.isclose(fast["rotary"], 1.0) and fast["pairs"][0] > 0.45
    # a random subspace sits in between (≈ 0.5 × its rotary share)
    mid = band_profile(random_orthonormal(32, 4, seed=3), spec)
    assert 0.2 < mid["positional_index"] < 0.8
    if P < 16:  # partial rotary: the last 32 − 2P dims never rotate
        nr = band_profile(torch.eye(32, dtype=torch.float64)[:, 2 * P :], spec)
        assert math.isclose(nr["non_rotary"], 1.0) and nr["positional_index"] == 0.0
        assert math.isclose(mid["rotary"] + mid["non_rotary"], 1.0)


def test_planted_band_survives_a_rotated_frame():
    """A pair-local subspace keeps its profile under any rotary frame change (R acts
    within pairs), so the profile means the same in either frame."""
    spec = _spec(32)
    B = _pair_basis(spec, [0, 1])
    turned = rotate(B.T, 37, spec).T
    a, b = band_profile(B, spec), band_profile(turned, spec)
    assert max(abs(x - y) for x, y in zip(a["pairs"], b["pairs"], strict=True)) < 1e-12


def test_rotation_is_orthogonal_and_keeps_relative_logits():
    spec = _spec(16, 6, "interleaved")
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(5, 16, generator=g, dtype=torch.float64),
        torch.randn(5, 16, generator=g, dtype=torch.float64),
    )
    pq, pk = torch.tensor([9, 3, 40, 7, 100]), torch.tensor([2, 3, 1, 0, 55])
    qp, kp = rotate(q, pq, spec), rotate(k, pk, spec)
    # query frame: q' = R(p_q)ᵀ q_post = q_pre and k' = R(p_k − p_q) k_pre; logits equal
    assert torch.allclose(rotate(qp, pq, spec, inverse=True), q, atol=1e-12)
    kq = rotate(kp, pq, spec, inverse=True)
    assert torch.allclose(kq, rotate(k, pk - pq, spec), atol=1e-12)
    assert torch.allclose((qp * kp).sum(-1), (q * kq).sum(-1), atol=1e-12)
    with pytest.raises(ValueError, match="layout"):
        RotarySpec(16, spec.inv_freq, "zigzag")


def test_offset_test_flags_a_confounded_contrast_not_a_balanced_one():
    rng = random.Random(0)
    slots = list(range(2, 12))
    conf_pos = [rng.choice(slots[6:]) for _ in range(60)]  # positives always far
    conf_neg = [rng.choice(slots[:6]) for _ in range(60)]
    bal_pos = [rng.choice(slots) for _ in range(60)]
    bal_neg = [rng.choice(slots) for _ in range(60)]
    conf, bal = offset_test(conf_pos, conf_neg), offset_test(bal_pos, bal_neg)
    assert conf["confounded"] and conf["p_value"] < 1e-10 and conf["auc"] > 0.95
    assert not bal["confounded"] and bal["p_value"] > 0.05 and abs(bal["auc"] - 0.5) < 0.15
    assert offset_test([3, 3], [3, 3])["p_value"] is None  # all tied: no test, no warning
    # positives in the middle slot, negatives on both sides: same median, different shape
    mid = offset_test([16] * 40, [9] * 40 + [23] * 40)
    assert abs(mid["auc"] - 0.5) < 0.01 and mid["ks"] >= 0.49 and mid["confounded"]
    assert bal["ks_p_value"] > 0.01


def _records(confounded: bool, n: int = 40, seed: int = 0):
    """Lists of 6 letters; the query asks for the vowel-like 'x' items. Confounded: the
    positives always sit in the last two slots; balanced: at random slots."""
    from qkcov.tasks.records import ContrastRecord, Span

    rng = random.Random(seed)
    out = []
    for i in range(n):
        slots = [4, 5] if confounded else rng.sample(range(6), 2)
        items = [("x" if j in slots else "o") + "abcdef"[j] for j in range(6)]
        prompt = " ".join(items) + " ?"
        spans = [Span(3 * j, 3 * j + 2) for j in range(6)]
        out.append(ContrastRecord(
            prompt, positives=[spans[j] for j in slots],
            negatives=[spans[j] for j in range(6) if j not in slots],
            feature="x", group="g" + str(i % 2),
        ))  # fmt: skip
    return out


def test_offset_warning_names_the_feature_in_the_pipeline(tmp_path):
    from qkcov.models.tiny import tiny_model, tiny_tokenizer
    from qkcov.pipeline import analyze

    model, tok = tiny_model("llama"), tiny_tokenizer()
    fast = dict(n_random=20, n_permutations=20, n_bootstrap=0, batch_size=16, heads="L1H0",
                steps="projections", progress=False)  # fmt: skip
    conf = analyze(model, tok, _records(True), **fast)
    bal = analyze(model, tok, _records(False), **fast)
    warn = [n for n in conf.notes if n.startswith("position confound")]
    assert len(warn) == 1 and "feature 'x'" in warn[0]
    assert not [n for n in bal.notes if n.startswith("position confound")]
    assert conf.position["offsets"]["x"]["pooled"]["confounded"]
    assert not bal.position["offsets"]["x"]["pooled"]["confounded"]
    d = conf.to_dict()
    head = d["heads"][0]["position"]
    prof = head["rotary_profile"]["x"]["pooled"]
    assert len(prof["key"]["pairs"]) == 8 and 0 <= prof["key"]["positional_index"] <= 1
    # confounded: labels follow the slot exactly, the control cannot tell them apart
    c_conf, c_bal = head["control"]["x"], bal.to_dict()["heads"][0]["position"]["control"]["x"]
    assert c_conf["mixed_fraction"] == 0.0 and math.isclose(c_conf["norm_ratio"], 1.0)
    assert c_bal["mixed_fraction"] > 0.9 and c_bal["norm_ratio"] < 0.9
    assert set(c_conf["groups"]) == {"g0", "g1"} and c_conf["groups"]["g0"]["mixed_fraction"] == 0.0
    conf.save(tmp_path / "run")
    from qkcov.results import AnalysisResult

    back = AnalysisResult.load(tmp_path / "run")
    assert back.position == conf.to_dict()["position"]
    assert back.heads[0].position == head
    assert (tmp_path / "run" / "rotary_L1H0.png").is_file()
    assert (tmp_path / "run" / "offsets.png").is_file()
    hist = conf.position["offsets"]["x"]["pooled"]["histogram"]
    n_build = conf.features[0]["n_build"]  # offsets are of build records: 2 + 4 keys each
    assert sum(hist["pos"]) == 2 * n_build and sum(hist["neg"]) == 4 * n_build
    section = (tmp_path / "run" / "section.json").read_text()
    assert "position confound" in section and "Position control" in section


def test_position_control_separates_planted_position_from_feature():
    """Keys = a position code + a feature code; the feature-labelled ΔC lives in the feature
    directions when labels are balanced over offsets, in the position ones when confounded."""
    g = torch.Generator().manual_seed(0)
    D, n = 16, 300
    feat_dir, pos_dirs = torch.eye(D)[:, 0].double(), torch.eye(D)[:, 1:5].double()
    q = (
        (torch.randn(n, D, generator=g, dtype=torch.float64) * 0.1)
        + feat_dir
        + pos_dirs.sum(1) * 0.5
    )

    def build(confounded):
        keys, rec, lab, off = [], [], [], []
        for i in range(n):
            slots = [2, 3] if confounded else torch.randperm(4, generator=g)[:2].tolist()
            for s in range(4):
                y = s in slots
                k = (
                    pos_dirs[:, s] * 2.0
                    + feat_dir * (1.0 if y else -1.0)
                    + 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
                )
                keys.append(k)
                rec.append(i)
                lab.append(y)
                off.append(10 - s)  # noqa: E702
        return torch.stack(keys), torch.tensor(rec), torch.tensor(lab), torch.tensor(off)

    keys, rec, lab, off = build(False)
    bal = position_control(q, keys, rec, lab, off, real_key_basis=feat_dir[:, None], n_draws=10)
    assert bal["norm_ratio"] < 2 * bal["null_ratio"] + 0.05 and bal["angles_degrees"][0] > 60
    keys, rec, lab, off = build(True)
    real = record_delta(q, keys, rec, lab)
    conf = position_control(q, keys, rec, lab, off, n_draws=10)
    assert conf["mixed_fraction"] == 0.0 and conf["norm_ratio"] > 0.99
    assert conf["real_energy_in_position"] > 0.99 and torch.linalg.matrix_norm(real) > 0

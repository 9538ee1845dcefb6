"""Planted heads for the conditional (stratified) label tests, shared by
tests/core/test_conditional.py and benchmarks/conditional_calibration.py.

Each record: one query, a positive and a negative key at query–key offsets in 1..6 and two
distractor keys. Keys are noise of very unequal variance per dimension plus a rotary-like
position code ``cos/sin(offset·θ)`` in dims 5–6; queries carry a dominant shared direction
(dim 0, read by the highest-variance key dim) and read the position code, so every design
has a head that moves attention by where the key sits. Designs:

- ``feature``: the positive key also carries a class direction ``u`` the query reads;
  offsets of both sides drawn independently (the records can tell position from feature).
- ``null``: no feature; which of the two keys is positive is a fair coin (offsets as above):
  the labels carry nothing beyond the offsets (false-positive rate).
- ``tilted``: no feature; the positive is the nearer of the two keys in 3 records of 4: the
  labels lean on the offset without being a function of it (an unconditional null rejects
  here; the stratified one must not).
- ``offset``: no feature; positives at offsets 1–3, negatives at 4–6 (labels are a function
  of the offset): must be ``confounded``.
- ``role``: the positive is the key whose ``role`` attribute is ``subject``, and the role
  carries a direction the query reads (a rival that fully explains the labels); offsets
  independent. Controlled for ``offset,role`` it must be ``confounded``.

:func:`run_head` runs the pipeline's chain on it with core functions: ΔC of the build keys,
its significance, the rank-r key subspace swap against random and label-permuted (stratified)
subspaces, the centroid patch against stratified permuted labels, then
:func:`qkcov.core.conditional.decide`.
"""

from __future__ import annotations

import math

import torch

from qkcov.core.causal import centroid_patch
from qkcov.core.conditional import (
    confounding,
    decide,
    key_class_means,
    key_deltas,
    offset_strata,
    strata_ids,
    stratified_labels,
)
from qkcov.core.intervention import swapped_attention
from qkcov.core.statistics import RecordStats, permutation_null, random_p_value, significance
from qkcov.core.subspace import random_orthonormal

F64 = torch.float64
D, S = 16, 4
THETA = 0.7
DESIGNS = ("feature", "null", "tilted", "offset", "role")


def planted(seed: int, design: str, n: int, effect: float = 2.5):
    """``(q [n, D], keys [n, S, D], offsets [n, S], positive index [n], negative index [n],
    roles [n, S])``: keys 0 and 1 are the contrast's pair (which is positive per record), 2–3
    distractors."""
    if design not in DESIGNS:
        raise ValueError(design)
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -1.2, D, dtype=F64)
    q = torch.randn(n, D, generator=g, dtype=F64) * 0.5
    q[:, 0] += 6.0  # dominant shared direction
    q[:, 3] += 3.0  # reads the class direction u = e3
    q[:, 5] += 4.0  # reads the position code
    q[:, 7] += 3.0  # reads the role direction e7
    k = torch.randn(n, S, D, generator=g, dtype=F64) * scale
    if design == "offset":
        o_pos = torch.randint(1, 4, (n,), generator=g)
        o_neg = torch.randint(4, 7, (n,), generator=g)
    else:
        o_pos = torch.randint(1, 7, (n,), generator=g)
        o_neg = (o_pos + torch.randint(1, 6, (n,), generator=g) - 1) % 6 + 1  # a different slot
    offs = torch.stack([o_pos, o_neg, torch.full((n,), 7), torch.full((n,), 8)], 1)
    k[:, :, 5] += 1.5 * torch.cos(offs * THETA)
    k[:, :, 6] += 1.5 * torch.sin(offs * THETA)
    pos, neg = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)
    roles = [["subject", "object", "-", "-"] for _ in range(n)]
    if design == "feature":
        k[:, 0, 3] += effect
    elif design == "role":
        k[:, 0, 7] += effect  # the subject's role direction
    elif design in ("null", "tilted"):
        coin = torch.rand(n, generator=g)
        flip = coin < 0.5 if design == "null" else (o_neg < o_pos) == (coin < 0.75)
        pos, neg = torch.where(flip, 1, 0), torch.where(flip, 0, 1)
    return q, k, offs, pos, neg, roles


def _key_rows(k, offs, pos, neg, roles):
    """The contrast's keys as rows (positive then negative per record)."""
    n = k.shape[0]
    rows = torch.arange(n)
    keys = torch.stack([k[rows, pos], k[rows, neg]], 1).reshape(2 * n, -1)
    rec = torch.arange(n).repeat_interleave(2)
    lab = torch.tensor([True, False]).repeat(n)
    o = torch.stack([offs[rows, pos], offs[rows, neg]], 1).reshape(-1)
    ro = [roles[i][int(j)] for i in range(n) for j in (pos[i], neg[i])]
    return keys, rec, lab, o, ro


def _top_key(deltas: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svd(deltas).Vh[:, :r].transpose(1, 2)  # [P, D, r]


def run_head(
    seed: int,
    design: str,
    *,
    control: tuple[str, ...] = ("offset",),
    n_build: int = 120,
    n_held: int = 48,
    rank: int = 1,
    n_perm: int = 99,
    n_random: int = 99,
    n_null: int = 99,
    alpha: float = 0.05,
    effect: float = 2.5,
) -> dict:
    """One planted head through the chain; returns the evidence, status and reason."""
    q, k, offs, pos, neg, roles = planted(seed, design, n_build + n_held, effect)
    b, h = slice(0, n_build), slice(n_build, None)
    keys, rec, lab, o, ro = _key_rows(
        k[b], offs[b], pos[b], neg[b], [roles[i] for i in range(n_build)]
    )
    qb = q[b]
    # significance of the real ΔC (the unconditional record-level null, as the pipeline)
    rows = torch.arange(n_build)
    ones = torch.ones(n_build, dtype=torch.bool)
    st = RecordStats(
        qb,
        k[b][rows, pos[b]],
        k[b][rows, neg[b]],
        ones,
        ones,
        torch.zeros(n_build, dtype=torch.long),
    )
    sig = significance(st.delta(), permutation_null(st, n_null, seed=seed + 11), alpha=alpha)
    cols = {"offset": offset_strata(o), "role": ro}
    controls = {c: cols[c] for c in control}
    conf = confounding(controls, lab)
    strata = (
        strata_ids(*controls.values()) if controls else torch.zeros(lab.numel(), dtype=torch.long)
    )
    perm = stratified_labels(strata, lab, n_perm, seed=seed + 17)
    labels = torch.cat([lab[None], perm])
    bases = _top_key(key_deltas(qb, keys, rec, labels), rank)  # [1+P, D, r]
    mu_p, mu_n = key_class_means(keys, rec, labels)
    hq, hk = q[h], k[h]
    m = hq.shape[0]
    orig, target = pos[h], neg[h]
    rnd = [random_orthonormal(D, rank, seed=seed * 1000 + j) for j in range(n_random)]
    attn = swapped_attention(hq, hk, orig, target, [None, *bases, *rnd])
    rr = torch.arange(m)
    p = attn[:, rr, target] / (attn[:, rr, orig] + attn[:, rr, target])
    dp = (p[1:] - p[0]).mean(1)  # [1+P+R]
    real, permuted, random = float(dp[0]), dp[1 : 1 + n_perm], dp[1 + n_perm :]
    patch = centroid_patch(hq, hk, orig, target, bases, mu_p, mu_n)["effect"].mean(1)
    ev = {
        "p_null": sig.p_value,
        "delta_p": real,
        "random_mean": float(random.mean()),
        "p_vs_random": random_p_value(real, random),
        "permuted_mean": float(permuted.mean()),
        "p_vs_permuted": random_p_value(real, permuted),
        "label_effect": float(patch[0]),
        "label_permuted_mean": float(patch[1:].mean()),
        "p_label": random_p_value(float(patch[0]), patch[1:]),
        "confounded": conf["confounded"],
        "mixed_fraction": conf["mixed_fraction"],
        "fixed_by": conf["fixed_by"],
    }
    status, reason = decide(ev, alpha)
    return {"status": status, "reason": reason, **ev}


def rates(designs, seeds, **kw) -> dict:
    """Per design: share of seeds per status and the label / permuted-swap rejection rates."""
    out = {}
    for d in designs:
        res = [run_head(s, d, **kw) for s in seeds]
        alpha = kw.get("alpha", 0.05)
        stat: dict[str, float] = {}
        for r in res:
            stat[r["status"]] = stat.get(r["status"], 0) + 1 / len(res)
        out[d] = {
            "status": stat,
            "label_reject": sum(r["p_label"] < alpha for r in res) / len(res),
            "permuted_reject": sum(r["p_vs_permuted"] < alpha for r in res) / len(res),
            "label_effect": [r["label_effect"] - r["label_permuted_mean"] for r in res],
            "swap_effect": [r["delta_p"] - r["random_mean"] for r in res],
            "mixed": sum(r["mixed_fraction"] for r in res) / len(res),
            "n": len(res),
            "se": math.sqrt(0.25 / len(res)),
        }
    return out

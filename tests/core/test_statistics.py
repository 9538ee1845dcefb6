"""Significance statistics: RecordStats ΔC, permutation null calibration, parallel-analysis
rank recovery, record bootstrap, swap statistics. Plain tensors; the file runs in seconds."""

from __future__ import annotations

import json

import pytest
import torch

from qkcov.artifacts import load_tensors, read_tensor_metadata, save_tensors
from qkcov.core.covariance import ContrastiveCovariance
from qkcov.core.statistics import (
    NullDistribution,
    RecordStats,
    StatisticsWarning,
    _null_signs,
    _ranks_at_energy,
    bootstrap,
    paired_bootstrap_ci,
    permutation_null,
    random_p_value,
    significance,
)
from qkcov.core.subspace import (
    feature_subspace,
    principal_angles,
    random_orthonormal,
    rank_at_energy,
)

F64 = torch.float64


def _design(n: int, design: str) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(n)
    if design == "both":
        return torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    if design == "one":  # one-sided only, unbalanced: 2/5 positive, 3/5 negative
        return i % 5 < 2, i % 5 >= 2
    if design == "mixed":  # half two-sided, a quarter positive-only, a quarter negative-only
        return i % 4 != 1, i % 4 != 2
    raise AssertionError(design)


def noise_stats(n: int, d: int, seed: int, design: str = "both", groups: int = 2) -> RecordStats:
    """Pure noise: q, k⁺, k⁻ i.i.d. standard Gaussian (the null hypothesis holds)."""
    g = torch.Generator().manual_seed(seed)
    q, kp, kn = (torch.randn(n, d, generator=g, dtype=F64) for _ in range(3))
    hp, hn = _design(n, design)
    names = [f"g{j}" for j in range(groups)]
    return RecordStats(q, kp, kn, hp, hn, torch.arange(n) % groups, names)


def planted_stats(n: int, d: int, r: int, signal: float, seed: int) -> RecordStats:
    """k⁺ = A z + ε, k⁻ = A z' + ε, q = B z + ε with A, B = signal·orthonormal [d, r]:
    ΔC = B Aᵀ has rank r and singular values signal²."""
    g = torch.Generator().manual_seed(seed)
    a = random_orthonormal(d, r, seed=g) * signal
    b = random_orthonormal(d, r, seed=g) * signal
    z, z_other = (torch.randn(n, r, generator=g, dtype=F64) for _ in range(2))
    q, kp, kn = (torch.randn(n, d, generator=g, dtype=F64) for _ in range(3))
    ones = torch.ones(n, dtype=torch.bool)
    return RecordStats(
        q + z @ b.T, kp + z @ a.T, kn + z_other @ a.T, ones, ones, torch.zeros(n, dtype=torch.long)
    )


# --------------------------------------------------------------------------- RecordStats
@pytest.mark.parametrize("design", ["both", "one", "mixed"])
def test_delta_matches_contrastive_covariance(design):
    st = noise_stats(150, 12, 1, design, groups=3)
    st.q += 0.5  # non-zero means so that the uncentred moments matter
    acc = ContrastiveCovariance(12, 12, st.groups)
    for start in range(0, st.n, 32):  # batches, as run_contrast folds them in
        sl = slice(start, start + 32)
        hp, hn, q, g = st.has_pos[sl], st.has_neg[sl], st.q[sl], st.group[sl]
        if hp.any():
            acc.update(q[hp], st.k_pos[sl][hp], None, group=g[hp])
        if hn.any():
            acc.update(q[hn], None, st.k_neg[sl][hn], group=g[hn])
    for group in (None, "g0", "g2", 1):
        ref = acc.delta(group)
        assert (st.delta(group) - ref).norm() <= 1e-12 * ref.norm()
        assert st.counts(group) == acc.counts(group)


def test_delta_signs_relabel_records():
    st = noise_stats(40, 6, 2, "mixed")
    both = st.has_pos & st.has_neg
    # flipping only two-sided records swaps their keys
    s = torch.where(both, -1, 1)
    swapped = RecordStats(
        st.q,
        torch.where(both[:, None], st.k_neg, st.k_pos),
        torch.where(both[:, None], st.k_pos, st.k_neg),
        st.has_pos,
        st.has_neg,
        st.group,
        st.groups,
    )
    torch.testing.assert_close(st.delta(signs=s), swapped.delta(), rtol=1e-12, atol=1e-14)
    # flipping everything moves one-sided records too: ΔC changes sign exactly
    torch.testing.assert_close(st.delta(signs=-torch.ones(40)), -st.delta(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="signs"):
        st.delta(signs=torch.zeros(40))


def test_linear_null_terms_and_signs_respect_the_design():
    st = noise_stats(90, 8, 3, "mixed", groups=3)
    st = st.subset(torch.cat([torch.arange(60), torch.arange(70, 90)]))  # uneven groups
    base, q, d, s0, both = st._linear_terms(None)
    signs = _null_signs(s0, both, st.group, 25, torch.Generator().manual_seed(0))
    one = ~both
    for row in signs:
        # ΔC(s) = M + Σ s_i q_i d_iᵀ (s: +1 positive side) is delta() under that relabelling
        torch.testing.assert_close(base + (q * row[:, None]).T @ d, st.delta(signs=row * s0))
        for gi in range(3):  # one-sided labels are permuted inside each group
            m = one & (st.group == gi)
            assert int((row[m] > 0).sum()) == int((s0[m] > 0).sum())
    assert (signs[:, one] != s0[one]).any()  # … and do move
    flips = signs[:, both]
    assert 0.35 < float((flips > 0).double().mean()) < 0.65
    # the null's spectra are those of delta() under these signs (same generator stream)
    null = permutation_null(st, 25, seed=0)
    for p in (0, 7, 24):
        relabelled = st.delta(signs=signs[p] * s0)
        torch.testing.assert_close(null.singular_values[p], torch.linalg.svdvals(relabelled))
        torch.testing.assert_close(null.frobenius[p], relabelled.norm())


def test_concat_subset_tensors_roundtrip(tmp_path):
    a = noise_stats(30, 5, 4, "mixed", groups=2)
    b = noise_stats(20, 5, 5, "one", groups=3)
    both = a.concat(b)
    assert both.n == 50 and both.groups == ["g0", "g1", "g2"]
    torch.testing.assert_close(both.subset(torch.arange(30, 50)).delta("g2"), b.delta("g2"))
    torch.testing.assert_close(both.subset(torch.arange(30)).delta(), a.delta())
    path = save_tensors(tmp_path / "rs.safetensors", both.to_tensors("h."), {"groups": both.groups})
    back = RecordStats.from_tensors(load_tensors(path), read_tensor_metadata(path)["groups"], "h.")
    for name in ("q", "k_pos", "k_neg", "has_pos", "has_neg", "group"):
        assert torch.equal(getattr(back, name), getattr(both, name))
    assert both.memory_bytes() == 50 * (3 * 5 * 8 + 1 + 1 + 8)
    assert both.memory_bytes() <= 50 * (3 * 5 + 3) * 8


def test_record_stats_rejects_bad_input():
    q = torch.randn(5, 4)
    ones = torch.ones(5, dtype=torch.bool)
    with pytest.raises(ValueError, match="share n"):
        RecordStats(q, torch.randn(4, 4), torch.randn(5, 4), ones, ones, torch.zeros(5))
    with pytest.raises(ValueError, match="neither"):
        RecordStats(q, q, q, ~ones, ~ones, torch.zeros(5))
    with pytest.raises(ValueError, match="group"):
        RecordStats(q, q, q, ones, ones, torch.full((5,), 2), ["a", "b"])
    st = RecordStats(q, q, q, ones, ~ones, torch.zeros(5))
    assert torch.equal(st.k_neg, torch.zeros(5, 4, dtype=F64))  # absent side zeroed
    with pytest.raises(ValueError, match="no negative"):
        st.delta()
    with pytest.raises(ValueError, match="unknown group"):
        st.delta("nope")


# --------------------------------------------------------------------------- null
def test_permutation_null_shapes():
    # speed is not asserted in tests (shared, noisy machines); timings belong in benchmarks/
    null = permutation_null(noise_stats(240, 64, 6), 200, seed=1)
    assert null.singular_values.shape == (200, 64) and null.frobenius.shape == (200,)


@pytest.mark.parametrize(("design", "seeds"), [("both", 400), ("one", 200), ("mixed", 200)])
def test_false_positive_rate_is_calibrated(design, seeds):
    hits = 0
    for seed in range(seeds):
        st = noise_stats(120 + seed % 80, 16, seed, design)  # n in 120..199
        res = significance(st.delta(), permutation_null(st, 200, seed=10_000 + seed))
        hits += res.significant
        assert res.significant == (res.p_value < 0.05 and res.rank_null >= 1)
    rate = hits / seeds
    print(f"\nfalse-positive rate ({design}, {seeds} seeds, α=0.05): {rate:.3f}")
    assert 0.02 <= rate <= 0.08


def test_planted_rank_is_recovered_by_parallel_analysis():
    n, d, seeds = 200, 16, 100
    rates = {}
    for r in (1, 2, 3, 4):
        exact = 0
        for seed in range(seeds):
            st = planted_stats(n, d, r, 1.6, seed)
            exact += significance(st.delta(), permutation_null(st, 200, seed=seed)).rank_null == r
        rates[r] = exact / seeds
    print(f"\nexact rank recovery (signal 1.6, n={n}, D={d}, {seeds} seeds): {rates}")
    assert all(rate >= 0.9 for rate in rates.values())
    # the task is not trivial: at a weaker signal the same rule often misses the rank
    weak = sum(
        significance(
            (st := planted_stats(n, d, 4, 0.9, seed)).delta(), permutation_null(st, 200, seed=seed)
        ).rank_null
        == 4
        for seed in range(seeds)
    )
    print(f"exact rank recovery at signal 0.9, r=4: {weak / seeds:.2f}")
    assert weak / seeds < 0.8


def test_significance_against_a_known_null():
    null_s = torch.tensor([[4.0, 2.0, 1.0]] * 19 + [[6.0, 2.0, 1.0]], dtype=F64)  # P = 20
    null = NullDistribution(True, "", null_s, null_s.norm(dim=1), 50, 20)
    obs = torch.diag(torch.tensor([5.0, 3.0, 0.5], dtype=F64))
    res = significance(obs, null, alpha=0.05, energy=0.9)
    assert res.p_value == pytest.approx(2 / 21)  # one null top value (6) ≥ 5
    assert res.p_value_frobenius == pytest.approx(2 / 21)
    assert not res.significant and "α=0.05" in res.reason and "p=0.0952" in res.reason
    res = significance(obs, null, alpha=0.1)
    assert res.significant and res.reason == ""
    # parallel analysis: 5 > q(4|6), 3 > 2, 0.5 < 1 → 2; stops at the first failure
    assert res.rank_null == 2
    assert res.rank_energy == rank_at_energy(torch.tensor([5.0, 3.0, 0.5]), 0.99)
    obs_gap = torch.diag(torch.tensor([5.0, 1.0, 9.0], dtype=F64))  # svd sorts: 9, 5, 1
    assert significance(obs_gap, null, alpha=0.1).rank_null == 2
    assert res.null_band.shape == (2, 3)
    json.dumps(res.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_covers_true_singular_values_and_rank():
    seeds, r, signal = 40, 2, 1.6
    covered = rank_in = 0
    stabilities = []
    for seed in range(seeds):
        st = planted_stats(200, 16, r, signal, seed)
        res = bootstrap(st, 200, seed=seed)
        lo, hi = res.singular_value_ci[:, :r]
        covered += int(((lo <= signal**2) & (signal**2 <= hi)).sum())
        rank_in += res.rank_ci[0] <= r <= res.rank_ci[1]
        stabilities.append(res.stability_deg)
    coverage = covered / (seeds * r)
    print(f"\nbootstrap: sv-CI coverage {coverage:.2f}, rank in CI {rank_in / seeds:.2f}")
    assert coverage >= 0.8 and rank_in / seeds >= 0.8
    assert torch.tensor(stabilities).median() < 25.0
    # pure noise: the rank CI is near 0 and the key subspace is unstable (or absent)
    res = bootstrap(noise_stats(200, 16, 1), 200, seed=1)
    assert res.rank_ci[0] == 0
    assert res.stability_deg is None or res.stability_deg > 45.0
    json.dumps(res.to_dict(), allow_nan=False)


def test_bootstrap_resamples_are_record_resamples():
    st = planted_stats(60, 8, 2, 2.0, 3)
    res = bootstrap(st, 5, seed=11, rank_rule="energy", energy=0.9)
    full = feature_subspace(st.delta(), 0.9)
    assert res.rank == full.rank and res.n_boot == 5
    draws = torch.randint(0, 60, (5, 60), generator=torch.Generator().manual_seed(11))
    for b in range(5):
        resample = feature_subspace(st.subset(draws[b]).delta(), rank=full.rank)
        angle = principal_angles(full.key_basis, resample.key_basis).max().rad2deg()
        assert float(res.max_angles_deg[b]) == pytest.approx(float(angle), abs=1e-6)
    s = torch.rand(50, 7, dtype=F64).sort(descending=True, dim=1).values
    s[3] = 0
    loop = torch.tensor([rank_at_energy(row, 0.8) for row in s])
    assert torch.equal(_ranks_at_energy(s, 0.8), loop)


# --------------------------------------------------------------------------- unavailable
def test_few_records_or_null_off_are_unavailable_not_errors():
    st = noise_stats(9, 4, 0)
    with pytest.warns(StatisticsWarning, match=r"fewer than 10 records \(n=9\)"):
        null = permutation_null(st)
    assert not null.available and null.reason == "fewer than 10 records (n=9)"
    res = significance(st.delta(), null)
    assert not res.available and not res.significant and "n=9" in res.reason
    assert res.rank_energy >= 1
    with pytest.warns(StatisticsWarning, match="n=9"):
        assert not bootstrap(st).available
    with pytest.warns(StatisticsWarning, match="n=9"):
        lo, hi = paired_bootstrap_ci(torch.ones(9))
    assert lo != lo and hi != hi  # NaN
    big = noise_stats(30, 4, 0)
    with pytest.warns(StatisticsWarning, match="n_permutations=0"):
        off = permutation_null(big, n_permutations=0)
    assert not off.available and not significance(big.delta(), off).available
    with pytest.warns(StatisticsWarning, match=r"fewer than 10 records \(n=5\)"):
        assert not permutation_null(big.subset(torch.arange(10)), group="g1").available
    for obj in (null, off, res):
        json.dumps(obj.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------- swaps
def test_paired_bootstrap_ci_covers_the_mean():
    hits = 0
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        values = 0.3 + torch.randn(40, generator=g, dtype=F64)
        lo, hi = paired_bootstrap_ci(values, n_boot=500, seed=seed)
        assert lo < float(values.mean()) < hi
        hits += lo <= 0.3 <= hi
    print(f"\npaired_bootstrap_ci 95 % coverage over 200 seeds: {hits / 200:.2f}")
    assert 0.88 <= hits / 200 <= 0.99
    with pytest.raises(ValueError, match="ci"):
        paired_bootstrap_ci(torch.ones(20), ci=1.5)


def test_random_p_value():
    assert random_p_value(2.0, [0.0, 1.0, 2.0, 3.0]) == pytest.approx(3 / 5)
    assert random_p_value(10.0, torch.zeros(99)) == pytest.approx(1 / 100)
    with pytest.raises(ValueError, match="random_effects"):
        random_p_value(1.0, [float("nan")])


# --------------------------------------------------------------------------- realistic heads
def realistic_stats(
    n: int, d: int, r: int, signal: float, seed: int, dominant: float = 6.0
) -> RecordStats:
    """Structure seen in real heads: every query shares a dominant direction ``u`` (scale
    ``dominant``, ±30 % per record), key coordinates of very unequal variance (standard
    deviations 0.1 … 10), and a rank-``r`` feature whose query directions are orthogonal to
    ``u``: q += signal·B z, k⁺ += signal·A z, k⁻ += signal·A z'."""
    g = torch.Generator().manual_seed(seed)
    u = random_orthonormal(d, 1, seed=g)
    b = torch.linalg.qr(torch.cat([u, torch.randn(d, r, generator=g, dtype=F64)], 1))[0]
    b = b[:, 1 : r + 1]
    a = random_orthonormal(d, r, seed=g)
    k_sd = torch.logspace(-1, 1, d, dtype=F64)[torch.randperm(d, generator=g)]
    shared = dominant * (1 + 0.3 * torch.randn(n, 1, generator=g, dtype=F64))
    q = torch.randn(n, d, generator=g, dtype=F64) + shared * u.T
    kp, kn = (torch.randn(n, d, generator=g, dtype=F64) * k_sd for _ in range(2))
    if r:
        z, z_other = (torch.randn(n, r, generator=g, dtype=F64) for _ in range(2))
        q, kp, kn = q + signal * z @ b.T, kp + signal * z @ a.T, kn + signal * z_other @ a.T
    ones = torch.ones(n, dtype=torch.bool)
    return RecordStats(q, kp, kn, ones, ones, torch.zeros(n, dtype=torch.long))


def test_dominant_shared_query_direction_keeps_the_test_calibrated():
    seeds, hits = 400, 0
    for seed in range(seeds):
        st = realistic_stats(120 + seed % 80, 16, 0, 0.0, seed)
        res = significance(st.delta(), permutation_null(st, 200, seed=20_000 + seed))
        hits += res.significant
        assert res.significant == (res.rank_null >= 1)
    rate = hits / seeds
    print(f"\nfalse-positive rate, dominant query direction + unequal key variances: {rate:.3f}")
    assert 0.02 <= rate <= 0.08


def test_weak_feature_orthogonal_to_a_dominant_direction_is_found():
    seeds = 60
    exact, parallel = {}, {}
    for r in (1, 2, 3, 4):
        res = [
            significance((st := realistic_stats(240, 16, r, 3.0, s)).delta(),
                         permutation_null(st, 200, seed=s))
            for s in range(seeds)
        ]  # fmt: skip
        exact[r] = sum(x.rank_null == r for x in res) / seeds
        parallel[r] = sum(x.rank_parallel == r for x in res) / seeds
    print(f"\nexact rank, dominant direction: sequential {exact}, raw parallel analysis {parallel}")
    assert all(rate >= 0.9 for rate in exact.values())
    assert all(rate <= 0.2 for rate in parallel.values())  # the former rule misses it


def test_rank_ci_holds_the_point_rank_and_covers_the_planted_rank():
    seeds, r, covered = 30, 2, 0
    for seed in range(seeds):
        st = realistic_stats(240, 16, r, 3.0, seed)
        res = bootstrap(st, 100, seed=seed)
        lo, hi = res.rank_ci
        assert lo <= res.rank <= hi  # by construction
        assert res.rank_ci_percentile[0] >= lo and res.rank_ci_percentile[1] <= hi
        covered += lo <= r <= hi
    print(f"\nrank CI covers the planted rank {r}: {covered / seeds:.2f}")
    assert covered / seeds >= 0.9
    for seed in range(10):  # noise: the point rank (0 unless significant) is in the CI too
        res = bootstrap(realistic_stats(150, 16, 0, 0.0, seed), 50, seed=seed)
        assert res.rank_ci[0] <= res.rank <= res.rank_ci[1] and res.rank_ci[0] == 0


def test_duplicated_records_do_not_raise_the_rank():
    st = realistic_stats(40, 16, 2, 3.0, 5)
    ref = significance(st.delta(), permutation_null(st, 200, seed=1))
    tripled = st.subset(torch.arange(40).repeat(3))
    with pytest.warns(StatisticsWarning, match="80 of 120 records duplicate others exactly"):
        null = permutation_null(tripled, 200, seed=1)
    assert null.n_distinct == 40
    res = significance(tripled.delta(), null)
    # identical records share their relabelling: the test is the 40-record one exactly
    assert res.rank_null == ref.rank_null and res.p_value == ref.p_value
    assert res.n_records == 120 and res.n_distinct == 40
    with pytest.warns(StatisticsWarning, match="duplicate"):
        boot = bootstrap(tripled, 50, seed=2)
    assert boot.rank == ref.rank_null * ref.significant
    assert boot.rank_ci[0] <= boot.rank <= boot.rank_ci[1]
    # the former null (every copy relabelled on its own) was far too narrow
    assert res.rank_parallel >= ref.rank_parallel
    # twenty identical records are one record: unavailable, not rank 64
    same = st.subset(torch.zeros(20, dtype=torch.long))
    with pytest.warns(StatisticsWarning, match=r"fewer than 10 distinct records \(n=20, 1"):
        null = permutation_null(same, 50)
    assert not null.available and not significance(same.delta(), null).available


def test_numerically_zero_directions_never_count():
    # queries live in 3 of 16 dimensions: ΔC has rank ≤ 3, the rest is float round-off
    st = planted_stats(200, 16, 3, 2.0, 7)
    rot = random_orthonormal(16, 16, seed=torch.Generator().manual_seed(3))
    flat = torch.cat([st.q @ rot[:, :3], torch.zeros(200, 13, dtype=F64)], 1) @ rot.T
    st = RecordStats(flat, st.k_pos, st.k_neg, st.has_pos, st.has_neg, st.group)
    res = significance(st.delta(), permutation_null(st, 200, seed=0))
    assert float(res.singular_values[3]) < 1e-10 * float(res.singular_values[0])
    assert res.rank_null <= 3 and res.rank_parallel <= 3
    boot = bootstrap(st, 50, seed=0)
    assert int(boot.ranks.max()) <= 3


def test_fewer_records_than_dimensions_keep_their_power():
    # 40 records in 64 dimensions: the null's moments span 40 directions; clipping against
    # the median of the zero eigenvalues would whiten fully and lose the feature
    seeds, hits, hits_raw = 30, 0, 0
    for seed in range(seeds):
        st = planted_stats(40, 64, 2, 2.0, seed)
        res = significance(st.delta(), permutation_null(st, 200, seed=seed))
        hits += res.significant
        hits_raw += res.p_value_raw_top < 0.05
    print(f"\nn=40, D=64: significant {hits / seeds:.2f} (raw top {hits_raw / seeds:.2f})")
    assert hits / seeds >= 0.8 and hits >= hits_raw - 0.15 * seeds

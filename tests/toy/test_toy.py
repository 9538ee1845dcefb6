"""Simplified setting: DGP, training, analytic vs sampled ΔC, experiments and CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qkcov.artifacts import verify_run_folder
from qkcov.cli import main
from qkcov.core.subspace import feature_subspace, orthonormalize, principal_angles
from qkcov.toy.analytic import analytic_deltas, estimate_deltas, relative_error
from qkcov.toy.data import ToyConfig, make_dgp
from qkcov.toy.model import TrainConfig, train_cells


@pytest.fixture(scope="module")
def trained():
    """One binary cell N=3, M=5 (a few seconds)."""
    return train_cells([ToyConfig(variant="binary", n_z1=3, n_z2=5)], TrainConfig(), progress=False)


@pytest.fixture(scope="module")
def trained_gaussian():
    """One sphere-normalised Gaussian cell N=3, M=3 (a few seconds)."""
    return train_cells([ToyConfig(variant="gaussian", n_z1=3, n_z2=3)], progress=False)


def test_unknown_variant_names_the_argument():
    with pytest.raises(ValueError, match="variant"):
        ToyConfig(variant="ternary")
    with pytest.raises(ValueError, match="n_z1"):
        ToyConfig(n_z1=0)


def test_unknown_latent_norm_names_the_argument():
    with pytest.raises(ValueError, match="latent_norm.*'unit'"):
        ToyConfig(variant="gaussian", latent_norm="unit")
    assert ToyConfig(variant="gaussian").latent_norm == "sphere"


def test_gaussian_sphere_latents_have_norm_sqrt_dim_and_identity_moment():
    cfgs = [
        ToyConfig("gaussian", 3, 5),
        ToyConfig("gaussian", 3, 5, latent_norm="raw"),
        ToyConfig("binary", 7, 3),
    ]
    dgp = make_dgp(cfgs)
    n = 100_000
    z1, z2 = dgp.sample_latents((n,), torch.Generator().manual_seed(0))
    norms1, norms2 = z1.norm(dim=-1), z2.norm(dim=-1)
    torch.testing.assert_close(norms1[0], torch.full((n,), math.sqrt(3)))
    torch.testing.assert_close(norms2[0], torch.full((n,), math.sqrt(5)))
    assert norms1[1].std() > 0.3  # raw Gaussian: norms vary
    torch.testing.assert_close(norms1[2], torch.full((n,), math.sqrt(7)))  # binary
    for k, (nz1, nz2) in enumerate([(3, 5), (3, 5), (7, 3)]):
        for z, dim in ((z1[k], nz1), (z2[k], nz2)):
            second = z.T @ z / n  # empirical E[z zᵀ] (padded coordinates are zero)
            expected = torch.diag((torch.arange(dgp.L) < dim).float())
            torch.testing.assert_close(second, expected, atol=0.02, rtol=0)
    # the analytic prediction uses exactly this second moment
    torch.testing.assert_close(dgp.second_moment("z1")[0], torch.diag(dgp.mask1[0].double()))
    # sphere latents: the target is the unique bilinear maximiser; raw ones cap the oracle
    oracle = dgp.oracle_accuracy(dgp.sample_sequences(2048, torch.Generator().manual_seed(1)))
    assert oracle[0] == 1.0 and oracle[2] == 1.0 and oracle[1] < 0.9


def test_dgp_shapes_and_latents():
    cfgs = [ToyConfig("binary", 3, 5), ToyConfig("gaussian", 7, 3)]
    dgp = make_dgp(cfgs)
    b = dgp.sample_sequences(64, torch.Generator().manual_seed(0))
    assert b.x_ctx.shape == (2, 64, 16, 32) and b.x_q.shape == (2, 64, 32)
    assert b.z1.shape == (2, 64, 16, 7)
    assert set(b.z1[0, ..., :3].unique().tolist()) == {-1.0, 1.0}
    assert (b.z1[0, ..., 3:] == 0).all() and (b.z2[1, ..., 3:] == 0).all()
    # no binary distractor duplicates the target's latents
    t = b.target[0]
    rows = torch.arange(64)
    same = (b.z1[0] == b.z1[0, rows, t][:, None]).all(-1) & (
        b.z2[0] == b.z2[0, rows, t][:, None]
    ).all(-1)
    assert (same.sum(-1) == 1).all()
    with pytest.raises(ValueError, match="factor"):
        dgp.sample_contrast("z3", 10, torch.Generator())


def test_contrast_sampling_holds_the_other_factor_fixed():
    cfg = ToyConfig("binary", 3, 4, noise=0.0)
    dgp = make_dgp(cfg)
    g = torch.Generator().manual_seed(1)
    cb = dgp.sample_contrast("z1", 2000, g)
    E = dgp.E[0]
    # remove the payload: nearest payload embedding explains the residual exactly
    A1, A2 = dgp.A1[0, :, :3], dgp.A2[0, :, :4]
    lat = torch.linalg.pinv(torch.cat([A1, A2, E.T], 1))
    cp, cn = cb.x_pos[0] @ lat.T, cb.x_neg[0] @ lat.T  # [n, 3 + 4 + P] coefficients
    cq = cb.x_q[0] @ torch.linalg.pinv(torch.cat([dgp.B1[0, :, :3], dgp.B2[0, :, :4]], 1)).T
    torch.testing.assert_close(cp[:, :3], cq[:, :3], atol=1e-4, rtol=0)  # positive shares z1
    torch.testing.assert_close(cp[:, 3:7], cn[:, 3:7], atol=1e-4, rtol=0)  # z2 shared by the pair
    assert (cn[:, :3] - cq[:, :3]).abs().max() > 1  # negative z1 is fresh


def test_training_reaches_accuracy(trained):
    assert float(trained.val_accuracy[0]) >= 0.95
    assert float(trained.attn_on_target[0]) > 0.9


def test_analytic_agreement_and_rank(trained):
    for f, rank in (("z1", 3), ("z2", 5)):
        acc = estimate_deltas(trained.model, trained.dgp, f, n=50_000)[0]
        ana = analytic_deltas(trained.model, trained.dgp, f)[0]
        assert relative_error(acc.delta(), ana) < 0.05
        est, exact = feature_subspace(acc.delta()), feature_subspace(ana)
        assert est.rank == exact.rank == rank
        assert principal_angles(est.query_basis, exact.query_basis).max() < 0.1
        assert principal_angles(est.key_basis, exact.key_basis).max() < 0.1
        # analytic column space is span(W_Q B1)
        B = trained.dgp.B1[0, :, :3] if f == "z1" else trained.dgp.B2[0, :, :5]
        span = orthonormalize(trained.model.W_Q[0].detach().double() @ B.double())
        assert principal_angles(exact.query_basis, span).max() < 1e-6


def test_estimation_error_shrinks_like_inverse_sqrt_n(trained):
    ana = analytic_deltas(trained.model, trained.dgp, "z1")[0]

    def err(n: int) -> float:
        vals = [
            relative_error(
                estimate_deltas(trained.model, trained.dgp, "z1", n=n, seed=s)[0].delta(), ana
            )
            for s in range(4)
        ]
        return math.sqrt(sum(v * v for v in vals) / len(vals))  # RMS over seeds

    ratio = err(4_000) / err(64_000)
    assert 4 * 0.75 < ratio < 4 * 1.25, ratio  # √16 = 4


def test_gaussian_cell_trains_and_matches_analytic(trained_gaussian):
    assert float(trained_gaussian.val_accuracy[0]) >= 0.95
    for f in ("z1", "z2"):
        acc = estimate_deltas(trained_gaussian.model, trained_gaussian.dgp, f, n=50_000)[0]
        ana = analytic_deltas(trained_gaussian.model, trained_gaussian.dgp, f)[0]
        assert relative_error(acc.delta(), ana) < 0.05
        assert feature_subspace(acc.delta()).rank == 3


def test_batched_training_matches_cells():
    cfgs = [
        ToyConfig("binary", 3, 3),
        ToyConfig("gaussian", 3, 3),
        ToyConfig("gaussian", 3, 3, latent_norm="raw"),
    ]
    res = train_cells(cfgs, TrainConfig(max_steps=20, min_steps=20), progress=False)
    assert res.model.W_Q.shape == (3, 16, 32)
    assert res.oracle_accuracy[0] == 1.0 and res.oracle_accuracy[1] == 1.0
    assert res.oracle_accuracy[2] < 1.0


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "toy"
    rc = main(
        [
            "toy",
            "all",
            "--out",
            str(out),
            "--variants",
            "binary",
            "--n-values",
            "3",
            "--m-values",
            "3",
            "--n-pairs",
            "5000",
            "--n-random",
            "3",
            "--n-sequences",
            "200",
            "--quiet",
        ]
    )
    assert rc == 0
    rows = json.loads((out / "ranks" / "ranks.json").read_text())
    assert len(rows) == 1
    required = {
        "variant",
        "latent_norm",
        "N",
        "M",
        "d_head",
        "rank_z1",
        "rank_z2",
        "val_accuracy",
        "analytic_rel_err_z1",
        "analytic_rel_err_z2",
    }
    assert required <= set(rows[0])
    assert rows[0]["rank_z1"] == 3 and rows[0]["rank_z2"] == 3
    for sub, files in {
        "ranks": ["fig2_ranks.png", "ranks_deltas.safetensors", "ranks_models.safetensors"],
        "projections": [
            "fig3_projections.png",
            "fig3_projections.scatter.json",
            "projections.safetensors",
        ],
        "swap": ["fig4_swap.png", "swap.json"],
        "interaction": ["fig5_interaction.png", "interaction.safetensors"],
    }.items():
        section = json.loads((out / sub / "section.json").read_text())
        for entry in section["figures"] + section.get("scatter", []):
            assert (out / sub / entry["file"]).is_file()
        for name in files:
            assert (out / sub / name).stat().st_size > 0
    swap = json.loads((out / "swap" / "swap.json").read_text())
    both = next(r for r in swap["rows"] if r["condition"] == r["subspace"] == "z1+z2")
    assert both["attn_target_after"] > 0.8 * both["attn_orig_before"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exact_ranks"] == 1
    manifest = verify_run_folder(out)  # one complete run, every file listed
    assert "ranks/ranks.json" in {f["path"] for f in manifest["files"]}


def test_cli_bad_input_exit_code(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["toy", "ranks", "--out", "unused", "--variants", "ternary"]) == 2
    assert "variant" in capsys.readouterr().err
    assert main(["toy", "ranks", "--out", "unused", "--latent-norm", "unit"]) == 2
    assert "latent_norm" in capsys.readouterr().err
    assert main(["toy", "swap", "--out", "unused", "--energy", "1.5"]) == 2
    assert main(["toy", "projections", "--out", "unused", "--N", "0"]) == 2
    assert not (tmp_path / "unused").exists()  # a refused run leaves no output folder

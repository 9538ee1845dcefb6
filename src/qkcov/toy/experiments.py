"""Toy experiments (paper Fig. 2–5): each writes JSON + safetensors artifacts, then figures
drawn from those artifacts (:mod:`qkcov.report.figures.toy`) and a report ``section.json``.

- :func:`run_ranks` — rank recovery over a grid of (variant, N, M) cells, trained batched.
- :func:`run_projections` — q / target-k projected onto the z1 and z2 subspaces.
- :func:`run_swap` — causal key swaps inside the key subspaces vs random subspaces.
- :func:`run_interaction` — latent interaction matrix ``G = (W_Q B)ᵀ (W_K A)``.
- :func:`run_toy_all` / :func:`run_toy_demo` — all four (full / quick).

Each function writes into the folder it is given and nothing else; a caller that wants one
complete run per output folder wraps it in :class:`qkcov.artifacts.RunFolder` and passes the
staging folder (as ``qkcov toy`` does). Artifacts store only paths relative to that folder,
so the staged files stay valid after the rename.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..artifacts import load_tensors, read_tensor_metadata, save_tensors, write_json
from ..config import check_positive_int, check_range
from ..core.intervention import attention_weights, swap_in_subspace, swap_metrics
from ..core.subspace import FeatureSubspace, feature_subspace, random_orthonormal, union_basis
from .analytic import (
    DEFAULT_N_PAIRS,
    analytic_deltas,
    estimate_deltas,
    interaction_matrix,
    relative_error,
)
from .data import VARIANTS, ToyConfig, ToyDGP, check_variant, make_dgp
from .model import ToyModel, TrainConfig, TrainResult, train_cells

__all__ = [
    "grid_configs",
    "save_trained",
    "load_trained",
    "cell_subspaces",
    "run_ranks",
    "run_projections",
    "run_swap",
    "run_interaction",
    "run_toy_all",
    "run_toy_demo",
    "SWAP_CONDITIONS",
]

SWAP_CONDITIONS = ("z1", "z2", "z1+z2")
DEFAULT_VALUES = (3, 5, 7)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[toy] {msg}", flush=True)


def grid_configs(
    variants: Sequence[str] = VARIANTS,
    n_values: Sequence[int] = DEFAULT_VALUES,
    m_values: Sequence[int] = DEFAULT_VALUES,
    seed: int = 0,
    **overrides: Any,
) -> list[ToyConfig]:
    """One :class:`ToyConfig` per (variant, N, M) cell."""
    if not variants or not n_values or not m_values:
        raise ValueError("variants, n_values and m_values must each name at least one value")
    for v in variants:
        check_variant(v)
    return [
        ToyConfig(variant=v, n_z1=int(n), n_z2=int(m), seed=seed, **overrides)
        for v in variants
        for n in n_values
        for m in m_values
    ]


# ------------------------------------------------------------------ persistence
def save_trained(path: str | Path, result: TrainResult) -> Path:
    """Stacked weights + DGP maps of every cell (safetensors; configs in the metadata)."""
    tensors = {f"model.{n}": p.detach() for n, p in result.model.named_parameters()}
    tensors.update({f"dgp.{n}": t for n, t in result.dgp.tensors().items()})
    meta = {
        "configs": [c.to_dict() for c in result.dgp.configs],
        "train_config": result.train_config.to_dict(),
        "val_accuracy": result.val_accuracy,
        "steps": result.steps,
    }
    return save_tensors(path, tensors, meta)


def load_trained(path: str | Path) -> tuple[ToyModel, ToyDGP]:
    """Rebuild ``(model, dgp)`` saved by :func:`save_trained`."""
    meta = read_tensor_metadata(path)
    tensors = load_tensors(path)
    configs = [ToyConfig.from_dict(c) for c in meta["configs"]]
    model, dgp = ToyModel(configs), make_dgp(configs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(tensors[f"model.{n}"])
    for n in dgp.tensors():
        setattr(dgp, n, tensors[f"dgp.{n}"])
    return model, dgp


def cell_subspaces(
    result: TrainResult, n_pairs: int = DEFAULT_N_PAIRS, energy: float = 0.99, seed: int = 0
) -> dict[str, Any]:
    """Sampled and analytic ΔC(z1), ΔC(z2) of every cell, with their subspaces.

    Returns ``{"delta": {f: [K, H, H]}, "analytic": {f: [K, H, H]}, "subspaces": {f: [FeatureSubspace]},
    "rel_err": {f: [K]}}`` for ``f`` in ``("z1", "z2")``.
    """
    check_range("energy", energy, 0.0, 1.0, low_open=True)
    out: dict[str, Any] = {"delta": {}, "analytic": {}, "subspaces": {}, "rel_err": {}}
    for i, f in enumerate(("z1", "z2")):
        accs = estimate_deltas(result.model, result.dgp, f, n=n_pairs, seed=seed + i)
        delta = torch.stack([a.delta() for a in accs])
        ana = analytic_deltas(result.model, result.dgp, f)
        out["delta"][f] = delta
        out["analytic"][f] = ana
        out["subspaces"][f] = [feature_subspace(d, energy) for d in delta]
        out["rel_err"][f] = [relative_error(d, a) for d, a in zip(delta, ana, strict=True)]
    return out


def _write_section(out_dir: Path, **kwargs: Any) -> None:
    from ..report import write_section

    write_section(out_dir, **kwargs)


# ------------------------------------------------------------------ Fig. 2
def run_ranks(
    out_dir: str | Path,
    configs: Sequence[ToyConfig] | None = None,
    train_config: TrainConfig | None = None,
    n_pairs: int = DEFAULT_N_PAIRS,
    energy: float = 0.99,
    progress: bool = True,
    result: TrainResult | None = None,
) -> list[dict[str, Any]]:
    """Train every cell (batched), estimate ΔC(z1), ΔC(z2), record recovered ranks.

    Writes ``ranks.json`` (one row per cell), ``ranks_deltas.safetensors``,
    ``ranks_models.safetensors``, ``fig2_ranks.png`` and ``section.json``. Returns the rows.
    """
    out = Path(out_dir)
    _check_common(n_pairs, energy)
    if result is None:
        configs = list(configs) if configs is not None else grid_configs()
        _log(progress, f"training {len(configs)} cell(s) batched")
        result = train_cells(configs, train_config, progress=progress)
    configs = result.dgp.configs
    _log(progress, f"trained in {result.seconds:.1f}s; estimating ΔC from {n_pairs} pairs/cell")
    t0 = time.perf_counter()
    sub = cell_subspaces(result, n_pairs=n_pairs, energy=energy)
    est_seconds = time.perf_counter() - t0
    rows = []
    for i, c in enumerate(configs):
        s1, s2 = sub["subspaces"]["z1"][i], sub["subspaces"]["z2"][i]
        rows.append(
            {
                "variant": c.variant,
                "latent_norm": c.latent_norm,
                "N": c.n_z1,
                "M": c.n_z2,
                "d_head": c.d_head,
                "rank_z1": s1.rank,
                "rank_z2": s2.rank,
                "val_accuracy": float(result.val_accuracy[i]),
                "analytic_rel_err_z1": sub["rel_err"]["z1"][i],
                "analytic_rel_err_z2": sub["rel_err"]["z2"][i],
                "oracle_accuracy": float(result.oracle_accuracy[i]),
                "attn_on_target": float(result.attn_on_target[i]),
                "steps": int(result.steps[i]),
                "stop_reason": result.stop_reason[i],
                "energy": energy,
                "n_pairs": n_pairs,
                "energy_curve_z1": s1.energy_curve.tolist(),
                "energy_curve_z2": s2.energy_curve.tolist(),
                "seed": c.seed,
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ranks.json", rows)
    save_tensors(
        out / "ranks_deltas.safetensors",
        {
            "delta_z1": sub["delta"]["z1"],
            "delta_z2": sub["delta"]["z2"],
            "analytic_z1": sub["analytic"]["z1"],
            "analytic_z2": sub["analytic"]["z2"],
        },
        {"cells": [c.to_dict() for c in configs], "n_pairs": n_pairs, "energy": energy},
    )
    save_trained(out / "ranks_models.safetensors", result)
    write_json(
        out / "ranks_meta.json",
        {
            "train_seconds": result.seconds,
            "estimate_seconds": est_seconds,
            "train_config": result.train_config.to_dict(),
        },
    )
    from ..report.figures.toy import plot_ranks

    figs = plot_ranks(out)
    exact = sum(r["rank_z1"] == r["N"] and r["rank_z2"] == r["M"] for r in rows)
    _write_section(
        out,
        key="toy_ranks",
        title="Toy model: rank recovery (Fig. 2)",
        order=10,
        summary={
            "cells": len(rows),
            "exact_ranks": exact,
            "min_val_accuracy": min(r["val_accuracy"] for r in rows),
            "max_analytic_rel_err": max(
                max(r["analytic_rel_err_z1"], r["analytic_rel_err_z2"]) for r in rows
            ),
            "train_seconds": round(result.seconds, 1),
        },
        text=[
            "An attention-only head is trained per cell to retrieve the payload of the context "
            "token whose latents (z1, z2) match the query's. ΔC(z1), ΔC(z2) are estimated from "
            f"{n_pairs} contrast pairs per cell; the rank is the smallest r reaching "
            f"{energy:.0%} of the squared singular-value energy. The analytic prediction is "
            "rank N for z1 and M for z2.",
            "With raw Gaussian latents z ~ N(0, I) no dot-product head can reach 100%: a "
            "distractor with a larger latent norm out-scores the target under any bilinear "
            "match (ceiling 'oracle_accuracy', the ideal matcher argmax_i z*·z_i). Gaussian "
            "cells therefore use latent_norm='sphere' by default, rescaling each z to norm "
            "√dim so the target is the unique maximiser, while E[zzᵀ] = I and hence the "
            "analytic ΔC are unchanged.",
        ],
        tables=[
            {
                "caption": "Recovered ranks, accuracy and analytic agreement per cell",
                "columns": [
                    "variant",
                    "N",
                    "M",
                    "rank_z1",
                    "rank_z2",
                    "val_accuracy",
                    "oracle_accuracy",
                    "rel_err_z1",
                    "rel_err_z2",
                    "steps",
                ],
                "rows": [
                    [
                        r["variant"],
                        r["N"],
                        r["M"],
                        r["rank_z1"],
                        r["rank_z2"],
                        round(r["val_accuracy"], 4),
                        round(r["oracle_accuracy"], 4),
                        round(r["analytic_rel_err_z1"], 4),
                        round(r["analytic_rel_err_z2"], 4),
                        r["steps"],
                    ]
                    for r in rows
                ],
            }
        ],
        figures=figs,
    )
    return rows


# ------------------------------------------------------------------ helpers for one cell
def _single_cell(
    config: ToyConfig | None,
    result: TrainResult | None,
    cell: int | None,
    train_config: TrainConfig | None,
    progress: bool,
) -> tuple[ToyModel, ToyDGP, ToyConfig]:
    """``(model, dgp)`` restricted to one cell: from ``result`` if given, else trained now."""
    if result is None:
        config = config or ToyConfig()
        _log(progress, f"training cell {config.name}")
        result = train_cells([config], train_config, progress=progress)
        cell = 0
    elif cell is None:
        if config is None:
            cell = 0
        else:
            key = (config.variant, config.latent_norm, config.n_z1, config.n_z2)
            matches = [
                i
                for i, c in enumerate(result.dgp.configs)
                if (c.variant, c.latent_norm, c.n_z1, c.n_z2) == key
            ]
            if not matches:
                raise ValueError(f"no cell {config.name} among the trained cells")
            cell = matches[0]
    model = ToyModel([result.dgp.configs[cell]])
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(getattr(result.model, n)[cell : cell + 1])
    return model, result.dgp.select([cell]), result.dgp.configs[cell]


def _check_common(n_pairs: int, energy: float) -> None:
    check_positive_int("n_pairs", n_pairs)
    check_range("energy", energy, 0.0, 1.0, low_open=True)


@torch.no_grad()
def _one_cell_subspaces(
    model: ToyModel, dgp: ToyDGP, n_pairs: int, energy: float, seed: int = 0
) -> dict[str, FeatureSubspace]:
    subs = {}
    for i, f in enumerate(("z1", "z2")):
        acc = estimate_deltas(model, dgp, f, n=n_pairs, seed=seed + i)[0]
        subs[f] = feature_subspace(acc.delta(), energy)
    return subs


# ------------------------------------------------------------------ Fig. 3
def run_projections(
    out_dir: str | Path,
    config: ToyConfig | None = None,
    result: TrainResult | None = None,
    cell: int | None = None,
    n_points: int = 2000,
    n_pairs: int = DEFAULT_N_PAIRS,
    energy: float = 0.99,
    train_config: TrainConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Project queries and their target keys onto the z1 / z2 subspaces of one cell.

    Writes ``projections.safetensors`` (``q_z1 [n, r1]``, ``k_z1 [n, r1]``, ``q_z2``, ``k_z2``,
    ``z1 [n, N]``, ``z2 [n, M]``), ``projections.json``, ``fig3_projections.png``,
    ``fig3_projections.plotly.json`` and ``section.json``.
    """
    check_positive_int("n_points", n_points)
    _check_common(n_pairs, energy)
    out = Path(out_dir)
    model, dgp, cfg = _single_cell(config, result, cell, train_config, progress)
    subs = _one_cell_subspaces(model, dgp, n_pairs, energy, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    z1, z2 = dgp.sample_latents((n_points,), gen)
    payload = dgp.random_payload((n_points,), gen)
    with torch.no_grad():
        q = model.queries(dgp.encode_query(z1, z2, gen))[0].double()  # [n, H]
        k = model.keys(dgp.encode_keys(z1, z2, payload, gen))[0].double()
    tensors = {
        "q_z1": q @ subs["z1"].query_basis,
        "k_z1": k @ subs["z1"].key_basis,
        "q_z2": q @ subs["z2"].query_basis,
        "k_z2": k @ subs["z2"].key_basis,
        "z1": z1[0, :, : cfg.n_z1],
        "z2": z2[0, :, : cfg.n_z2],
    }
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "projections.safetensors", tensors, {"config": cfg.to_dict()})
    info = {
        "config": cfg.to_dict(),
        "rank_z1": subs["z1"].rank,
        "rank_z2": subs["z2"].rank,
        "n_points": n_points,
        "energy": energy,
    }
    write_json(out / "projections.json", info)
    from ..report.figures.toy import plot_projections

    figs, inter = plot_projections(out)
    _write_section(
        out,
        key="toy_projections",
        title="Toy model: projections onto the feature subspaces (Fig. 3)",
        order=11,
        summary={k: info[k] for k in ("rank_z1", "rank_z2", "n_points")} | {"cell": cfg.name},
        text=[
            "Queries (W_Q x_q) and their target keys (W_K x_i*) projected onto the query/key "
            "bases of ΔC(z1) and ΔC(z2), first three coordinates. With binary latents the "
            "points sit at the vertices of a hypercube, one vertex per latent value; key means "
            "are joined along hypercube edges (latent values differing in one coordinate).",
        ],
        figures=figs,
        scatter=inter,
    )
    return info


# ------------------------------------------------------------------ Fig. 4
@torch.no_grad()
def _swap_sequences(
    dgp: ToyDGP, model: ToyModel, condition: str, n: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences where key ``i_target`` differs from the query in ``condition``'s latents only.

    Returns ``q [n, H]``, ``k [n, C, H]``, ``i_orig [n]`` (true target) and ``i_target [n]``.
    """
    b = dgp.sample_sequences(n, gen)
    C, L = dgp.context, dgp.L
    i_orig = b.target[0]
    i_tgt = (i_orig + torch.randint(1, C, (n,), generator=gen)) % C
    rows = torch.arange(n)
    z1, z2 = b.z1[0].clone(), b.z2[0].clone()  # [n, C, L]
    zs1, zs2 = z1[rows, i_orig], z2[rows, i_orig]  # query latents
    f1, f2 = dgp.sample_latents((n,), gen)
    f1, f2 = f1[0], f2[0]
    first = torch.zeros(L)
    first[0] = 1.0
    # a fresh binary value may equal the query's: flip its first coordinate then
    f1 = torch.where((f1 == zs1).all(-1, keepdim=True), f1 * (1 - 2 * first), f1)
    f2 = torch.where((f2 == zs2).all(-1, keepdim=True), f2 * (1 - 2 * first), f2)
    z1[rows, i_tgt] = f1 if condition in ("z1", "z1+z2") else zs1
    z2[rows, i_tgt] = f2 if condition in ("z2", "z1+z2") else zs2
    x_ctx = dgp.encode_keys(z1[None], z2[None], b.payload, gen)
    x_q = dgp.encode_query(zs1[None], zs2[None], gen)
    return model.queries(x_q)[0].double(), model.keys(x_ctx)[0].double(), i_orig, i_tgt


def _swap_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    i_orig: torch.Tensor,
    i_tgt: torch.Tensor,
    basis: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention ``[n, C]`` before and after swapping keys ``i_orig``/``i_tgt`` inside ``basis``."""
    before = attention_weights(q[:, None, :], k)[:, 0]
    if basis is None:
        return before, before
    rows = torch.arange(k.shape[0])
    ka, kb = swap_in_subspace(k[rows, i_orig], k[rows, i_tgt], basis)
    k2 = k.clone()
    k2[rows, i_orig], k2[rows, i_tgt] = ka, kb
    return before, attention_weights(q[:, None, :], k2)[:, 0]


def run_swap(
    out_dir: str | Path,
    config: ToyConfig | None = None,
    result: TrainResult | None = None,
    cell: int | None = None,
    n_sequences: int = 2000,
    n_random: int = 20,
    n_pairs: int = DEFAULT_N_PAIRS,
    energy: float = 0.99,
    train_config: TrainConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Key-swap interventions in the z1, z2, z1+z2 key subspaces vs null and random subspaces.

    For each condition ("z1": i_target matches the query on z2 only; "z2": on z1 only;
    "z1+z2": on neither) swaps keys i_orig (true target) and i_target inside each subspace and
    records mean attention on both. Random subspaces have the rank of the condition's own
    subspace; ``n_random`` draws give a mean and std. Writes ``swap.json``,
    ``fig4_swap.png`` and ``section.json``.
    """
    check_positive_int("n_sequences", n_sequences)
    check_positive_int("n_random", n_random)
    _check_common(n_pairs, energy)
    out = Path(out_dir)
    model, dgp, cfg = _single_cell(config, result, cell, train_config, progress)
    subs = _one_cell_subspaces(model, dgp, n_pairs, energy, seed)
    bases = {
        "z1": subs["z1"].key_basis,
        "z2": subs["z2"].key_basis,
        "z1+z2": union_basis([subs["z1"].key_basis, subs["z2"].key_basis]),
    }
    H = model.d_head
    gen = torch.Generator().manual_seed(seed + 11)
    rows: list[dict[str, Any]] = []
    keys = (
        "attn_orig_before",
        "attn_target_before",
        "attn_orig_after",
        "attn_target_after",
        "flip_all",
    )
    for ci, condition in enumerate(SWAP_CONDITIONS):
        q, k, i_o, i_t = _swap_sequences(dgp, model, condition, n_sequences, gen)
        for name in ("null", "z1", "z2", "z1+z2"):
            basis = None if name == "null" else bases[name]
            m = swap_metrics(*_swap_attention(q, k, i_o, i_t, basis), i_o, i_t)
            rank = 0 if basis is None else basis.shape[1]
            rows.append(
                {"condition": condition, "subspace": name, "rank": rank, "n_draws": 1}
                | {key: m[key] for key in keys}
                | {f"{key}_std": 0.0 for key in keys}
            )
        rank = bases[condition].shape[1]
        draws = []
        for j in range(n_random):
            basis = random_orthonormal(H, rank, seed=seed * 1000 + ci * 100 + j)
            draws.append(swap_metrics(*_swap_attention(q, k, i_o, i_t, basis), i_o, i_t))
        stats = {key: torch.tensor([d[key] for d in draws]) for key in keys}
        rows.append(
            {"condition": condition, "subspace": "random", "rank": rank, "n_draws": n_random}
            | {key: float(v.mean()) for key, v in stats.items()}
            | {f"{key}_std": float(v.std()) for key, v in stats.items()}
        )
    info = {
        "config": cfg.to_dict(),
        "rank_z1": subs["z1"].rank,
        "rank_z2": subs["z2"].rank,
        "n_sequences": n_sequences,
        "n_random": n_random,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "swap.json", info)
    from ..report.figures.toy import plot_swap

    figs = plot_swap(out)
    own = {r["condition"]: r for r in rows if r["subspace"] == r["condition"]}
    rnd = {r["condition"]: r for r in rows if r["subspace"] == "random"}
    summary = {
        "cell": cfg.name,
        "both_attn_orig_before": own["z1+z2"]["attn_orig_before"],
        "both_attn_target_after": own["z1+z2"]["attn_target_after"],
        "random_attn_target_after": rnd["z1+z2"]["attn_target_after"],
    }
    _write_section(
        out,
        key="toy_swap",
        title="Toy model: key swaps inside the feature subspaces (Fig. 4)",
        order=12,
        summary=summary,
        text=[
            "For each sequence the true target key i_orig and another key i_target (built to "
            "differ from the query in z1 only, z2 only, or both) exchange their coordinates "
            "inside a key subspace. Bars show mean attention on i_orig and i_target after the "
            "swap; 'random' is a random orthonormal subspace of the same rank "
            f"(mean ± std over {n_random} draws).",
        ],
        tables=[
            {
                "caption": "Mean attention after the swap",
                "columns": [
                    "condition",
                    "subspace",
                    "rank",
                    "attn_orig_after",
                    "attn_target_after",
                    "flip_all",
                ],
                "rows": [
                    [
                        r["condition"],
                        r["subspace"],
                        r["rank"],
                        round(r["attn_orig_after"], 4),
                        round(r["attn_target_after"], 4),
                        round(r["flip_all"], 4),
                    ]
                    for r in rows
                ],
            }
        ],
        figures=figs,
    )
    return info


# ------------------------------------------------------------------ Fig. 5
def run_interaction(
    out_dir: str | Path,
    config: ToyConfig | None = None,
    result: TrainResult | None = None,
    cell: int | None = None,
    train_config: TrainConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Latent interaction matrix ``G = (W_Q B)ᵀ (W_K A)`` ``[N+M, N+M]`` of one cell.

    Writes ``interaction.safetensors`` (``G``), ``interaction.json`` (G and block energies),
    ``fig5_interaction.png`` and ``section.json``.
    """
    out = Path(out_dir)
    model, dgp, cfg = _single_cell(config, result, cell, train_config, progress)
    with torch.no_grad():
        G = interaction_matrix(model, dgp, 0)
    N = cfg.n_z1
    blocks = {
        "z1_z1": G[:N, :N],
        "z1_z2": G[:N, N:],
        "z2_z1": G[N:, :N],
        "z2_z2": G[N:, N:],
    }
    energy = {k: float((v**2).sum()) for k, v in blocks.items()}
    total = sum(energy.values())
    off = (energy["z1_z2"] + energy["z2_z1"]) / total
    diag = torch.diagonal(G)
    info = {
        "config": cfg.to_dict(),
        "G": G,
        "block_energy": energy,
        "off_block_fraction": off,
        "diag_fraction": float((diag**2).sum() / total),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "interaction.safetensors", {"G": G}, {"config": cfg.to_dict()})
    write_json(out / "interaction.json", info)
    from ..report.figures.toy import plot_interaction

    figs = plot_interaction(out)
    _write_section(
        out,
        key="toy_interaction",
        title="Toy model: latent interaction matrix (Fig. 5)",
        order=13,
        summary={
            "cell": cfg.name,
            "off_block_fraction": off,
            "diag_fraction": info["diag_fraction"],
        },
        text=[
            "G = (W_Q B)ᵀ (W_K A) with B = [B1 B2], A = [A1 A2]: entry (a, b) is the logit "
            "contribution of query latent a times key latent b. A block-diagonal G means z1 "
            "only interacts with z1 and z2 with z2; 'off_block_fraction' is the squared "
            "energy outside the diagonal blocks.",
        ],
        figures=figs,
    )
    return info


# ------------------------------------------------------------------ all / demo
def run_toy_all(
    out_dir: str | Path,
    configs: Sequence[ToyConfig] | None = None,
    focus: ToyConfig | None = None,
    train_config: TrainConfig | None = None,
    n_pairs: int = DEFAULT_N_PAIRS,
    energy: float = 0.99,
    n_random: int = 20,
    n_sequences: int = 2000,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the grid once and run all four experiments into ``out_dir/{ranks,projections,swap,interaction}``.

    ``focus`` picks the grid cell used for Fig. 3–5 (default binary N=3, M=3, or the first cell).
    """
    out = Path(out_dir)
    _check_common(n_pairs, energy)
    check_positive_int("n_random", n_random)
    check_positive_int("n_sequences", n_sequences)
    t0 = time.perf_counter()
    configs = list(configs) if configs is not None else grid_configs()
    result = train_cells(configs, train_config, progress=progress)
    rows = run_ranks(
        out / "ranks", n_pairs=n_pairs, energy=energy, progress=progress, result=result
    )
    focus = focus or next(
        (c for c in configs if (c.variant, c.n_z1, c.n_z2) == ("binary", 3, 3)), configs[0]
    )
    kw: dict[str, Any] = {"config": focus, "result": result, "progress": progress}
    _log(progress, f"projections / swap / interaction on cell {focus.name}")
    proj = run_projections(out / "projections", n_pairs=n_pairs, energy=energy, **kw)
    swap = run_swap(
        out / "swap",
        n_pairs=n_pairs,
        energy=energy,
        n_random=n_random,
        n_sequences=n_sequences,
        **kw,
    )
    inter = run_interaction(out / "interaction", **kw)
    own = {r["condition"]: r for r in swap["rows"] if r["subspace"] == r["condition"]}
    rnd = {r["condition"]: r for r in swap["rows"] if r["subspace"] == "random"}
    summary = {
        "cells": len(rows),
        "exact_ranks": sum(r["rank_z1"] == r["N"] and r["rank_z2"] == r["M"] for r in rows),
        "min_val_accuracy": round(min(r["val_accuracy"] for r in rows), 4),
        "max_analytic_rel_err": round(
            max(max(r["analytic_rel_err_z1"], r["analytic_rel_err_z2"]) for r in rows), 4
        ),
        "projection_ranks": [proj["rank_z1"], proj["rank_z2"]],
        "swap_z1+z2_attn_orig_before": round(own["z1+z2"]["attn_orig_before"], 4),
        "swap_z1+z2_attn_target_after": round(own["z1+z2"]["attn_target_after"], 4),
        "swap_random_attn_target_after": round(rnd["z1+z2"]["attn_target_after"], 4),
        "interaction_off_block_fraction": round(inter["off_block_fraction"], 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "summary.json", summary)
    return summary


def run_toy_demo(out_dir: str | Path, quick: bool = True, progress: bool = True) -> dict[str, Any]:
    """All four toy experiments; ``quick`` uses 4 grid cells and fewer samples (~half a minute).

    The quick run uses 30k contrast pairs per cell (sampling error ~3%, inside the 5% bound).
    """
    if not quick:
        return run_toy_all(out_dir, progress=progress)
    configs = [
        ToyConfig(variant="binary", n_z1=3, n_z2=3),
        ToyConfig(variant="binary", n_z1=5, n_z2=7),
        ToyConfig(variant="gaussian", n_z1=3, n_z2=5),
        ToyConfig(variant="gaussian", n_z1=7, n_z2=7),
    ]
    return run_toy_all(
        out_dir, configs=configs, n_pairs=30_000, n_random=10, n_sequences=1000, progress=progress
    )

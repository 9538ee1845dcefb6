"""Step: held-out keys/queries on each feature's top-3 directions and nearest-centroid group
accuracy against random 3-D subspaces and PCA."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...core.projection import nearest_centroid_accuracy, pca_basis, project
from ...core.subspace import random_orthonormal, top_directions
from ...results import FeatureResult, ProjectionResult
from ...runtime import sub_seed
from ..config import PROJ_DIMS, RunConfig


def _projection(
    feature: FeatureResult,
    train: Any,
    test: Any,
    train_groups: list[str],
    test_groups: list[str],
    cfg: RunConfig,
    seed: int,
) -> ProjectionResult:
    """Held-out vectors on the feature's top-3 directions (+ group accuracy with ≥ 2 groups)."""
    pooled = feature.pooled
    D = test.keys.shape[1]
    kdir = feature.union_key if feature.union_key is not None else pooled.key_basis
    qdir = feature.union_query if feature.union_query is not None else pooled.query_basis
    kb = top_directions(kdir, PROJ_DIMS, seed)
    qb = top_directions(qdir, PROJ_DIMS, seed + 1)
    key_labels = [
        test_groups[int(r)] if p else ""
        for r, p in zip(test.key_record, test.key_positive, strict=True)
    ]
    query_labels = list(test_groups)
    accuracy = None
    groups = sorted({g for g in test_groups if g})
    if len(groups) > 1 and train is not None:
        tr = [i for i, p in enumerate(train.key_positive.tolist()) if p]
        te = [i for i, p in enumerate(test.key_positive.tolist()) if p]
        ytr = [train_groups[int(train.key_record[i])] for i in tr]
        yte = [key_labels[i] for i in te]
        xtr, xte = train.keys[tr].double(), test.keys[te].double()

        def acc(basis: torch.Tensor) -> float:
            return nearest_centroid_accuracy(project(xtr, basis), ytr, project(xte, basis), yte)

        rand = torch.tensor(
            [
                acc(random_orthonormal(D, PROJ_DIMS, seed=sub_seed(cfg.seed, "proj-random", d)))
                for d in range(cfg.n_random)
            ],
            dtype=torch.float64,
        )
        accuracy = {
            "subspace": acc(kb),
            "random": float(rand.mean()),
            "random_std": float(rand.std()),
            "pca": acc(pca_basis(xtr, PROJ_DIMS)),
            "chance": 1.0 / len(groups),
            "n_test": len(te),
        }
    return ProjectionResult(
        feature.name, project(test.keys.double(), kb).float(), project(test.q.double(), qb).float(),
        test.key_positive.clone(), key_labels, query_labels, accuracy,
    )  # fmt: skip


def _name_points(proj: ProjectionResult, tokenizer: Any, resolved: Sequence[Any]) -> None:
    """Hover names of the projected points: token and JSONL line (or record index), in the
    order :func:`qkcov.engine.contrast.collect_qk` stacks them (record order, key order)."""

    def where(r: Any) -> str:
        return f"line {r.record.line}" if r.record.line is not None else f"record {r.index}"

    keys = [
        f"{tokenizer.decode([r.input_ids[p]])!r} · {where(r)}"
        for r in resolved
        for p in r.key_positions
    ]
    queries = [f"{tokenizer.decode([r.input_ids[r.query]])!r} · {where(r)}" for r in resolved]
    if len(keys) == len(proj.key_labels) and len(queries) == len(proj.query_labels):
        proj.key_names, proj.query_names = keys, queries

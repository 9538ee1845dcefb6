"""The simplified setting (METHOD §3): a planted two-latent retrieval task, an
attention-only head trained on it (many cells at once), analytic vs sampled contrastive
covariances, and the toy experiments (paper Fig. 2–5).

Quick start::

    from qkcov.toy import ToyConfig, train_cells, estimate_deltas, analytic_deltas
    res = train_cells([ToyConfig("binary", n_z1=3, n_z2=5)])
    acc = estimate_deltas(res.model, res.dgp, "z1")[0]   # ContrastiveCovariance
    exact = analytic_deltas(res.model, res.dgp, "z1")[0]  # [d_head, d_head]
"""

from .analytic import (
    DEFAULT_N_PAIRS,
    analytic_delta,
    analytic_deltas,
    estimate_deltas,
    interaction_matrix,
    relative_error,
)
from .data import FACTORS, VARIANTS, ContrastBatch, ToyBatch, ToyConfig, ToyDGP, make_dgp
from .experiments import (
    grid_configs,
    load_trained,
    run_interaction,
    run_projections,
    run_ranks,
    run_swap,
    run_toy_all,
    run_toy_demo,
    save_trained,
)
from .model import ToyModel, TrainConfig, TrainResult, evaluate, train_cells

__all__ = [
    "DEFAULT_N_PAIRS",
    "FACTORS",
    "VARIANTS",
    "ContrastBatch",
    "ToyBatch",
    "ToyConfig",
    "ToyDGP",
    "ToyModel",
    "TrainConfig",
    "TrainResult",
    "analytic_delta",
    "analytic_deltas",
    "estimate_deltas",
    "evaluate",
    "grid_configs",
    "interaction_matrix",
    "load_trained",
    "make_dgp",
    "relative_error",
    "run_interaction",
    "run_projections",
    "run_ranks",
    "run_swap",
    "run_toy_all",
    "run_toy_demo",
    "save_trained",
    "train_cells",
]

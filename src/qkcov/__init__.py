"""qkcov: explain why an attention head attends where it does.

Contrastive query-key covariances ΔC = E[q k⁺ᵀ] − E[q k⁻ᵀ], their low-rank query/key
subspaces, causal key swaps inside those subspaces, and exact logit attribution.
"""

from .core.attribution import Attribution, attribute, sequential_bases
from .core.covariance import ContrastiveCovariance
from .core.intervention import attention_logits, attention_weights, swap_in_subspace, swap_metrics
from .core.subspace import (
    FeatureSubspace,
    feature_subspace,
    orthonormalize,
    principal_angles,
    random_orthonormal,
    rank_at_energy,
    union_basis,
    union_subspace,
)

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "ContrastiveCovariance",
    "FeatureSubspace",
    "attention_logits",
    "attention_weights",
    "attribute",
    "feature_subspace",
    "load_model",
    "orthonormalize",
    "principal_angles",
    "random_orthonormal",
    "rank_at_energy",
    "sequential_bases",
    "swap_in_subspace",
    "swap_metrics",
    "union_basis",
    "union_subspace",
]


def __getattr__(name: str):  # lazy: model code pulls in transformers
    if name == "load_model":
        from .models.loading import load_model

        return load_model
    raise AttributeError(f"module 'qkcov' has no attribute {name!r}")

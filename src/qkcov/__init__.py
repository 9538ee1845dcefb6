"""qkcov: explain why an attention head attends where it does.

Contrastive query-key covariances ΔC = E[q k⁺ᵀ] − E[q k⁻ᵀ], their low-rank query/key
subspaces, causal key swaps inside those subspaces, and exact logit attribution.
"""

# Everything is imported lazily (PEP 562) so that `import qkcov` / the CLI entry point is cheap
# and the CLI installs its Ctrl-C handling before torch or transformers are imported.
_LAZY = {
    "Attribution": "core.attribution",
    "attribute": "core.attribution",
    "sequential_bases": "core.attribution",
    "ContrastiveCovariance": "core.covariance",
    "attention_logits": "core.intervention",
    "attention_weights": "core.intervention",
    "swap_in_subspace": "core.intervention",
    "swap_metrics": "core.intervention",
    "FeatureSubspace": "core.subspace",
    "feature_subspace": "core.subspace",
    "orthonormalize": "core.subspace",
    "principal_angles": "core.subspace",
    "random_orthonormal": "core.subspace",
    "rank_at_energy": "core.subspace",
    "union_basis": "core.subspace",
    "union_subspace": "core.subspace",
    "load_model": "models.loading",  # pulls in transformers
    "analyze": "pipeline",
    "RunConfig": "pipeline",
    "AnalysisResult": "results",
    "HeadResult": "results",
    "Subspace": "export",
    "load_subspace": "export",
    "compare": "comparison",
    "explain_logits": "core.attribution",
    "RecordStats": "core.statistics",
    "permutation_null": "core.statistics",
    "significance": "core.statistics",
    "bootstrap": "core.statistics",
}

# Operations of a layer above qkcov.results that a result's own methods call
# (AnalysisResult.subspace / save / report): results.py imports no module above it, so it
# asks the package root, which loads the named module on first use (no import circle).
_OPERATIONS = {"subspace_from_result": "export", "save_run": "report.save"}

__version__ = "0.1.0"

__all__ = [
    "AnalysisResult",
    "HeadResult",
    "Subspace",
    "load_subspace",
    "compare",
    "RecordStats",
    "RunConfig",
    "analyze",
    "bootstrap",
    "explain_logits",
    "permutation_null",
    "significance",
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


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qkcov' has no attribute {name!r}")


def _operation(name: str):
    """``qkcov.results``' way to a higher layer's operation on a result (see _OPERATIONS)."""
    import importlib

    return getattr(importlib.import_module(f".{_OPERATIONS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

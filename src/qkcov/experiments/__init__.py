"""Experiment orchestration: records → scan → ΔC → subspaces → projections → swaps → artifacts."""

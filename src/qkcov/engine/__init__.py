"""Model-bound, experiment-agnostic engine: contrast (records → ΔC), scan (head ranking),
swaps (causal key swaps). Knows nothing of any one task."""

"""Torch-only math of the method; nothing here imports transformers or knows of models.

covariance (ΔC accumulators), subspace (SVD, ranks, unions, angles), intervention (offline
key swaps, attention recomputation, swap metrics), attribution (exact logit split),
projection (projections, nearest-centroid accuracy, PCA baseline), statistics (per-record
RecordStats, permutation null, parallel-analysis rank, bootstrap, swap CIs and p-values).
"""

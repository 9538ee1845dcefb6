"""Hooks that apply an exported :class:`qkcov.export.Subspace` through other libraries.

:mod:`.transformer_lens` (``pip install qkcov[tl]``) and :mod:`.nnsight`
(``pip install qkcov[nnsight]``); plain PyTorch / Hugging Face: :mod:`qkcov.models.apply`.
Neither library is imported by qkcov itself; these modules only build the edit functions.
"""

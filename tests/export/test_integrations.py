"""Exported swaps through TransformerLens and nnsight equal qkcov's own in-forward swap.

Skipped (one line) when the optional library is not installed (``pip install qkcov[tl]`` /
``qkcov[nnsight]``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qkcov.core.subspace import random_orthonormal
from qkcov.export import Subspace
from qkcov.models.apply import ablate, swap
from qkcov.models.loading import model_info
from qkcov.models.tiny import tiny_model, tiny_tokenizer

PROMPT = "The keys of the cabinet is here"
LAYER, HEAD, RANK, A, B = 1, 2, 3, 2, 9


def _subspace(model) -> Subspace:
    info = dataclasses.asdict(model_info(model))
    D = info["head_dim"]
    return Subspace(
        layer=LAYER, head=HEAD, feature="planted", group="pooled",
        query_directions=random_orthonormal(D, D, seed=1), key_directions=random_orthonormal(D, D, seed=2),
        singular_values=torch.linspace(1, 0, D, dtype=torch.float64), rank=RANK, rank_rule="fixed",
        ranks={"causal": None, "null": None, "energy": RANK}, model=info["architecture"], model_info=info,
    )  # fmt: skip


def _qkcov_attention(arch, edit, *args):
    """qkcov's own in-forward edit: the head's [S_q, S_k] attention, and the baseline's."""
    model, tok = tiny_model(arch, attn_implementation="eager"), tiny_tokenizer()
    ids = tok([PROMPT], return_tensors="pt").input_ids
    sub = _subspace(model)
    with edit(model, sub, *args) as e:
        model(input_ids=ids, use_cache=False)
    return sub, ids, e.attention[0]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_transformer_lens_swap_parity(arch, tmp_path):
    pytest.importorskip("transformer_lens", reason="TransformerLens not installed (qkcov[tl])")
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    from qkcov.integrations.transformer_lens import ablate_hooks, swap_hooks

    sub, ids, ref = _qkcov_attention(arch, swap, A, B)
    tiny_tokenizer().save_pretrained(tmp_path)  # the bridge reloads the tokenizer by path
    bridge = TransformerBridge.boot_transformers(
        f"tiny-{arch}", hf_model=tiny_model(arch), tokenizer=AutoTokenizer.from_pretrained(tmp_path)
    )
    seen = {}

    def keep(x, hook):
        seen["pattern"] = x.detach().clone()
        return x

    pat = (f"blocks.{LAYER}.attn.hook_pattern", keep)
    bridge.run_with_hooks(ids, fwd_hooks=[*swap_hooks(sub, A, B), pat])
    diff = (seen["pattern"][0, HEAD] - ref).abs().max().item()
    bridge.run_with_hooks(ids, fwd_hooks=[pat])
    assert (seen["pattern"][0, HEAD] - ref).abs().max() > 1e-3  # the swap moved attention
    assert diff < 1e-5, diff
    _, _, ref_ab = _qkcov_attention(arch, ablate)
    bridge.run_with_hooks(ids, fwd_hooks=[*ablate_hooks(sub), pat])
    assert (seen["pattern"][0, HEAD] - ref_ab).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_nnsight_swap_parity(arch):
    pytest.importorskip("nnsight", reason="nnsight not installed (qkcov[nnsight])")
    from nnsight import NNsight

    from qkcov.integrations import nnsight as qn

    sub, ids, ref = _qkcov_attention(arch, swap, A, B)
    nm = NNsight(tiny_model(arch, attn_implementation="eager"))
    with nm.trace(ids):
        qn.swap(nm, sub, A, B)
        pattern = qn.attention(nm, sub).output[1].save()
    with nm.trace(ids):
        base = qn.attention(nm, sub).output[1].save()
    assert (base[0, HEAD] - ref).abs().max() > 1e-3
    assert (pattern[0, HEAD] - ref).abs().max() < 1e-5
    _, _, ref_ab = _qkcov_attention(arch, ablate)
    with nm.trace(ids):
        qn.ablate(nm, sub)
        ab = qn.attention(nm, sub).output[1].save()
    assert (ab[0, HEAD] - ref_ab).abs().max() < 1e-5

"""max |Δ attention| between an exported subspace swap applied through TransformerLens
(``hook_rot_k``) / nnsight (``.source``) and qkcov's own in-forward swap, on the tiny models
and on the default model (float32). ``python benchmarks/export_parity.py [--no-default]``.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile

import torch

from qkcov.core.subspace import random_orthonormal
from qkcov.export import Subspace
from qkcov.models.apply import swap
from qkcov.models.loading import model_info
from qkcov.models.tiny import tiny_model, tiny_tokenizer

PROMPT = "The keys to the old cabinet in the hall are on the table, so the"


def planted(model, layer: int, head: int, rank: int = 4) -> Subspace:
    info = dataclasses.asdict(model_info(model))
    D = info["head_dim"]
    return Subspace(
        layer=layer, head=head, feature="planted", group="pooled",
        query_directions=random_orthonormal(D, D, seed=1), key_directions=random_orthonormal(D, D, seed=2),
        singular_values=torch.ones(D, dtype=torch.float64), rank=rank, rank_rule="fixed",
        ranks={"causal": None, "null": None, "energy": rank}, model=info["architecture"], model_info=info,
    )  # fmt: skip


def parity(make_model, tok_dir, tok, layer, head, pos_a, pos_b, name) -> None:
    from nnsight import NNsight
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    from qkcov.integrations import nnsight as qn
    from qkcov.integrations.transformer_lens import swap_hooks

    model = make_model()
    model.set_attn_implementation("eager")
    ids = tok([PROMPT], return_tensors="pt").input_ids
    sub = planted(model, layer, head)
    with swap(model, sub, pos_a, pos_b) as e, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    ref = e.attention[0]
    with torch.no_grad():
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=make_model(), tokenizer=AutoTokenizer.from_pretrained(tok_dir)
        )
        seen = {}

        def keep(x, hook):
            seen["p"] = x.detach()
            return x

        bridge.run_with_hooks(
            ids,
            fwd_hooks=[*swap_hooks(sub, pos_a, pos_b), (f"blocks.{layer}.attn.hook_pattern", keep)],
        )
    tl = (seen["p"][0, head].double() - ref.double()).abs().max().item()
    nm = NNsight(model)
    with torch.no_grad(), nm.trace(ids):
        qn.swap(nm, sub, pos_a, pos_b)
        pat = qn.attention(nm, sub).output[1].save()
    nn = (pat[0, head].double() - ref.double()).abs().max().item()
    moved = "n/a"
    with torch.no_grad(), nm.trace(ids):
        base = qn.attention(nm, sub).output[1].save()
    moved = (base[0, head].double() - ref.double()).abs().max().item()
    print(f"{name}: L{layer}H{head} seq={ids.shape[1]} max|Δattn| TL={tl:.2e} nnsight={nn:.2e} "
          f"(the swap itself moves attention by {moved:.3f})")  # fmt: skip


def main() -> None:
    tok = tiny_tokenizer()
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"):
            try:
                parity(lambda a=arch: tiny_model(a), d, tok, 1, 2, 2, 9, f"tiny-{arch}")
            except Exception as err:  # an architecture a library does not support
                print(f"tiny-{arch}: not run ({type(err).__name__}: {str(err)[:120]})")
    if "--no-default" in sys.argv:
        return
    from qkcov.models.loading import load_model

    lm = load_model("smollm2-135m")
    with tempfile.TemporaryDirectory() as d:
        lm.tokenizer.save_pretrained(d)
        import copy

        parity(lambda: copy.deepcopy(lm.model), d, lm.tokenizer, 13, 8, 1, 6, "smollm2-135m")


if __name__ == "__main__":
    main()

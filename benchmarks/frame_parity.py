"""Query-frame parity: every (query, key) attention logit before and after rotating the
captured post-RoPE q/k into the query's rotary frame, on the tiny architectures, three
other layouts (partial / interleaved rotary) and the default model.

Usage: python benchmarks/frame_parity.py [--no-smollm2]

Prints per model: layout, rotary dim, the largest |Δlogit| (float64, absolute and relative to
the largest logit) and the largest |q' − q_pre| (the frame's query against the model's own
pre-RoPE query: checks that the layout read from the model is the one it applies).
"""

from __future__ import annotations

import sys

import torch

from qkcov.models.capture import QKSites, capture_prompts
from qkcov.models.rotary import rotary_specs, to_query_frame
from qkcov.models.tiny import _COMMON, tiny_model, tiny_tokenizer

TEXTS = [
    "The cat sat on the mat and looked around the room. " * 4,
    "A dog ran, quickly, far away. " * 4,
]
SITES = QKSites([[-1], [-3]], [list(range(20)), list(range(24))])


def _others():
    import transformers as T

    c = dict(_COMMON, num_hidden_layers=2, num_key_value_heads=2)
    for name, (cfg, cls) in {
        "phi (partial 0.5)": (T.PhiConfig(**c, partial_rotary_factor=0.5), T.PhiForCausalLM),
        "glm (partial, interleaved)": (T.GlmConfig(**c, head_dim=16, partial_rotary_factor=0.5), T.GlmForCausalLM),
        "cohere (interleaved)": (T.CohereConfig(**c), T.CohereForCausalLM),
    }.items():  # fmt: skip
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        yield name, cls(cfg).float().eval()


def measure(model, tok, layers):
    post = capture_prompts(model, tok, TEXTS, SITES, layers, progress=False)
    pre = capture_prompts(model, tok, TEXTS, SITES, layers, pre_rope=True, progress=False)
    specs = rotary_specs(model, layers)
    abs_err = rel_err = pre_err = 0.0
    for layer in layers:
        c, f = post[layer], to_query_frame(post[layer], specs[layer])
        for b in range(len(TEXTS)):
            qs, ks = c.q_index[:, 0] == b, c.k_index[:, 0] == b
            a = torch.einsum("qhd,khd->hqk", c.q[qs].double(), c.k[ks].double())
            z = torch.einsum("qhd,khd->hqk", f.q[qs], f.k[ks])
            abs_err = max(abs_err, float((a - z).abs().max()))
            rel_err = max(rel_err, float((a - z).abs().max() / a.abs().max()))
        pre_err = max(pre_err, float((f.q - pre[layer].q.double()).abs().max()))
    s = specs[layers[0]]
    return s.layout, s.rotary_dim, abs_err, rel_err, pre_err


def main() -> None:
    tok = tiny_tokenizer()
    models = [
        (a, tiny_model(a)) for a in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
    ]
    models += list(_others())
    rows = []
    for name, m in models:
        rows.append((name, *measure(m, tok, list(range(m.config.num_hidden_layers)))))
    if "--no-smollm2" not in sys.argv:
        from qkcov.models.loading import load_model

        lm = load_model("smollm2-135m")
        rows.append(("smollm2-135m", *measure(lm.model, lm.tokenizer, list(range(30)))))
    print(
        f"{'model':28s} {'layout':12s} {'rot.dim':>7s} {'max|Δlogit|':>12s} {'relative':>10s} {'max|q′−q_pre|':>14s}"
    )
    for name, layout, rd, a, r, p in rows:
        print(f"{name:28s} {layout:12s} {rd:7d} {a:12.2e} {r:10.2e} {p:14.2e}")
    try:
        rotary_specs(tiny_model("gpt2"), [0])
    except ValueError as err:
        print(f"gpt2: {err}")


if __name__ == "__main__":
    main()

"""Real SmolLM2-135M-Instruct (GGUF preset, loaded once per session)."""

import json

import pytest
import torch

from qkcov.cli import main
from qkcov.core.covariance import ContrastiveCovariance
from qkcov.core.intervention import attention_weights, swap_in_subspace
from qkcov.models import (
    QKSites,
    capture_prompts,
    capture_qk,
    find_span,
    format_prompt,
    tokenize_batch,
)
from qkcov.models.intervene import KeySwap, swap_keys_forward
from qkcov.models.verify import causal_mask, verify_parity

ITEMS = ["apple", "dog", "car", "banana", "cat"]


def _prompt(tok, order):
    listing = "\n".join(f"- {ITEMS[i]}" for i in order)
    return format_prompt(tok, f"{listing}\nWhat are the fruits in the list?")


def test_geometry(smollm2):
    info = smollm2.info
    assert (info.architecture, info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == (
        "LlamaForCausalLM", 30, 9, 3, 64,
    )  # fmt: skip
    assert smollm2.name == "smollm2-135m"


def test_parity_left_and_right(smollm2):
    result = verify_parity(smollm2)
    assert result["passed"] and result["max_abs_diff"] <= 1e-5, result
    assert result["n_layers"] == 30 and result["n_heads"] == 9


def test_cli_verify_prints_one_json(smollm2, capsys):
    assert main(["verify", "--model", "smollm2-135m"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    data = json.loads(out[0])
    assert data["passed"] and data["model"] == "smollm2-135m" and data["n_layers"] == 30


def test_spans_in_chat_prompt(smollm2):
    tok = smollm2.tokenizer
    text = _prompt(tok, [0, 1, 2])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    span = find_span(tok, text, "dog")
    assert span.first == span.last  # " dog" is one BPE token with its leading space
    assert tok.decode(ids[span.first : span.last + 1]).strip() == "dog"
    with pytest.raises(ValueError, match="'zebra' not found"):
        find_span(tok, text, "zebra")


def test_delta_padding_invariance_real(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    orders = [[0, 1, 2], [3, 4, 1, 2], [1, 0], [2, 3, 4, 0, 1]]
    texts = [_prompt(tok, o) for o in orders]
    keys = [
        [find_span(tok, t, ITEMS[o[0]]).last, find_span(tok, t, ITEMS[o[-1]]).last]
        for t, o in zip(texts, orders, strict=True)
    ]
    sites = QKSites([[-1]] * len(texts), keys)

    def run(batch_size, side):
        acc = ContrastiveCovariance(64, groups=9)

        def on_capture(layer, rec):
            for j, h in enumerate(rec.heads):
                acc.update(rec.q[:, j], rec.k[0::2, j], rec.k[1::2, j], group=h)

        capture_prompts(model, tok, texts, sites, [12], batch_size=batch_size, padding_side=side,
                        on_capture=on_capture, progress=False)  # fmt: skip
        return torch.stack([acc.delta(str(h)) for h in range(9)])

    ref = run(1, "left")
    for bs, side in ((4, "left"), (4, "right")):
        rel = float((run(bs, side) - ref).norm() / ref.norm())
        assert rel <= 1e-5, (bs, side, rel)


def test_swap_real_model(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    texts = [_prompt(tok, [0, 1, 2]), _prompt(tok, [1, 3, 4, 2])]
    ids, mask = tokenize_batch(tok, texts, "left")
    a = [find_span(tok, t, w).last for t, w in zip(texts, ["apple", "banana"], strict=True)]
    b = [find_span(tok, t, w).last for t, w in zip(texts, ["car", "cat"], strict=True)]
    g = torch.Generator().manual_seed(0)
    V = torch.linalg.qr(torch.randn(64, 4, generator=g))[0]
    layer, head = 12, 4
    res = swap_keys_forward(
        model, ids, mask, layer, head, [KeySwap(a[0], b[0], V), KeySwap(a[1], b[1], V)]
    )
    lens = mask.sum(1).tolist()
    every = [list(range(n)) for n in lens]
    cap = capture_qk(model, ids, mask, QKSites([[-1], [-1]], every), [layer], [head])[layer]
    start = 0
    for i, n in enumerate(lens):
        k = cap.k[start : start + n, 0].clone()
        start += n
        k[a[i]], k[b[i]] = swap_in_subspace(k[a[i]], k[b[i]], V)
        ref = attention_weights(cap.q[i : i + 1, 0], k, causal_mask(n)[-1:], cap.scaling)[0]
        assert (res.attention[i, :n] - ref).abs().max() <= 1e-5

import pytest
import torch

from qkcov.core.intervention import attention_weights, swap_in_subspace
from qkcov.models.capture import QKSites, capture_qk, position_ids_from_mask, tokenize_batch
from qkcov.models.intervene import KeySwap, edit_head_forward, last_token_logits, swap_keys_forward
from qkcov.models.loading import model_info
from qkcov.models.verify import causal_mask

LAYER = 1


def _random_basis(d: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, r, generator=g))[0]


def _swaps(mask, d):
    lens = mask.sum(1).tolist()
    out = []
    for b, n in enumerate(lens):
        if n < 3 or b == 1:
            out.append(None)  # null edit inside the same batch
        else:
            out.append(KeySwap(pos_a=1, pos_b=n - 2, basis=_random_basis(d, 3 + b % 2, b)))
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3", "gpt2", "qwen3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_swap_matches_offline_recomputation(arch, side, tiny, tok, prompts):
    model = tiny(arch)
    head = 2
    ids, mask = tokenize_batch(tok, prompts, side)
    lens = mask.sum(1).tolist()
    d = model_info(model).head_dim
    swaps = _swaps(mask, d)
    res = swap_keys_forward(model, ids, mask, LAYER, head, swaps)
    assert res.attention.shape == ids.shape and res.logits.shape == (
        len(prompts),
        model.config.vocab_size,
    )
    every = [list(range(n)) for n in lens]
    cap = capture_qk(model, ids, mask, QKSites([[-1]] * len(prompts), every), [LAYER], [head])[
        LAYER
    ]
    start = 0
    for b, n in enumerate(lens):
        k = cap.k[start : start + n, 0].clone()
        start += n
        if swaps[b] is not None:
            a, c = swaps[b].pos_a, swaps[b].pos_b
            k[a], k[c] = swap_in_subspace(k[a], k[c], swaps[b].basis)
        window = causal_mask(n, cap.sliding_window)[-1:]
        ref = attention_weights(cap.q[b : b + 1, 0], k, window, cap.scaling, cap.softcap)[0]
        assert (res.attention[b, :n] - ref).abs().max() <= 1e-5, (b, arch, side)
        assert torch.all(res.attention[b, n:] == 0)


def test_swap_changes_only_the_edited_head(tiny, tok, prompts):
    model = tiny("llama")  # 4 heads / 2 kv heads: head 2 shares kv head 1 with head 3
    head = 2
    ids, mask = tokenize_batch(tok, prompts, "left")
    swaps = _swaps(mask, 16)
    edited = swap_keys_forward(model, ids, mask, LAYER, head, swaps, return_layer_output=True)
    null = swap_keys_forward(
        model, ids, mask, LAYER, head, [None] * len(prompts), return_layer_output=True
    )
    out_e, out_n = edited.layer_output, null.layer_output  # [B, S, H, D]
    for h in (0, 1, 3):
        assert torch.equal(out_e[:, :, h], out_n[:, :, h])
    changed = [b for b, s in enumerate(swaps) if s is not None]
    assert (out_e[changed, :, head] - out_n[changed, :, head]).abs().max() > 1e-3
    assert not torch.allclose(edited.logits[changed], null.logits[changed])
    torch.testing.assert_close(edited.logits[1], null.logits[1], atol=1e-5, rtol=1e-5)
    # the null edit reproduces the unhooked model (our recomputed head == the model's own)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    torch.testing.assert_close(
        null.logits, last_token_logits(plain.logits, mask), atol=1e-5, rtol=1e-5
    )


def test_swap_is_batch_invariant(tiny, tok, prompts):
    model = tiny("mistral")
    ids, mask = tokenize_batch(tok, prompts, "right")
    swaps = _swaps(mask, 16)
    batch = swap_keys_forward(model, ids, mask, 0, 1, swaps)
    ids0, mask0 = tokenize_batch(tok, prompts[:1])
    one = swap_keys_forward(model, ids0, mask0, 0, 1, swaps[:1])
    n = int(mask0.sum())
    torch.testing.assert_close(batch.attention[0, :n], one.attention[0, :n], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(batch.logits[0], one.logits[0], atol=1e-5, rtol=1e-5)


def test_query_edit(tiny, tok, prompts):
    model = tiny("qwen2")
    ids, mask = tokenize_batch(tok, prompts[:2], "left")

    def zero_queries(q, k):
        return torch.zeros_like(q), k

    res = edit_head_forward(model, ids, mask, 0, 3, zero_queries, query_positions=[-1, 2])
    n0 = int(mask[0].sum())
    torch.testing.assert_close(res.attention[0, :n0], torch.full((n0,), 1.0 / n0))
    torch.testing.assert_close(res.attention[1, :3], torch.full((3,), 1.0 / 3))


def test_intervention_bad_inputs(tiny, tok, prompts):
    model = tiny("llama")
    ids, mask = tokenize_batch(tok, prompts[:2])
    V = _random_basis(16, 2, 0)
    with pytest.raises(ValueError, match="1 swap specs for a batch of 2"):
        swap_keys_forward(model, ids, mask, 0, 0, [None])
    with pytest.raises(ValueError, match=r"head_dim=16"):
        swap_keys_forward(model, ids, mask, 0, 0, [KeySwap(0, 1, torch.eye(8)[:, :2]), None])
    with pytest.raises(ValueError, match="swap position 500 is beyond"):
        swap_keys_forward(model, ids, mask, 0, 0, [KeySwap(0, 500, V), None])
    with pytest.raises(ValueError, match="head 4 out of range"):
        swap_keys_forward(model, ids, mask, 0, 4, [None, None])
    with pytest.raises(ValueError, match="layer 2 out of range"):
        swap_keys_forward(model, ids, mask, 2, 0, [None, None])

import pytest
import torch

from qkcov.core.covariance import ContrastiveCovariance
from qkcov.core.intervention import attention_weights
from qkcov.models.capture import (
    QKSites,
    attention_hooks,
    capture_prompts,
    capture_qk,
    resolve_positions,
    tokenize_batch,
)
from qkcov.models.tiny import TINY_ARCHS
from qkcov.models.verify import causal_mask, verify_parity


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_parity_with_eager(arch, tiny, tok, prompts):
    model = tiny(arch)
    impl = model.config._attn_implementation
    result = verify_parity(model, tok, prompts)
    assert result["passed"], result
    assert set(result["max_abs_diff_by_side"]) == {"left", "right"}
    assert max(result["max_abs_diff_by_side"].values()) <= 1e-5
    assert model.config._attn_implementation == impl  # restored


@pytest.mark.parametrize(("arch", "drop"), [("gemma2", "softcap"), ("gemma3", "sliding_window")])
def test_arch_features_matter(arch, drop, tiny, tok, prompts):
    """Recomputing without the soft-cap / window must NOT match: the parity test has teeth."""
    model = tiny(arch)
    ids, mask = tokenize_batch(tok, prompts[:1])
    n = int(mask.sum())
    caps = capture_qk(model, ids, mask, QKSites([list(range(n))], [list(range(n))]), [0])
    cap = caps[0]
    assert getattr(cap, drop) is not None
    q, k = cap.q.transpose(0, 1), cap.k.transpose(0, 1)
    full = attention_weights(q, k, causal_mask(n, cap.sliding_window), cap.scaling, cap.softcap)
    kw = {"softcap": cap.softcap, "sliding_window": cap.sliding_window, drop: None}
    bare = attention_weights(q, k, causal_mask(n, kw["sliding_window"]), cap.scaling, kw["softcap"])
    assert (full - bare).abs().max() > 1e-3


def test_gqa_mapping_and_shapes(tiny, tok, prompts):
    model = tiny("llama")  # 4 heads, 2 kv heads
    ids, mask = tokenize_batch(tok, prompts[:3], "right")
    sites = QKSites([[-1], [0, -1], [2]], [[0, 1], [-2], [-1]])
    cap = capture_qk(model, ids, mask, sites, [1], heads=[3, 0])[1]
    assert cap.q.shape == (4, 2, 16) and cap.k.shape == (4, 2, 16)
    lens = mask.sum(1).tolist()
    assert cap.q_index.tolist() == [[0, lens[0] - 1], [1, 0], [1, lens[1] - 1], [2, 2]]
    assert cap.k_index.tolist() == [[0, 0], [0, 1], [1, lens[1] - 2], [2, lens[2] - 1]]
    full = capture_qk(model, ids, mask, sites, [1])[1]  # all heads
    # head 3 reads kv head 1 (= query heads 2, 3); head 0 reads kv head 0
    assert torch.equal(cap.k[:, 0], full.k[:, 3]) and torch.equal(full.k[:, 2], full.k[:, 3])
    assert torch.equal(cap.k[:, 1], full.k[:, 0]) and torch.equal(full.k[:, 0], full.k[:, 1])
    assert not torch.equal(full.k[:, 0], full.k[:, 2])


def _delta(model, tok, prompts, batch_size, side):
    acc = {(layer, h): ContrastiveCovariance(16) for layer in (0, 1) for h in range(4)}

    def on_capture(layer, rec):
        for j, h in enumerate(rec.heads):
            acc[(layer, h)].update(rec.q[:, j], rec.k[0::2, j], rec.k[1::2, j])

    sites = QKSites([[-1]] * len(prompts), [[0, -1]] * len(prompts))
    out = capture_prompts(
        model, tok, prompts, sites, [0, 1], batch_size=batch_size, padding_side=side,
        on_capture=on_capture, progress=False,
    )  # fmt: skip
    assert out == {}
    return {key: a.delta() for key, a in acc.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_delta_invariant_to_batching_and_padding(arch, tiny, tok, prompts):
    model = tiny(arch, torch.float64)  # float64: padding/batching must change nothing but rounding
    ref = _delta(model, tok, prompts, 1, "left")
    for batch_size, side in ((5, "left"), (5, "right"), (2, "right"), (3, "left")):
        other = _delta(model, tok, prompts, batch_size, side)
        for key in ref:
            rel = (other[key] - ref[key]).norm() / ref[key].norm()
            assert rel <= 1e-9, (key, batch_size, side, float(rel))


def test_float32_padding_invariance_is_rounding_level(tiny, tok, prompts):
    model = tiny("llama")
    ref = _delta(model, tok, prompts, 1, "left")
    other = _delta(model, tok, prompts, 5, "right")
    for key in ref:
        assert (other[key] - ref[key]).norm() / ref[key].norm() <= 1e-5


def test_capture_prompts_matches_single_batches(tiny, tok, prompts):
    model = tiny("qwen3")
    sites = QKSites([[-1, 0]] * len(prompts), None)
    many = capture_prompts(model, tok, prompts, sites, [1], heads=[2], batch_size=2, progress=False)
    assert many[1].k is None and many[1].q.shape == (2 * len(prompts), 1, 16)
    assert many[1].q_index[:, 0].tolist() == [i for i in range(len(prompts)) for _ in range(2)]
    ids, mask = tokenize_batch(tok, prompts[2:3])
    one = capture_qk(model, ids, mask, QKSites([[-1, 0]], None), [1], heads=[2])[1]
    torch.testing.assert_close(many[1].q[4:6], one.q, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_pre_rope_capture(arch, tiny, tok, prompts):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny(arch)
    ids, mask = tokenize_batch(tok, prompts[:2])
    n = mask.sum(1).tolist()
    sites = QKSites([list(range(x)) for x in n], [list(range(x)) for x in n])
    post = capture_qk(model, ids, mask, sites, [0])[0]
    pre = capture_qk(model, ids, mask, sites, [0], pre_rope=True)[0]
    assert pre.pre_rope and not torch.allclose(pre.q, post.q)
    pos = pre.q_index[:, 1]
    rope = model.model.rotary_emb
    rope_args = (pre.q, pos[None])
    if arch == "gemma3":  # first layer is a sliding layer with its own rope
        rope_args += ("sliding_attention",)
    cos, sin = rope(*rope_args)
    q_rot, k_rot = apply_rotary_pos_emb(
        pre.q.transpose(0, 1)[None], pre.k.transpose(0, 1)[None], cos, sin
    )
    torch.testing.assert_close(q_rot[0].transpose(0, 1), post.q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_rot[0].transpose(0, 1), post.k, atol=1e-5, rtol=1e-5)


def test_pre_rope_gpt2_is_post(tiny, tok, prompts):
    model = tiny("gpt2")
    ids, mask = tokenize_batch(tok, prompts[:2])
    sites = QKSites([[-1]] * 2, [[0, 1]] * 2)
    a = capture_qk(model, ids, mask, sites, [1])[1]
    b = capture_qk(model, ids, mask, sites, [1], pre_rope=True)[1]
    assert torch.equal(a.q, b.q) and torch.equal(a.k, b.k)


def test_bad_inputs(tiny, tok, prompts):
    model = tiny("llama")
    ids, mask = tokenize_batch(tok, prompts[:2])
    sites = QKSites([[-1], [-1]], [[0], [0]])
    with pytest.raises(ValueError, match=r"layer 2 out of range; valid layers are \[0, 1\]"):
        capture_qk(model, ids, mask, sites, [2])
    with pytest.raises(ValueError, match=r"head 4 out of range; valid heads are \[0, 3\]"):
        capture_qk(model, ids, mask, sites, [0], heads=[4])
    n1 = int(mask[1].sum())
    with pytest.raises(ValueError, match=f"key position {n1} is beyond example 1"):
        capture_qk(model, ids, mask, QKSites([[-1], [-1]], [[0], [n1]]), [0])
    with pytest.raises(ValueError, match="beyond example 0"):
        capture_qk(model, ids, mask, QKSites([[-100], [-1]], None), [0])
    with pytest.raises(ValueError, match="empty query position list for example 1"):
        capture_qk(model, ids, mask, QKSites([[-1], []], None), [0])
    with pytest.raises(ValueError, match="neither"):
        capture_qk(model, ids, mask, QKSites(None, None), [0])
    with pytest.raises(ValueError, match="3 examples"):
        resolve_positions([[0]] * 3, mask)


def test_model_bypassing_attention_interface(tok, prompts):
    """A layer computing attention by itself is detected and named."""
    from qkcov.models.tiny import tiny_model

    model = tiny_model("llama")
    attn = model.model.layers[1].self_attn
    original = attn.forward

    def private_forward(hidden_states, position_embeddings=None, attention_mask=None, **kw):
        impl, attn.config._attn_implementation_internal = attn.config._attn_implementation, "sdpa"
        try:
            return original(hidden_states, position_embeddings, attention_mask, **kw)
        finally:
            attn.config._attn_implementation_internal = impl

    attn.forward = private_forward
    ids, mask = tokenize_batch(tok, prompts[:2])
    sites = QKSites([[-1], [-1]], None)
    assert 0 in capture_qk(model, ids, mask, sites, [0])
    with pytest.raises(ValueError, match=r"LlamaForCausalLM: attention of layer\(s\) \[1\]"):
        capture_qk(model, ids, mask, sites, [0, 1])


def test_hooks_restore_implementation_on_error(tiny, tok, prompts):
    model = tiny("llama")

    def boom(call):
        raise RuntimeError("inside hook")

    ids, mask = tokenize_batch(tok, prompts[:2])
    with pytest.raises(RuntimeError, match="inside hook"), attention_hooks(model, {0: boom}):
        model(input_ids=ids, attention_mask=mask)
    assert model.config._attn_implementation == "sdpa"

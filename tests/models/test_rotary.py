"""Rotary layouts read from the model: the query frame keeps every logit, recovers the
pre-RoPE query, refuses what it does not know, and swaps work in either frame."""

from __future__ import annotations

import pytest
import torch

from qkcov.core.intervention import swapped_attention
from qkcov.core.rotary import rotate
from qkcov.core.subspace import random_orthonormal
from qkcov.models.capture import QKSites, capture_prompts, tokenize_batch
from qkcov.models.intervene import KeySwap, capture_layer_input, swap_keys_forward
from qkcov.models.rotary import rotary_specs, to_query_frame
from qkcov.models.tiny import _COMMON

ROTARY = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
TEXTS = ["The cat sat on the mat and looked around.", "A dog ran, quickly, far away"]
SITES = QKSites([[-1], [-3]], [list(range(12)), list(range(14))])


def _logits(cap):
    """Every (query, key) logit of a capture, float64, per example."""
    out = []
    for b in sorted(set(cap.q_index[:, 0].tolist())):
        q = cap.q[cap.q_index[:, 0] == b].double()
        k = cap.k[cap.k_index[:, 0] == b].double()
        out.append(torch.einsum("qhd,khd->hqk", q, k))
    return out


def _check_frame(model, tok, layers, texts=TEXTS):
    post = capture_prompts(model, tok, texts, SITES, layers, progress=False)
    pre = capture_prompts(model, tok, texts, SITES, layers, pre_rope=True, progress=False)
    specs = rotary_specs(model, layers)
    worst_logit = worst_pre = 0.0
    for layer in layers:
        frame = to_query_frame(post[layer], specs[layer])
        for a, b in zip(_logits(post[layer]), _logits(frame), strict=True):
            worst_logit = max(worst_logit, float((a - b).abs().max() / a.abs().max().clamp_min(1)))
        # the frame's query is the pre-RoPE query: the layout matches the model's
        worst_pre = max(worst_pre, float((frame.q - pre[layer].q.double()).abs().max()))
    return worst_logit, worst_pre, specs


@pytest.mark.parametrize("arch", ROTARY)
def test_query_frame_keeps_logits_and_recovers_pre_rope(arch, tiny, tok):
    model = tiny(arch)
    layers = list(range(model.config.num_hidden_layers))
    worst_logit, worst_pre, specs = _check_frame(model, tok, layers)
    assert worst_logit <= 1e-5
    assert worst_pre <= 1e-4
    assert all(s.layout == "half" and s.rotary_dim == model.config.head_dim
               if hasattr(model.config, "head_dim") and model.config.head_dim else s.layout == "half"
               for s in specs.values())  # fmt: skip
    if arch == "gemma3":  # local and global layers rotate at different bases
        assert not torch.equal(specs[0].inv_freq, specs[2].inv_freq)


def _other(name):
    import transformers as T

    c = dict(_COMMON, num_hidden_layers=2, num_key_value_heads=2)
    cfg, cls = {
        "phi": lambda: (T.PhiConfig(**c, partial_rotary_factor=0.5), T.PhiForCausalLM),
        "glm": lambda: (T.GlmConfig(**c, head_dim=16, partial_rotary_factor=0.5), T.GlmForCausalLM),
        "cohere": lambda: (T.CohereConfig(**c), T.CohereForCausalLM),
    }[name]()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(cfg).float().eval()


@pytest.mark.parametrize(
    "name, layout, rotary_dim", [("phi", "half", 8), ("glm", "interleaved", 8), ("cohere", "interleaved", 16)]
)  # fmt: skip
def test_partial_and_interleaved_layouts_match_the_model(name, layout, rotary_dim, tok):
    model = _other(name)
    worst_logit, worst_pre, specs = _check_frame(model, tok, [0, 1])
    assert (specs[0].layout, specs[0].rotary_dim) == (layout, rotary_dim)
    assert worst_logit <= 1e-5 and worst_pre <= 1e-4


def test_gpt2_and_unknown_layouts_are_refused_by_name(tiny):
    with pytest.raises(ValueError, match="gpt2 has none") as err:
        rotary_specs(tiny("gpt2"), [0])
    assert "\n" not in str(err.value)
    model = tiny("llama")
    saved = model.config.model_type
    try:
        model.config.model_type = "mysterynet"
        with pytest.raises(ValueError, match="'mysterynet'"):
            rotary_specs(model, [0])
    finally:
        model.config.model_type = saved


def test_pipeline_refuses_query_frame_on_gpt2_before_work(tiny, tok):
    from qkcov.pipeline import analyze
    from qkcov.tasks.builtin import build_task_records

    with pytest.raises(ValueError, match="--frame query needs rotary"):
        analyze(tiny("gpt2"), tok, build_task_records("agreement", n=8), heads="L0H0",
                frame="query", progress=False)  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_swap_in_query_frame_maps_back_to_post_rope(arch, tiny, tok):
    """Offline swap of query-frame keys inside V == in-forward swap of post-RoPE keys
    inside R(p_q) V (the attention row of the edited head)."""
    from qkcov.engine.swaps import _post_basis

    model = tiny(arch)
    layer, head = 1, 1
    spec = rotary_specs(model, [layer])[layer]
    ids, mask = tokenize_batch(tok, TEXTS)
    qpos = [20, 25]
    orig, target = torch.tensor([3, 5]), torch.tensor([9, 11])
    V = random_orthonormal(spec.head_dim, 3, seed=1)
    cap = capture_layer_input(model, ids, mask, layer, head, query_positions=qpos,
                              answer_tokens=torch.zeros(2, 1, dtype=torch.long), keep_hidden=False)  # fmt: skip
    pq = torch.tensor(qpos)
    q = rotate(cap.query.double(), pq, spec, inverse=True)
    k = rotate(cap.keys.double(), pq[:, None], spec, inverse=True)
    off = swapped_attention(q, k, orig, target, [V], cap.mask, cap.scaling, cap.softcap)[0]
    swaps = [KeySwap(int(o), int(t), _post_basis(V, p, spec)) for o, t, p in zip(orig, target, qpos, strict=True)]  # fmt: skip
    res = swap_keys_forward(model, ids, mask, layer, head, swaps, query_positions=qpos)
    n = off.shape[1]
    assert torch.allclose(res.attention[:, :n].double(), off, atol=1e-5)
    # and it differs from swapping the same V in post-RoPE coordinates
    plain = swap_keys_forward(model, ids, mask, layer, head,
                              [KeySwap(int(o), int(t), V) for o, t in zip(orig, target, strict=True)],
                              query_positions=qpos)  # fmt: skip
    assert (plain.attention[:, :n].double() - off).abs().max() > 1e-3


@pytest.mark.slow
def test_query_frame_parity_smollm2(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    long = [" ".join([t] * 4) for t in TEXTS]  # more tokens than the key sites
    worst_logit, worst_pre, specs = _check_frame(model, tok, [0, 7, 29], long)
    assert worst_logit <= 1e-5 and worst_pre <= 1e-3
    assert specs[0].layout == "half" and specs[0].rotary_dim == 64


def test_cli_refuses_query_frame_on_gpt2_before_loading(tiny, tmp_path, capsys):
    from qkcov.cli import main
    from qkcov.tasks.builtin import build_task_records
    from qkcov.tasks.records import save_records

    model_dir = tmp_path / "gpt2"
    tiny("gpt2").save_pretrained(model_dir)
    data = tmp_path / "r.jsonl"
    save_records(data, build_task_records("agreement", n=12))
    capsys.readouterr()  # the save's progress bar
    argv = ["run", "--data", str(data), "--out", str(tmp_path / "out"), "--model", str(model_dir)]
    rc = main([*argv, "--frame", "query"])
    err = capsys.readouterr().err
    assert rc == 2 and "gpt2 has none" in err and len(err.strip().splitlines()) == 1
    assert "loading" not in err and not (tmp_path / "out").exists()

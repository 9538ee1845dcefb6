"""Model identifiers fail at once with one clear line; max_positions reads the config."""

from __future__ import annotations

import time

import pytest

from qkcov.models import loading
from qkcov.models.loading import load_model, max_positions
from qkcov.models.tiny import tiny_model


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_empty_names(name):
    with pytest.raises(ValueError, match="non-empty"):
        load_model(name)
    with pytest.raises(ValueError, match="non-empty"):
        loading._resolve(name, None)


@pytest.mark.parametrize(
    "name",
    [
        "./nope",
        "~/no-such-qkcov-model",
        "/no/such/dir",
        "a/b/c",
        "missing.gguf",
        "../no-such-qkcov-x",
    ],
)
def test_missing_paths_fail_immediately(name):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"model path .* does not exist"):
        load_model(name)
    assert time.perf_counter() - t0 < 20.0  # no network wait (a hang would take minutes)


def test_existing_non_model_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is not a .gguf file or a model folder"):
        load_model(str(tmp_path / "notes.txt"))


def test_uncached_hub_id_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(
        ValueError, match="not in the local cache and the hub is unreachable / offline"
    ):
        load_model("qkcov-test-org/no-such-model")
    assert time.perf_counter() - t0 < 20.0  # no network retries


def test_uncached_hub_id_with_unreachable_hub(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="unreachable"):
        loading._resolve("qkcov-test-org/no-such-model", None)
    assert time.perf_counter() - t0 < 20.0  # no network retries


def test_max_positions():
    model = tiny_model("llama")
    assert max_positions(model) == 256
    assert max_positions(model.config) == 256
    assert max_positions(object()) is None

"""Fixtures shared across test folders."""

from __future__ import annotations

import pytest

from qkcov.models.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama + char tokenizer saved as a local model folder (loadable by path)."""
    path = tmp_path_factory.mktemp("tinyllama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path

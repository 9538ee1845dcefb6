"""Shared fixtures for the model-engine tests: tiny random models (built once) and SmolLM2."""

from __future__ import annotations

import functools

import pytest
import torch

from qkcov.models.tiny import tiny_model, tiny_tokenizer

PROMPTS = [
    "The apple is in Box A, the pear is in Box B. Which box is the pear in? Box",
    "List: dog, car, cat. Animals?",
    "Hi there",
    "Keys and queries meet in a small head.",
    "x",
]


@functools.cache
def _tiny(arch: str, dtype: torch.dtype = torch.float32):
    return tiny_model(arch).to(dtype)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny():
    """``tiny(arch, dtype=float32)`` -> cached random model in eval mode."""
    return _tiny


@pytest.fixture(scope="session")
def prompts():
    return list(PROMPTS)


@pytest.fixture(scope="session")
def smollm2():
    from qkcov.models.loading import load_model

    try:
        return load_model("smollm2-135m")
    except ValueError as err:  # package not installed
        pytest.skip(str(err))

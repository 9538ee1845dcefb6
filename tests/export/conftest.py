"""A tiny saved run (agreement on a tiny Llama) shared by the export / compare tests."""

from __future__ import annotations

import pytest

from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.pipeline import analyze
from qkcov.tasks.builtin import build_task_records

FAST = dict(n_random=20, n_permutations=50, n_bootstrap=20, batch_size=16, rank_rule="energy")


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama"), tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_run(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    records = build_task_records("agreement", n=48)
    result = analyze(model, tok, records, heads="L1H2,L0H1", progress=False, **FAST)
    out = tmp_path_factory.mktemp("run") / "agreement"
    result.save(out)
    return result, out

"""One model identity however the model was loaded: a notebook run and a CLI run of the same
model compare; the runs index and compare name each run's verdict and headline."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qkcov
from qkcov.artifacts import read_json
from qkcov.cli import main
from qkcov.models.identity import canonical_name, model_identity
from qkcov.models.loading import load_model
from qkcov.models.tiny import tiny_model
from qkcov.pipeline import analyze
from qkcov.report.compare import write_index
from qkcov.results import headline_of
from qkcov.tasks.builtin import build_task_records
from qkcov.tasks.records import save_records

FAST = ["--n-random", "20", "--n-permutations", "20", "--n-bootstrap", "0", "--quiet"]
CFG = dict(n_random=20, n_permutations=20, n_bootstrap=0, heads="L1H2", progress=False)


@pytest.fixture(scope="module")
def two_paths(tiny_dir, tmp_path_factory):
    """The same tiny model run from a notebook (transformers' own loader, so nothing but its
    config says where it came from) and from the CLI (``--model DIR``)."""
    root = tmp_path_factory.mktemp("identity")
    recs = build_task_records("agreement", n=40)
    data = root / "records.jsonl"
    save_records(data, recs)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    analyze(model, tok, recs, **CFG).save(root / "notebook")
    argv = ["run", "--data", str(data), "--model", str(tiny_dir), "--heads", "L1H2"]
    assert main([*argv, *FAST, "--out", str(root / "cli")]) == 0
    return root, model


def test_notebook_and_cli_runs_share_one_identity_and_compare(two_paths, tiny_dir):
    root, model = two_paths
    nb = read_json(root / "notebook" / "run.json")
    cli = read_json(root / "cli" / "run.json")
    a, b = nb["provenance"]["model_identity"], cli["provenance"]["model_identity"]
    assert a["fingerprint"] == b["fingerprint"] and a["weights_from"] == "files"
    assert a["name"] == b["name"] == nb["model"] == cli["model"] == str(tiny_dir)
    cmp = qkcov.compare([root / "notebook", root / "cli"])
    assert [p["head"] for p in cmp.pairs] == ["L1H2"]
    assert cmp.pairs[0]["key_max_deg_common"] < 1e-3  # same model, records, seed: same ΔC
    # load_model's object: the same identity again (one function, whatever loaded it)
    assert model_identity(load_model(str(tiny_dir)).model)["fingerprint"] == a["fingerprint"]


def test_identity_separates_models_and_ignores_the_dtype(tiny_dir):
    base = model_identity(AutoModelForCausalLM.from_pretrained(tiny_dir))
    half = model_identity(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16))
    assert half["fingerprint"] == base["fingerprint"]  # the files, not the loaded dtype
    other = tiny_model("llama")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert model_identity(other)["weights_from"] == "parameters"
    assert (
        model_identity(other)["fingerprint"] != model_identity(tiny_model("llama"))["fingerprint"]
    )
    assert model_identity(tiny_model("qwen3"))["config_sha256"] != base["config_sha256"]


def test_preset_files_by_path_are_the_preset():
    from qkcov.models.loading import PRESETS

    directory, gguf = PRESETS["smollm2-135m"].locate()
    assert canonical_name(directory) == canonical_name(f"{directory}/{gguf}") == "smollm2-135m"
    assert canonical_name("SmolLM2-135M") == "smollm2-135m"
    assert canonical_name("org/other") == "org/other"


def test_index_and_compare_show_verdict_and_headline(two_paths):
    root, _ = two_paths
    page = write_index(root).read_text()
    for col in ("verdict", "headline", "Δp random"):
        assert f"<th>{col}</th>" in page
    head = read_json(root / "cli" / "run.json")["heads"][0]
    hl = headline_of(head)
    assert hl.condition in page and head["verdict"]["status"] in page
    cmp = qkcov.compare([root / "notebook", root / "cli"])
    row = next(r for r in cmp.ranks if r["run"] == str(root / "cli"))
    # the headline condition (the one the verdict rests on), not the null-rank condition
    assert row["swap_condition"] == hl.condition and row["rank"] == hl.rank
    assert row["delta_p"] == pytest.approx(head["swaps"]["conditions"][hl.condition]["delta_p"])
    assert row["verdict"] == head["verdict"]["status"]
    assert hl.condition in cmp.summary()

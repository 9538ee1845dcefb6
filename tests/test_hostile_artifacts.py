"""Tampered artifacts and hostile inputs: one clear line naming the file, never a traceback,
never a silent wrong result; bounded reads; validated subspaces (issue 23)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from qkcov.artifacts import add_to_manifest, load_tensors, read_json, save_tensors, write_json
from qkcov.cli import main
from qkcov.export import Subspace
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.pipeline import analyze
from qkcov.tasks.builtin import build_task_records

FAST = dict(n_random=20, n_permutations=50, n_bootstrap=20, batch_size=16, rank_rule="energy")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny saved run (agreement, tiny Llama, heads L1H2 and L0H1)."""
    result = analyze(
        tiny_model("llama"), tiny_tokenizer(), build_task_records("agreement", n=48),
        heads="L1H2,L0H1", progress=False, **FAST,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("hostile") / "run"
    result.save(out)
    return out


def _tampered(run: Path, dest: Path, *, info=None, tensors=None, raw=None) -> Path:
    """A copy of ``run`` with run.json / run.safetensors edited and the manifest's hashes
    forged to match (so only the content checks stand between it and the reader)."""
    shutil.copytree(run, dest)
    if info is not None:
        data = info(read_json(dest / "run.json"))
        (dest / "run.json").write_text(json.dumps(data) if not isinstance(data, str) else data)
    if tensors is not None:
        save_tensors(dest / "run.safetensors", tensors(load_tensors(dest / "run.safetensors")))
    if raw is not None:
        (dest / "run.safetensors").write_bytes(raw)
    add_to_manifest(dest, ["run.json", "run.safetensors"])
    return dest


def _one_line(capsys, *must: str) -> str:
    err = capsys.readouterr().err
    # transformers' own weight-loading progress bar is not an error line
    lines = [x for x in err.strip().splitlines() if x.strip() and "Loading weights" not in x]
    assert len(lines) == 1 and "Traceback" not in err, err
    for m in must:
        assert m in lines[0], lines[0]
    return lines[0]


def _set_rank(value):
    def edit(d):
        d["heads"][0]["features"]["feature"]["groups"]["pooled"]["rank"] = value
        return d

    return edit


def test_negative_rank_is_refused_by_export_and_compare(run, tmp_path, capsys):
    bad = _tampered(run, tmp_path / "bad", info=_set_rank(-3))
    out = tmp_path / "sub.safetensors"
    assert main(["export", str(bad), "--head", "L1H2", "--out", str(out)]) == 2
    _one_line(capsys, str(bad), "rank", "-3")
    assert not out.exists()
    assert main(["compare", str(bad), str(run)]) == 2
    _one_line(capsys, str(bad), "rank", "-3")


def test_compare_refuses_runs_of_different_frames(run, tmp_path, capsys):
    def query(d):
        d["config"]["frame"] = "query"
        return d

    other = _tampered(run, tmp_path / "query", info=query)
    assert main(["compare", str(run), str(other)]) == 2
    _one_line(capsys, "different frames", "post-rope", "query")


def test_same_model_name_different_geometry_says_what_differs(run, tmp_path, capsys):
    def geometry(d):
        d["model_info"]["n_kv_heads"] = 1
        return d

    other = _tampered(run, tmp_path / "geom", info=geometry)
    assert main(["compare", str(run), str(other)]) == 2
    line = _one_line(capsys, "same model name with different head geometry", "n_kv_heads")
    model = read_json(run / "run.json")["model"]
    assert f"({model}, {model})" not in line


@pytest.mark.parametrize(
    "case", ["garbage_tensors", "huge_header", "missing_tensor", "list_json", "deep_json", "nan"]
)
def test_tampered_run_is_one_line_in_compare_and_export(run, tmp_path, capsys, case):
    prefix = "L1H2.feature.pooled."
    kw = {
        "garbage_tensors": dict(raw=b"\x00garbage" * 20),
        "huge_header": dict(raw=(2**40).to_bytes(8, "little") + b"{}"),
        "missing_tensor": dict(tensors=lambda t: {k: v for k, v in t.items() if "key_basis" not in k}),
        "list_json": dict(info=lambda d: [d]),
        "deep_json": dict(info=lambda d: "[" * 100_000 + "]" * 100_000),
        "nan": dict(tensors=lambda t: {k: (v * float("nan") if k.startswith(prefix + "delta") else v) for k, v in t.items()}),
    }[case]  # fmt: skip
    bad = _tampered(run, tmp_path / "bad", **kw)
    assert main(["compare", str(bad), str(run)]) == 2
    _one_line(capsys, str(bad))
    out = tmp_path / "x.safetensors"
    assert main(["export", str(bad), "--head", "L1H2", "--out", str(out)]) == 2
    _one_line(capsys, str(bad))
    assert not out.exists()


def test_huge_declared_factors_are_refused_before_anything_is_expanded(run, tmp_path, capsys):
    from qkcov.run_tensors import load_run_tensors, read_delta

    prefix = "L1H2.feature.pooled."

    def factored(t):
        t = {k: v for k, v in t.items() if not k.startswith(prefix + "delta")}
        t[prefix + "delta_left"] = torch.ones(20000, 1, dtype=torch.float64)
        t[prefix + "delta_right"] = torch.ones(20000, 1, dtype=torch.float64)
        return t

    bad = _tampered(run, tmp_path / "bad", tensors=factored)
    assert (bad / "run.safetensors").stat().st_size < 2_000_000
    start = time.process_time()
    with pytest.raises(ValueError, match=r"delta_left/delta_right: shapes \[20000, 1\]"):
        load_run_tensors(bad / "run.safetensors")  # from the header, before reading tensors
    with pytest.raises(ValueError, match="expected"):
        read_delta(load_tensors(bad / "run.safetensors"), prefix)  # bounded by key_basis
    assert main(["compare", str(bad), str(run)]) == 2
    _one_line(capsys, "20000")
    assert time.process_time() - start < 60  # no 20000 × 20000 SVD (that took minutes)


def test_fifo_section_in_a_run_folder_is_refused_not_blocking(run, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    (bad / "sub").mkdir()
    os.mkfifo(bad / "sub" / "section.json")
    assert main(["report", str(bad)]) == 2  # returns: nothing opened the FIFO for reading
    _one_line(capsys, "section.json is a FIFO")
    assert not (tmp_path / ".bad.lock").exists()


@pytest.mark.parametrize("kind", ["fifo", "devnull"])
def test_records_that_are_not_a_regular_file_are_named_as_such(tmp_path, capsys, kind):
    path = tmp_path / "records.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path = Path("/dev/null")
    argv = ["run", "--data", str(path), "--model", "/nonexistent", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    line = _one_line(capsys, str(path))
    assert "not found" not in line
    assert ("is a FIFO" if kind == "fifo" else "is a character device") in line


def test_heads_auto_beyond_the_model_is_refused(tmp_path, tiny_dir, capsys):
    from qkcov.tasks.records import save_records
    from test_user_files import _records

    data = tmp_path / "r.jsonl"
    save_records(data, _records())
    argv = ["run", "--data", str(data), "--model", str(tiny_dir), "--heads", "auto:999"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    _one_line(capsys, "auto:999", "heads", "K <=")


def test_broken_local_model_folder_is_one_line_without_a_hub_url(tmp_path, capsys):
    from qkcov.tasks.records import save_records
    from test_user_files import _records

    data = tmp_path / "r.jsonl"
    save_records(data, _records())
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "README.md").write_text("not a model")
    argv = ["run", "--data", str(data), "--model", str(broken), "--out", str(tmp_path / "o")]
    assert main([*argv, "--quiet"]) == 2
    line = _one_line(capsys, str(broken), "config.json")
    assert "huggingface.co" not in line


# --------------------------------------------------------------------------- subspaces
def _subspace(**changes) -> Subspace:
    from qkcov.core.subspace import random_orthonormal

    D = 16
    kw = dict(
        layer=1, head=2, feature="f", group="pooled",
        query_directions=random_orthonormal(D, D, seed=1).double(),
        key_directions=random_orthonormal(D, D, seed=2).double(),
        singular_values=torch.linspace(1, 0, D, dtype=torch.float64), rank=3, rank_rule="fixed",
        ranks={"causal": None, "null": None, "energy": 3}, model="tiny",
        model_info={"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16},
    )  # fmt: skip
    kw.update(changes)
    return Subspace(**kw)


def _nan_basis():
    from qkcov.core.subspace import random_orthonormal

    b = random_orthonormal(16, 16, seed=2).double()
    b[3, 0] = float("nan")
    return b


BAD_SUBSPACES = {
    "scaled x10": (lambda: dict(key_directions=_subspace().key_directions * 10), "key_directions: columns are not orthonormal"),
    "NaN direction": (lambda: dict(key_directions=_nan_basis()), "key_directions: holds NaN"),
    "head -1": (lambda: dict(head=-1), "head: expected an integer >= 0, got -1"),
    "head -10": (lambda: dict(head=-10), "head: expected an integer >= 0, got -10"),
    "rank -3": (lambda: dict(rank=-3), "rank: expected an integer [0, 16], got -3"),
    "rank 17": (lambda: dict(rank=17), "rank: expected an integer [0, 16], got 17"),
    "frame": (lambda: dict(frame="sideways"), "frame: expected one of post-rope, query"),
    "singular values": (lambda: dict(singular_values=torch.ones(3)), "singular_values: expected [16]"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_SUBSPACES))
def test_bad_subspace_is_refused_at_construction_naming_the_field(case):
    changes, message = BAD_SUBSPACES[case]
    with pytest.raises(ValueError, match=None) as info:
        _subspace(**changes())
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["scaled x10", "NaN direction", "head -1", "rank -3"])
def test_bad_subspace_file_is_refused_on_load(tmp_path, case):
    from safetensors.torch import save_file

    good = _subspace()
    path = good.save(tmp_path / "s.safetensors")
    meta = good.to_json()
    tensors = {
        k: getattr(good, k).double().contiguous()
        for k in ("query_directions", "key_directions", "singular_values")
    }
    changes = BAD_SUBSPACES[case][0]()
    if "head" in changes:
        meta["head_index"] = changes["head"]
    if "rank" in changes:
        meta["rank"] = changes["rank"]
    tensors.update({k: v.contiguous() for k, v in changes.items() if isinstance(v, torch.Tensor)})
    save_file(tensors, str(path), metadata={"qkcov_subspace": json.dumps(meta)})
    with pytest.raises(ValueError) as info:
        Subspace.load(path)
    assert str(path) in str(info.value) and BAD_SUBSPACES[case][1] in str(info.value)


def test_subspace_changed_in_place_is_refused_before_any_forward():
    from qkcov.models.apply import ablate, swap

    model = tiny_model("llama")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    sub = _subspace(model_info={})
    ids = torch.ones(1, 6, dtype=torch.long)
    for change, message in [
        (lambda s: setattr(s, "key_directions", s.key_directions * 10), "not orthonormal"),
        (lambda s: setattr(s, "head", -1), "head: expected an integer >= 0"),
        (lambda s: setattr(s, "head", 99), "head 99 is past the model's"),
        (lambda s: setattr(s, "frame", "query"), "'query' frame"),
    ]:
        s = _subspace(model_info={})
        change(s)
        for edit in (lambda s=s: swap(model, s, 1, 2), lambda s=s: ablate(model, s)):
            with pytest.raises(ValueError, match=message), edit():
                model(input_ids=ids)
    assert not calls and sub.rank == 3


def test_integrations_validate_the_subspace():
    from qkcov.integrations.transformer_lens import ablate_hooks, swap_hooks

    s = _subspace()
    s.head = -1
    with pytest.raises(ValueError, match="head: expected an integer >= 0"):
        swap_hooks(s, 1, 2)
    s = _subspace()
    s.key_directions = s.key_directions * 10
    with pytest.raises(ValueError, match="not orthonormal"):
        ablate_hooks(s)


def test_subspace_file_the_user_edited_is_not_overwritten(tmp_path):
    path = _subspace().save(tmp_path / "s.safetensors")
    _subspace(rank=2).save(path)  # qkcov's own, unchanged: replaced
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a qkcov subspace file qkcov wrote"):
        _subspace().save(path)
    assert path.read_bytes() == bytes(data)
    _subspace().save(path, force=True)


def test_run_json_that_is_a_list_in_the_index_is_one_line(run, tmp_path, capsys):
    root = tmp_path / "runs"
    root.mkdir()
    _tampered(run, root / "a", info=lambda d: [d])
    shutil.copytree(run, root / "b")
    assert main(["report", str(root)]) == 2
    _one_line(capsys, "run.json", "expected a JSON object")
    assert not (root / "index.html").exists()


def test_json_depth_and_type_are_one_line(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_json(deep)
    write_json(tmp_path / "list.json", [1, 2])
    with pytest.raises(ValueError, match="expected a JSON object, got a JSON list"):
        read_json(tmp_path / "list.json", expect=dict)


def test_delta_of_pure_rounding_noise_is_zero_with_no_rank():
    from qkcov.core.covariance import ContrastiveCovariance
    from qkcov.core.subspace import feature_subspace

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    order = torch.randperm(64, generator=g)
    acc = ContrastiveCovariance(16, 16)
    acc.update(q, k, None)
    acc.update(q[order], None, k[order])  # the same pairs summed in another order
    pos, neg = acc.second_moments()
    noise = float((pos - neg).abs().max())
    assert 0 < noise <= 2.5e-15  # the rounding the issue saw as "rank (energy) 6"
    assert feature_subspace(pos - neg).rank > 0
    delta = acc.delta()
    assert not bool(delta.any()) and feature_subspace(delta).rank == 0
    acc2 = ContrastiveCovariance(16, 16)
    acc2.update(q, k, k + 1e-6)  # a small but real difference stays
    assert bool(acc2.delta().any())


def test_zero_delta_is_said_in_the_run_notes():
    from types import SimpleNamespace

    from qkcov.pipeline.steps.contrast import _zero_delta_notes

    zero = SimpleNamespace(pooled=SimpleNamespace(delta=torch.zeros(4, 4)))
    real = SimpleNamespace(pooled=SimpleNamespace(delta=torch.eye(4)))
    heads = [SimpleNamespace(name="L0H1", features={"a": zero, "b": real})]
    (note,) = _zero_delta_notes(heads)
    assert note.startswith("L0H1 a: ΔC is numerically zero") and "no rank" in note


@pytest.mark.parametrize("field,value", [("head", -1), ("layer", 99), ("head", "2")])
def test_head_numbers_of_run_json_are_range_checked_on_load(run, tmp_path, capsys, field, value):
    def edit(d):
        d["heads"][0][field] = value
        return d

    bad = _tampered(run, tmp_path / "bad", info=edit)
    out = tmp_path / "s.safetensors"
    assert main(["export", str(bad), "--head", "L1H2", "--out", str(out)]) == 2
    _one_line(capsys, str(bad), f".{field}: expected an integer", repr(value))
    assert not out.exists()

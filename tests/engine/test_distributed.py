"""Sharded runs (2 gloo processes on CPU) and checkpoint/resume after a SIGKILL, on a float64
tiny Llama: results must equal the one-process, uninterrupted run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkcov.artifacts import load_tensors, read_tensor_metadata
from qkcov.engine.checkpoint import Checkpoint, data_hash
from qkcov.engine.contrast import run_contrast
from qkcov.engine.distributed import (
    Dist,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_objects,
    shard_batches,
)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_worker as worker  # noqa: E402

SRC = str(HERE.parents[1] / "src")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _worker(out: Path, mode: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / "dist_worker.py"), str(out), mode],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
    """One-process results (in this process) of the same worker code."""
    model, tok, resolved = worker.build()
    return (model, tok, resolved), worker.run_all(model, tok, resolved)


# --------------------------------------------------------------------------- one process
def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = Dist.from_env()
    assert (d.rank, d.world_size, d.is_main, d.enabled, d.backend) == (0, 1, True, False, None)
    t = torch.arange(3, dtype=torch.float64)
    assert all_reduce_sum([t], d)[0] is t and t.tolist() == [0, 1, 2]
    assert gather_objects({"a": 1}, d) == [{"a": 1}]
    assert broadcast_object(5, d) == 5
    barrier(d)
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        monkeypatch.setenv("WORLD_SIZE", "two")
        Dist.from_env()


def test_shard_batches_are_whole_batches_round_robin():
    one = shard_batches(10, 3, None)
    assert one == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    r0 = shard_batches(10, 3, Dist(0, 3))
    r1 = shard_batches(10, 3, Dist(1, 3))
    r2 = shard_batches(10, 3, Dist(2, 3))
    assert r0 == [range(0, 3), range(9, 10)] and r1 == [range(3, 6)] and r2 == [range(6, 9)]
    assert shard_batches(2, 3, Dist(1, 2)) == []  # more ranks than batches
    with pytest.raises(ValueError, match="batch_size"):
        shard_batches(10, 0)


# --------------------------------------------------------------------------- two processes
def test_two_gloo_processes_equal_one_process(reference, tmp_path):
    _, ref = reference
    port = str(_free_port())
    procs = [
        _worker(
            tmp_path / f"rank{r}.safetensors",
            "dist",
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    for r in range(2):
        path = tmp_path / f"rank{r}.safetensors"
        assert read_tensor_metadata(path) == {"rank": r, "world_size": 2}
        got = load_tensors(path)
        assert set(got) == set(ref)
        for h in worker.HEADS:
            for group in range(2):
                for side in ("pos", "neg"):
                    key = f"{h[0]}.{h[1]}.qk_{side}"
                    a, b = got[key][group], ref[key][group]
                    rel = float((a - b).norm() / b.norm())
                    assert rel <= 1e-12, (r, key, group, rel)
            n = f"{h[0]}.{h[1]}.n_pos"
            assert torch.equal(got[n], ref[n]) and float(ref[n].sum()) == 14
        torch.testing.assert_close(got["rows"], ref["rows"], rtol=0, atol=0)
        for key in ref:
            if ".vec." in key:
                torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)


# --------------------------------------------------------------------------- checkpoints
def _sums(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)


def test_sigkill_then_resume_equals_uninterrupted_run(reference, tmp_path):
    (model, tok, resolved), _ = reference
    # uninterrupted reference with the same settings, in this process
    full = run_contrast(model, tok, resolved, worker.HEADS, batch_size=worker.BATCH, progress=False)
    ckpt = tmp_path / "run.ckpt.safetensors"
    p = _worker(
        tmp_path / "a.safetensors", "ckpt", QKCOV_TEST_CKPT=str(ckpt), QKCOV_TEST_KILL_AFTER="2"
    )
    out, _ = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL, out
    assert not (tmp_path / "a.safetensors").exists()
    assert read_tensor_metadata(ckpt)["next_batch"] == 2  # 2 of 5 batches were saved

    p = _worker(
        tmp_path / "b.safetensors", "ckpt", QKCOV_TEST_CKPT=str(ckpt), QKCOV_TEST_RESUME="1"
    )
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert read_tensor_metadata(tmp_path / "b.safetensors")["meta"]["resumed_at_batch"] == 2
    assert read_tensor_metadata(ckpt)["next_batch"] == 5
    got = _sums(tmp_path / "b.safetensors")
    for h in worker.HEADS:
        for key, ref in full.accumulators[h].sum_tensors().items():
            # same batches summed in the same order: bit-identical
            assert torch.equal(got[f"{h[0]}.{h[1]}.{key}"], ref), (h, key)


def test_resume_with_other_settings_or_data_is_refused(reference, tmp_path):
    (model, tok, resolved), _ = reference
    heads = worker.HEADS[:1]
    ck = Checkpoint(tmp_path / "c.safetensors", {"model": "tiny", "energy": 0.99}, every=2)
    first = run_contrast(model, tok, resolved, heads, batch_size=3, progress=False, checkpoint=ck)
    assert read_tensor_metadata(ck.file())["next_batch"] == 5  # saved after 2, 4 and 5 batches

    def resume(fp=None, res=resolved, bs=3):
        c = Checkpoint(ck.path, fp or {"model": "tiny", "energy": 0.99}, every=2, resume=True)
        return run_contrast(model, tok, res, heads, batch_size=bs, progress=False, checkpoint=c)

    # a finished checkpoint resumes to the same result without running a batch
    again = resume()
    assert again.meta["resumed_at_batch"] == 5
    assert torch.equal(again.delta(heads[0]), first.delta(heads[0]))
    with pytest.raises(
        ValueError,
        match=r"--resume: checkpoint in .*c\.safetensors was made with different settings or data: field 'energy' differs",
    ):
        resume({"model": "tiny", "energy": 0.9})
    _, _, other = worker.build(shift=1)
    with pytest.raises(ValueError, match="different settings or data: field 'records' differs"):
        resume(res=other)
    with pytest.raises(ValueError, match="field 'batch_size' differs"):
        resume(bs=4)
    with pytest.raises(ValueError, match="every must be a positive integer"):
        Checkpoint(ck.path, {}, every=0)
    assert data_hash({"a": (1, 2)}) == data_hash({"a": [1, 2]}) != data_hash({"a": [2, 1]})


def test_checkpoint_file_per_rank(tmp_path):
    ck = Checkpoint(tmp_path / "run.safetensors", {})
    assert ck.file(Dist(1, 2)) == tmp_path / "run.rank1.safetensors"
    assert ck.file(Dist()) == ck.file(None) == tmp_path / "run.safetensors"

"""Research scale through the CLI: `torchrun -m qkcov run|contrast` on 2 CPU processes (gloo)
equals one process; `qkcov run --resume` after `kill -9` equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from qkcov.artifacts import load_tensors, read_json
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.run_tensors import load_run_tensors
from qkcov.tasks.builtin import build_task_records
from qkcov.tasks.records import save_records

FLAGS = ["--heads", "L0H1,L1H2", "--dtype", "float64", "--batch-size", "4", "--quiet",
         "--n-random", "20", "--n-permutations", "20", "--n-bootstrap", "10"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    model = root / "tiny64"
    tiny_model("llama").to(torch.float64).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    data = root / "agreement.jsonl"
    save_records(data, build_task_records("agreement", n=40))
    return root, model, data


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _qkcov(*args: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "qkcov"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc_per_node={nproc}", "-m", "qkcov"]  # fmt: skip
    proc = subprocess.run([*launch, *args], env=_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"qkcov {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def _deltas(out) -> dict[str, torch.Tensor]:
    tensors = load_run_tensors(out / "run.safetensors")  # factored ΔCs made dense
    return {k: v for k, v in tensors.items() if k.endswith(".delta")}


@pytest.mark.parametrize("command,heads", [("contrast", None), ("run", None), ("run", "auto:2")])
def test_two_processes_equal_one(command, heads, setup):
    """``auto:2``: the one pass over the build records (scan rows and every head's q/k) is
    sharded by batch too; the ranks' scan rows are gathered before the heads are picked."""
    root, model, data = setup
    flags = FLAGS if heads is None else [heads if f == "L0H1,L1H2" else f for f in FLAGS]
    outs = {}
    for nproc in (1, 2):
        out = root / f"{command}-{heads}-{nproc}"
        proc = _qkcov(
            command,
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            *flags,
            nproc=nproc,
        )
        assert proc.stdout.count("report: ") == 1  # under torchrun only rank 0 prints
        outs[nproc] = out
    one, two = _deltas(outs[1]), _deltas(outs[2])
    assert one.keys() == two.keys() and len(one) >= 6  # 2 heads x (2 groups + pooled)
    for k in one:
        rel = float((one[k] - two[k]).norm() / one[k].norm())
        assert rel <= 1e-12, (k, rel)
    a, b = read_json(outs[1] / "run.json"), read_json(outs[2] / "run.json")
    if heads is not None:
        assert [h["name"] for h in a["scan"]] == [h["name"] for h in b["scan"]]
        assert [h["diff"] for h in a["scan"]] == pytest.approx([h["diff"] for h in b["scan"]])
    for ha, hb in zip(a["heads"], b["heads"], strict=True):
        assert (
            ha["rank"] == hb["rank"]
            and ha["significance"]["p_value"] == hb["significance"]["p_value"]
        )
        if command == "run":
            assert ha["swap"] == pytest.approx(hb["swap"], abs=1e-12)


def _strip(info: dict) -> dict:
    """All but timings and the command line (which names --out and --resume)."""
    out = {k: v for k, v in info.items() if k not in ("seconds", "timings_s")}
    if "provenance" in out:
        out["provenance"] = {k: v for k, v in out["provenance"].items() if k != "command_line"}
    return out


def test_resume_after_kill_equals_uninterrupted(setup):
    root, model, data = setup
    args = ["run", "--model", str(model), "--data", str(data), *FLAGS, "--checkpoint-every", "1"]
    ref = root / "ref"
    _qkcov(*args, "--out", str(ref))

    out = root / "killed"
    ckpt = root / ".killed.checkpoint"
    proc = subprocess.Popen([sys.executable, "-m", "qkcov", *args, "--out", str(out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (ckpt / "head-L0H1.json").is_file():  # first head done, second still running
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing half-written

    changed = _qkcov(*args, "--out", str(out), "--resume", "--seed", "7", check=False)
    assert (
        changed.returncode == 2
        and "--resume" in changed.stderr
        and "--seed differs" in changed.stderr
    )

    _qkcov(*args, "--out", str(out), "--resume")
    assert _strip(read_json(out / "run.json")) == _strip(read_json(ref / "run.json"))
    ta, tb = load_tensors(out / "run.safetensors"), load_tensors(ref / "run.safetensors")
    assert ta.keys() == tb.keys(), set(ta) ^ set(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [
        k for k in ta if not torch.equal(ta[k], tb[k])
    ]
    assert not ckpt.exists()  # a finished run removes its checkpoints

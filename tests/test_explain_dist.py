"""``qkcov explain`` gives the same sums and shares whatever the process count (2 gloo
processes on CPU against one), the batch size and the padding.

Also a worker: ``python test_explain_dist.py OUT`` joins the process group from torchrun-style
environment variables, runs :func:`qkcov.engine.explain.explain_heads` with ``dist`` and saves
every :class:`~qkcov.core.explain.LayerSums` tensor field and every share to ``OUT``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkcov.core.explain import LayerSums

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent / "src")
HEADS = [(0, 1), (0, 3), (1, 0), (1, 2)]
HYPS = ["previous-token", "offset:2-4", "same-token", "induction", "first-token", "delimiter",
        "capitalised", "number"]  # fmt: skip
#: documents of very different lengths, so that batches of 4 pad
TEXTS = [
    "The cat sat on the mat. The cat sat on the mat again.",
    "abc abc 42!",
    "Anna met Ben; Ben met Anna, and then Carl came.",
    "x y z x y z x y z",
    "Hi.",
    "One two three four five six seven eight nine ten eleven twelve, 1 2 3 4 5 6 7 8 9 10.",
    "Red, green; blue. Red green blue?",
    "qq",
    "The quick brown fox jumps over the lazy dog. The quick brown fox.",
    "a1 b2 c3 a1 b2 c3",
    "Ok ok OK",
]


def _plan(max_len: int = 48):
    from qkcov.engine.explain import plan_corpus, tokenize_corpus
    from qkcov.models.tiny import tiny_tokenizer
    from qkcov.tasks.hypotheses import resolve_hypotheses

    seqs = tokenize_corpus(tiny_tokenizer(), TEXTS, max_len=max_len)
    return plan_corpus(seqs, resolve_hypotheses(HYPS))


def _model():
    from qkcov.models.tiny import tiny_model

    return tiny_model("llama").to(torch.float64)


def _explain(model, plan, batch_size: int, dist=None, pad_id: int = 0):
    from qkcov.engine.explain import explain_heads

    return explain_heads(model, plan, HEADS, batch_size=batch_size, progress=False, pad_id=pad_id,
                         max_rank=4, dist=dist)  # fmt: skip


def _flat(out, sums) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every tensor field of every layer's sums, and every head's shares and rest."""
    tensors = {
        f"{layer}.{f.name}": getattr(acc, f.name).clone()
        for layer, acc in sums.items()
        for f in dataclasses.fields(acc)
        if isinstance(getattr(acc, f.name), torch.Tensor)
    }
    for layer, acc in sums.items():
        tensors[f"{layer}.scaling"] = torch.tensor(float(acc.scaling), dtype=torch.float64)
    shares = {f"{h.name}.unexplained": h.unexplained for h in out}
    shares.update({f"{h.name}.{x.name}": x.share for h in out for x in h.hypotheses})
    return tensors, shares


def _assert_same(a, b, rtol: float, what: str) -> None:
    ta, sa = a
    tb, sb = b
    probe = LayerSums([0], 1, 2)  # every tensor field of both layers, and the scaling
    n = sum(isinstance(getattr(probe, f.name), torch.Tensor) for f in dataclasses.fields(probe))
    assert ta.keys() == tb.keys() and len(ta) == 2 * (n + 1), sorted(set(ta) ^ set(tb))
    for k in ta:
        scale = float(tb[k].abs().max()) if tb[k].numel() else 0.0
        torch.testing.assert_close(ta[k], tb[k], rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, k=k: f"{what}: {k}: {m}")  # fmt: skip
    assert sa.keys() == sb.keys() and len(sa) == len(HEADS) * (len(HYPS) + 1)
    for k in sa:
        assert sa[k] == pytest.approx(sb[k], rel=rtol, abs=rtol), (what, k, sa[k], sb[k])


# --------------------------------------------------------------------------- worker
def _worker_main(out: str) -> None:
    from qkcov.artifacts import save_tensors
    from qkcov.engine.distributed import Dist

    torch.set_num_threads(1)
    dist = Dist.from_env()
    model, plan = _model(), _plan()
    result = {}
    # 3 per batch: several batches per rank; 64: one batch, so rank 1 runs none
    for bs in (3, 64):
        tensors, shares = _flat(*_explain(model, plan, bs, dist))
        save_tensors(f"{out}.bs{bs}.safetensors", tensors)
        result[bs] = shares
    Path(f"{out}.json").write_text(json.dumps({"rank": dist.rank, "world": dist.world_size,
                                               "shares": result}))  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}  # fmt: skip
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _load(out: Path, bs: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    from qkcov.artifacts import load_tensors

    info = json.loads(Path(f"{out}.json").read_text())
    return load_tensors(Path(f"{out}.bs{bs}.safetensors")), info["shares"][str(bs)]


def test_two_processes_equal_one(tmp_path):
    """Sums (every tensor field of LayerSums, and the layer's scaling) and shares of 2 gloo
    processes equal one process' to 1e-10, on every rank; also when rank 1 gets no batch."""
    port = str(_free_port())
    runs = {"one": [("0", "1")], "two": [("0", "2"), ("1", "2")]}
    procs = []
    for name, ranks in runs.items():
        for rank, world in ranks:
            env = _env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)  # fmt: skip
            out = tmp_path / f"{name}{rank}"
            cmd = [sys.executable, str(Path(__file__).resolve()), str(out)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))  # fmt: skip
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log
    for bs in (3, 64):
        ref = _load(tmp_path / "one0", bs)
        assert float(ref[0]["0.n_rows"]) > 100  # the corpus ran
        for rank in (0, 1):
            _assert_same(_load(tmp_path / f"two{rank}", bs), ref, 1e-10, f"bs {bs} rank {rank}")


def test_batch_size_and_padding_do_not_change_results():
    """Batch size 1 (no padding) against 4 (sequences of different lengths padded together)
    and another pad id: equal up to the float32 rounding of each batch's sums (the update
    runs in float32), while a padding position that leaked in would change them at O(1)."""
    torch.manual_seed(0)
    model, plan = _model(), _plan()
    lens = [len(s) for s in plan.seqs]
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    padded = [order[s : s + 4] for s in range(0, len(order), 4)]
    assert any(len({lens[i] for i in b}) > 1 for b in padded)  # batches of 4 do pad
    one = _flat(*_explain(model, plan, 1))
    four = _flat(*_explain(model, plan, 4))
    _assert_same(four, one, 2e-5, "batch 4 vs 1")
    _assert_same(_flat(*_explain(model, plan, 4, pad_id=7)), four, 2e-5, "pad id 7 vs 0")


def test_cli_under_torchrun_rank0_writes_and_prints_once(tiny_dir, tmp_path):
    """``torchrun --nproc_per_node=2 -m qkcov explain``: one summary, one folder, the
    one-process explain.json (every share to 1e-10)."""
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(TEXTS))
    outs, printed = {}, {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        launch = [sys.executable, "-m", "qkcov"]
        if nproc > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc_per_node={nproc}", "-m", "qkcov"]  # fmt: skip
        args = ["explain", "--model", str(tiny_dir), "--text", str(txt), "--out", str(out),
                "--quiet", "--batch-size", "2", "--max-len", "32", "--device", "cpu"]  # fmt: skip
        proc = subprocess.run([*launch, *args], env=_env(), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[nproc], printed[nproc] = out, proc.stdout
    assert printed[2].count("atlas: ") == 1 and printed[2].count("rest ") == printed[1].count(
        "rest "
    )
    assert not list(tmp_path.glob(".out2*"))  # no staging or lock left by another rank
    a = json.loads((outs[1] / "explain.json").read_text())
    b = json.loads((outs[2] / "explain.json").read_text())
    assert [h["name"] for h in a["heads"]] == [h["name"] for h in b["heads"]]
    assert len(a["heads"]) == a["shape"]["n_layers"] * a["shape"]["n_heads"]
    for ha, hb in zip(a["heads"], b["heads"], strict=True):
        assert [x["name"] for x in ha["hypotheses"]] == [x["name"] for x in hb["hypotheses"]]
        assert ha["unexplained"] == pytest.approx(hb["unexplained"], rel=1e-10, abs=1e-10)
        for xa, xb in zip(ha["hypotheses"], hb["hypotheses"], strict=True):
            assert xa["share"] == pytest.approx(xb["share"], rel=1e-10, abs=1e-10), ha["name"]
            assert xa["n_pairs"] == xb["n_pairs"]
    assert a["example"] == b["example"]


if __name__ == "__main__":
    sys.path.insert(0, SRC)
    _worker_main(sys.argv[1])

"""Attention-only payload-retrieval head of the simplified setting, trained batched over cells.

``q = W_Q x_q``, ``k_i = W_K x_i``, ``v_i = W_V x_i``; ``a = softmax(q·k / √d_head)`` over the
context; ``logits = W_O Σ_i a_i v_i + b_O``; cross-entropy on the target's payload class.
All parameters carry a leading cell dimension ``K`` so a whole grid trains as one model
(cells never interact: the loss is a sum of per-cell losses and Adam is element-wise).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigMixin, check_positive_int, check_range
from .data import ToyBatch, ToyConfig, ToyDGP, make_dgp

__all__ = ["TrainConfig", "ToyModel", "TrainResult", "train_cells", "evaluate"]


@dataclass
class TrainConfig(ConfigMixin):
    """Optimisation settings (shared by every cell trained together).

    Attributes:
        batch_size: sequences per cell per step.
        lr: Adam learning rate.
        min_steps: no cell stops before this many steps (lets the learned bilinear form
            settle; stopping at the first accurate step leaves weak directions).
        max_steps: hard cap on steps.
        eval_every: steps between validation checks.
        val_size: validation sequences per cell (fixed set).
        target_accuracy: a cell stops once ``val_acc ≥ target_accuracy × oracle_acc``
            (the oracle is the ideal dot-product matcher: 1 for binary latents).
        patience: a cell also stops after this many checks without improving by
            ``min_delta`` (plateau).
        min_delta: improvement that resets the plateau counter.
        seed: seeds the training/validation data stream.
        threads: torch intra-op threads (``0`` leaves torch's default). One is fastest for
            these small ops; the second core goes to the data producer (``prefetch``).
        prefetch: generate training batches in a background thread, overlapping with the
            optimisation step (deterministic: a single producer with its own generator).
    """

    batch_size: int = 512
    lr: float = 1e-2
    min_steps: int = 600
    max_steps: int = 3000
    eval_every: int = 50
    val_size: int = 2048
    target_accuracy: float = 0.99
    patience: int = 8
    min_delta: float = 1e-3
    seed: int = 0
    threads: int = 1
    prefetch: bool = True

    def __post_init__(self) -> None:
        check_positive_int("min_steps", self.min_steps, minimum=0)
        for name in ("batch_size", "max_steps", "eval_every", "val_size", "patience"):
            check_positive_int(name, getattr(self, name))
        check_range("lr", float(self.lr), 0.0, 10.0, low_open=True)
        check_range("target_accuracy", float(self.target_accuracy), 0.0, 1.0, low_open=True)
        check_range("min_delta", float(self.min_delta), 0.0, 1.0)
        check_positive_int("threads", self.threads, minimum=0)


class ToyModel(nn.Module):
    """``K`` independent single-head retrieval models.

    Parameters: ``W_Q, W_K, W_V [K, d_head, d_model]``, ``W_O [K, P, d_head]``, ``b_O [K, P]``.
    """

    def __init__(self, configs: Sequence[ToyConfig]) -> None:
        super().__init__()
        c0 = configs[0]
        K, D, H, P = len(configs), c0.d_model, c0.d_head, c0.n_payload
        self.configs = list(configs)
        self.d_head = H
        w = {name: torch.zeros(K, H, D) for name in ("W_Q", "W_K", "W_V")}
        w_o = torch.zeros(K, P, H)
        for k, c in enumerate(configs):
            gen = torch.Generator().manual_seed(c.cell_seed() + 1)
            for name in ("W_Q", "W_K", "W_V"):
                w[name][k] = torch.randn(H, D, generator=gen) / math.sqrt(D)
            w_o[k] = torch.randn(P, H, generator=gen) / math.sqrt(H)
        self.W_Q = nn.Parameter(w["W_Q"])
        self.W_K = nn.Parameter(w["W_K"])
        self.W_V = nn.Parameter(w["W_V"])
        self.W_O = nn.Parameter(w_o)
        self.b_O = nn.Parameter(torch.zeros(K, P))

    @property
    def n_cells(self) -> int:
        return self.W_Q.shape[0]

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """``x [K, *batch, d_model]`` → ``q [K, *batch, d_head]``."""
        return _apply(self.W_Q, x)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """``x [K, *batch, d_model]`` → ``k [K, *batch, d_head]``."""
        return _apply(self.W_K, x)

    def forward(self, x_q: torch.Tensor, x_ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_q [K, B, d_model]``, ``x_ctx [K, B, C, d_model]`` → ``(logits [K, B, P], attn [K, B, C])``."""
        q = self.queries(x_q)  # [K, B, H]
        k = self.keys(x_ctx)  # [K, B, C, H]
        v = _apply(self.W_V, x_ctx)
        attn = torch.softmax(torch.einsum("kbh,kbch->kbc", q, k) / math.sqrt(self.d_head), dim=-1)
        out = torch.einsum("kbc,kbch->kbh", attn, v)
        logits = torch.einsum("kbh,kph->kbp", out, self.W_O) + self.b_O[:, None, :]
        return logits, attn

    def cell_weights(self, i: int) -> dict[str, torch.Tensor]:
        """Detached weights of cell ``i`` (``W_Q [d_head, d_model]`` etc.)."""
        return {n: p[i].detach().clone() for n, p in self.named_parameters()}


def _apply(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-cell linear map: ``w [K, out, in]``, ``x [K, *batch, in]`` → ``[K, *batch, out]``."""
    K = w.shape[0]
    flat = x.reshape(K, -1, x.shape[-1])
    return torch.bmm(flat, w.transpose(1, 2)).reshape(*x.shape[:-1], w.shape[1])


@torch.no_grad()
def evaluate(model: ToyModel, batch: ToyBatch) -> dict[str, torch.Tensor]:
    """Per-cell ``accuracy``, ``loss`` and ``attn_on_target`` (mean attention on i*), each ``[K]``."""
    logits, attn = model(batch.x_q, batch.x_ctx)
    label = batch.label
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), label.reshape(-1), reduction="none"
    ).reshape(label.shape)
    return {
        "accuracy": (logits.argmax(-1) == label).float().mean(-1),
        "loss": loss.mean(-1),
        "attn_on_target": attn.gather(-1, batch.target[..., None])[..., 0].mean(-1),
    }


def _batches(dgp: ToyDGP, size: int, gen: torch.Generator, prefetch: bool) -> Iterator[ToyBatch]:
    """Endless training batches; with ``prefetch`` produced by a background thread."""
    if not prefetch:
        while True:
            yield dgp.sample_sequences(size, gen)
    q: queue.Queue[ToyBatch] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            b = dgp.sample_sequences(size, gen)
            while not stop.is_set():
                try:
                    q.put(b, timeout=0.1)
                    break
                except queue.Full:
                    continue

    worker = threading.Thread(target=produce, name="qkcov-toy-data", daemon=True)
    worker.start()
    try:
        while True:
            yield q.get()
    finally:
        stop.set()
        worker.join()


@dataclass
class TrainResult:
    """A trained batch of cells.

    ``val_accuracy``/``oracle_accuracy``/``attn_on_target`` are ``[K]``; ``steps [K]`` is the
    step at which each cell stopped; ``history`` holds ``(step, val_accuracy [K])`` checks.
    """

    model: ToyModel
    dgp: ToyDGP
    train_config: TrainConfig
    val_accuracy: torch.Tensor
    oracle_accuracy: torch.Tensor
    attn_on_target: torch.Tensor
    steps: torch.Tensor
    stop_reason: list[str]
    seconds: float
    history: list[tuple[int, list[float]]] = field(default_factory=list)


@torch.enable_grad()
def train_cells(
    configs: ToyConfig | Sequence[ToyConfig],
    train_config: TrainConfig | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train one model per config, all at once.

    Each cell stops individually (its parameters are frozen from then on) when its
    validation accuracy reaches ``target_accuracy × oracle`` or plateaus; training ends
    when every cell has stopped or at ``max_steps``.
    """
    if isinstance(configs, ToyConfig):
        configs = [configs]
    tc = train_config or TrainConfig()
    previous = torch.get_num_threads()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    try:
        return _train(list(configs), tc, progress)
    finally:
        torch.set_num_threads(previous)  # the thread count is process-wide: give it back


def _train(configs: list[ToyConfig], tc: TrainConfig, progress: bool) -> TrainResult:
    t0 = time.perf_counter()
    dgp = make_dgp(configs)
    model = ToyModel(configs)
    K = model.n_cells
    gen = torch.Generator().manual_seed(tc.seed)
    val = dgp.sample_sequences(tc.val_size, torch.Generator().manual_seed(tc.seed + 12345))
    oracle = dgp.oracle_accuracy(val)
    goal = tc.target_accuracy * oracle
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
    active = torch.ones(K, dtype=torch.bool)
    best = torch.zeros(K)
    stale = torch.zeros(K, dtype=torch.long)
    steps = torch.full((K,), tc.max_steps, dtype=torch.long)
    reason = ["max_steps"] * K
    history: list[tuple[int, list[float]]] = []
    acc = torch.zeros(K)
    bar = tqdm(
        total=tc.max_steps,
        desc=f"toy: training {K} cell(s)",
        disable=None if progress else True,
        leave=False,
    )
    batches = _batches(dgp, tc.batch_size, gen, tc.prefetch)
    try:
        for step in range(1, tc.max_steps + 1):
            batch = next(batches)
            logits, _ = model(batch.x_q, batch.x_ctx)
            # sum of per-cell mean losses: each cell's gradient is its own
            loss = (
                nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch.label.reshape(-1), reduction="sum"
                )
                / tc.batch_size
            )
            opt.zero_grad(set_to_none=False)
            loss.backward()
            if not bool(active.all()):
                frozen = [p.detach()[~active].clone() for p in model.parameters()]
                opt.step()
                with torch.no_grad():
                    for p, f in zip(model.parameters(), frozen, strict=True):
                        p[~active] = f
            else:
                opt.step()
            bar.update(1)
            if step % tc.eval_every == 0 or step == tc.max_steps:
                acc = evaluate(model, val)["accuracy"]
                history.append((step, acc.tolist()))
                improved = acc > best + tc.min_delta
                best = torch.maximum(best, acc)
                stale = torch.where(improved, torch.zeros_like(stale), stale + 1)
                ready = active & (step >= tc.min_steps)
                reached = ready & (acc >= goal)
                plateau = ready & ~reached & (stale >= tc.patience)
                for i in torch.nonzero(reached | plateau).flatten().tolist():
                    steps[i] = step
                    reason[i] = "target" if bool(reached[i]) else "plateau"
                active &= ~(reached | plateau)
                bar.set_postfix(active=int(active.sum()), min_acc=f"{float(acc.min()):.3f}")
                if not bool(active.any()):
                    break
    finally:
        bar.close()
        batches.close()
    final = evaluate(model, val)
    return TrainResult(
        model=model,
        dgp=dgp,
        train_config=tc,
        val_accuracy=final["accuracy"],
        oracle_accuracy=oracle,
        attn_on_target=final["attn_on_target"],
        steps=steps,
        stop_reason=reason,
        seconds=time.perf_counter() - t0,
        history=history,
    )

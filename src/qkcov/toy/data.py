"""Data-generating process of the simplified setting (METHOD §3) and contrast sampling.

Context token ``x_i = A1 z1_i + A2 z2_i + e(y_i) + noise`` (i = 1..C); query token
``x_q = B1 z1* + B2 z2* + noise`` with ``(z1*, z2*) = (z1_{i*}, z2_{i*})`` for a target
position ``i*``. ``A1, A2, B1, B2`` and the payload embedding ``e`` are fixed random maps.

Everything is batched over ``K`` independent *cells* (one cell = one DGP + one model),
so a whole experiment grid is simulated with a handful of tensor ops. Latent dimensions
are padded to a common ``L = max(N, M)``; padded coordinates are always zero and the
padded columns of the maps are zero, so padding changes nothing numerically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import ConfigMixin, check_positive_int, check_range

__all__ = [
    "VARIANTS",
    "FACTORS",
    "ToyConfig",
    "ToyDGP",
    "ToyBatch",
    "ContrastBatch",
    "make_dgp",
]

VARIANTS = ("binary", "gaussian")
FACTORS = ("z1", "z2", "both")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")


def check_factor(factor: str) -> None:
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {list(FACTORS)}, got {factor!r}")


@dataclass
class ToyConfig(ConfigMixin):
    """One cell of the simplified setting.

    Attributes:
        variant: ``"binary"`` (z ∈ {-1,+1}^N) or ``"gaussian"`` (z ~ N(0, I)).
        n_z1: N, dimension of latent z1.
        n_z2: M, dimension of latent z2.
        d_model: token dimension.
        d_head: query/key (and value) dimension of the head.
        context: C, number of context tokens.
        n_payload: P, number of payload classes.
        noise: std of the isotropic Gaussian noise added to every token.
        seed: seeds the fixed random maps and the model's initial weights.
    """

    variant: str = "binary"
    n_z1: int = 3
    n_z2: int = 3
    d_model: int = 32
    d_head: int = 16
    context: int = 16
    n_payload: int = 10
    noise: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        check_variant(self.variant)
        for name in ("n_z1", "n_z2", "d_model", "d_head", "n_payload"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("context", self.context, minimum=2)
        if self.n_z1 > self.d_model or self.n_z2 > self.d_model:
            raise ValueError(
                f"n_z1 and n_z2 must be <= d_model={self.d_model}, got {self.n_z1}, {self.n_z2}"
            )
        check_range("noise", float(self.noise), 0.0, 1e3)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def name(self) -> str:
        return f"{self.variant}_N{self.n_z1}_M{self.n_z2}_s{self.seed}"

    def cell_seed(self) -> int:
        """Deterministic per-cell seed (same cell → same maps/init whatever batch it is in)."""
        v = VARIANTS.index(self.variant)
        return (self.seed * 1_000_003 + v * 10_007 + self.n_z1 * 101 + self.n_z2) % (2**31)


@dataclass
class ToyBatch:
    """A batch of retrieval sequences for ``K`` cells.

    Shapes: ``x_ctx [K, B, C, d_model]``, ``x_q [K, B, d_model]``, ``target [K, B]``,
    ``payload [K, B, C]``, ``z1 [K, B, C, L]``, ``z2 [K, B, C, L]`` (padded latents).
    """

    x_ctx: torch.Tensor
    x_q: torch.Tensor
    target: torch.Tensor
    payload: torch.Tensor
    z1: torch.Tensor
    z2: torch.Tensor

    @property
    def label(self) -> torch.Tensor:
        """Payload class of the target token ``[K, B]``."""
        return self.payload.gather(-1, self.target[..., None])[..., 0]


@dataclass
class ContrastBatch:
    """Contrast pairs for one factor: ``x_q``, ``x_pos``, ``x_neg`` each ``[K, n, d_model]``."""

    factor: str
    x_q: torch.Tensor
    x_pos: torch.Tensor
    x_neg: torch.Tensor


class ToyDGP:
    """Fixed random maps of ``K`` cells, padded to a common latent width ``L``.

    Tensors: ``A1, A2, B1, B2 [K, d_model, L]`` (zero beyond N resp. M), ``E [K, P, d_model]``
    (payload embeddings as rows), ``mask1, mask2 [K, L]`` (active latent coordinates),
    ``binary [K]`` (variant per cell), ``noise [K]``.
    """

    def __init__(self, configs: Sequence[ToyConfig]) -> None:
        if not configs:
            raise ValueError("configs must hold at least one ToyConfig")
        first = configs[0]
        for c in configs:
            if (c.d_model, c.d_head, c.context, c.n_payload) != (
                first.d_model,
                first.d_head,
                first.context,
                first.n_payload,
            ):
                raise ValueError("cells trained together must share d_model, d_head, context, n_payload")
        self.configs = list(configs)
        self.d_model, self.context, self.n_payload = first.d_model, first.context, first.n_payload
        self.L = max(max(c.n_z1, c.n_z2) for c in configs)
        K, D, L, P = len(configs), self.d_model, self.L, self.n_payload
        self.A1, self.A2 = torch.zeros(K, D, L), torch.zeros(K, D, L)
        self.B1, self.B2 = torch.zeros(K, D, L), torch.zeros(K, D, L)
        self.E = torch.zeros(K, P, D)
        self.mask1 = torch.zeros(K, L, dtype=torch.bool)
        self.mask2 = torch.zeros(K, L, dtype=torch.bool)
        for k, c in enumerate(configs):
            gen = torch.Generator().manual_seed(c.cell_seed())
            # unit-norm-ish random columns: entries N(0, 1/d_model)
            scale = D**-0.5
            self.A1[k, :, : c.n_z1] = torch.randn(D, c.n_z1, generator=gen) * scale
            self.A2[k, :, : c.n_z2] = torch.randn(D, c.n_z2, generator=gen) * scale
            self.B1[k, :, : c.n_z1] = torch.randn(D, c.n_z1, generator=gen) * scale
            self.B2[k, :, : c.n_z2] = torch.randn(D, c.n_z2, generator=gen) * scale
            self.E[k] = torch.randn(P, D, generator=gen) * scale
            self.mask1[k, : c.n_z1] = True
            self.mask2[k, : c.n_z2] = True
        self.binary = torch.tensor([c.variant == "binary" for c in configs])
        self.noise = torch.tensor([float(c.noise) for c in configs])

    @property
    def n_cells(self) -> int:
        return len(self.configs)

    # ---------------------------------------------------------------- latents
    def _bshape(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Reshape a per-cell tensor ``[K, ...]`` to broadcast against ``[K, *batch, ...]``."""
        return t.reshape(t.shape[:1] + (1,) * (ndim - t.ndim) + t.shape[1:])

    def sample_latents(
        self, shape: Sequence[int], gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh ``(z1, z2)``, each ``[K, *shape, L]``; zero beyond N / M."""
        K, L = self.n_cells, self.L
        out = []
        for mask in (self.mask1, self.mask2):
            g = torch.randn(K, *shape, L, generator=gen)
            binary = self._bshape(self.binary, g.ndim)
            z = torch.where(binary, torch.sign(g), g)
            z = torch.where(z == 0, torch.ones_like(z), z) if bool(self.binary.any()) else z
            out.append(z * self._bshape(mask, g.ndim))
        return out[0], out[1]

    def _noise(self, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
        eps = torch.randn(self.n_cells, *shape, self.d_model, generator=gen)
        return eps * self._bshape(self.noise, eps.ndim)

    # --------------------------------------------------------------- encoders
    def encode_keys(
        self, z1: torch.Tensor, z2: torch.Tensor, payload: torch.Tensor | None, gen: torch.Generator
    ) -> torch.Tensor:
        """Key-side tokens ``A1 z1 + A2 z2 + e(y) + noise`` ``[K, *batch, d_model]``.

        ``z1, z2 [K, *batch, L]``; ``payload [K, *batch]`` class ids or ``None`` (no payload).
        """
        K = self.n_cells
        flat1, flat2 = z1.reshape(K, -1, self.L), z2.reshape(K, -1, self.L)
        x = flat1 @ self.A1.transpose(1, 2) + flat2 @ self.A2.transpose(1, 2)
        if payload is not None:
            idx = payload.reshape(K, -1, 1).expand(-1, -1, self.d_model)
            x = x + self.E.gather(1, idx)
        x = x.reshape(*z1.shape[:-1], self.d_model)
        return x + self._noise(z1.shape[1:-1], gen)

    def encode_query(self, z1: torch.Tensor, z2: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Query tokens ``B1 z1 + B2 z2 + noise`` ``[K, *batch, d_model]`` from ``z [K, *batch, L]``."""
        K = self.n_cells
        flat1, flat2 = z1.reshape(K, -1, self.L), z2.reshape(K, -1, self.L)
        x = flat1 @ self.B1.transpose(1, 2) + flat2 @ self.B2.transpose(1, 2)
        return x.reshape(*z1.shape[:-1], self.d_model) + self._noise(z1.shape[1:-1], gen)

    def random_payload(self, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.n_payload, (self.n_cells, *shape), generator=gen)

    # --------------------------------------------------------------- sampling
    def same_latents(
        self, z1a: torch.Tensor, z2a: torch.Tensor, z1b: torch.Tensor, z2b: torch.Tensor
    ) -> torch.Tensor:
        """Whether two latent pairs are identical on the active coordinates ``[K, *batch]``."""
        return (z1a == z1b).all(-1) & (z2a == z2b).all(-1)

    def sample_sequences(self, batch: int, gen: torch.Generator) -> ToyBatch:
        """``batch`` retrieval sequences per cell.

        Distractors are i.i.d. like the target; a binary distractor whose latents equal the
        target's exactly (an ambiguous sequence) gets one active coordinate flipped.
        """
        K, C = self.n_cells, self.context
        z1, z2 = self.sample_latents((batch, C), gen)
        target = torch.randint(0, C, (K, batch), generator=gen)
        payload = self.random_payload((batch, C), gen)
        if bool(self.binary.any()):
            t_idx = target[..., None, None].expand(-1, -1, 1, self.L)
            z1t, z2t = z1.gather(2, t_idx), z2.gather(2, t_idx)
            clash = self.same_latents(z1, z2, z1t, z2t)  # [K, B, C]
            clash &= torch.arange(C)[None, None, :] != target[..., None]
            if bool(clash.any()):
                flip_z1 = torch.rand(K, batch, C, generator=gen) < 0.5
                first = torch.zeros(self.L)
                first[0] = 1.0
                f1 = (clash & flip_z1)[..., None] * first
                f2 = (clash & ~flip_z1)[..., None] * first
                z1, z2 = z1 * (1 - 2 * f1), z2 * (1 - 2 * f2)
        x_ctx = self.encode_keys(z1, z2, payload, gen)
        t_idx = target[..., None, None].expand(-1, -1, 1, self.L)
        x_q = self.encode_query(z1.gather(2, t_idx)[:, :, 0], z2.gather(2, t_idx)[:, :, 0], gen)
        return ToyBatch(x_ctx=x_ctx, x_q=x_q, target=target, payload=payload, z1=z1, z2=z2)

    def oracle_accuracy(self, batch: ToyBatch) -> torch.Tensor:
        """Accuracy ``[K]`` of the ideal bilinear matcher ``argmax_i z*·z_i`` (noise-free).

        1 for binary latents; below 1 for Gaussian latents, where a distractor with a large
        norm can out-score the target under any dot-product match.
        """
        t_idx = batch.target[..., None, None].expand(-1, -1, 1, self.L)
        zt1, zt2 = batch.z1.gather(2, t_idx), batch.z2.gather(2, t_idx)
        score = (batch.z1 * zt1).sum(-1) + (batch.z2 * zt2).sum(-1)  # [K, B, C]
        return (score.argmax(-1) == batch.target).float().mean(-1)

    def sample_contrast(self, factor: str, n: int, gen: torch.Generator) -> ContrastBatch:
        """``n`` contrast triples (query, positive key, negative key) per cell for ``factor``.

        ``"z1"``: the positive key shares z1 with the query and has a fresh z2 that the
        negative key shares too; the negative key has a fresh z1. ``"z2"`` symmetrically;
        ``"both"``: the positive shares both, the negative has both fresh. Payload and noise
        are drawn independently for every token.
        """
        check_factor(factor)
        check_positive_int("n", n)
        zq1, zq2 = self.sample_latents((n,), gen)
        f1, f2 = self.sample_latents((n,), gen)  # fresh values
        if factor == "z1":
            pos, neg = (zq1, f2), (f1, f2)
        elif factor == "z2":
            pos, neg = (f1, zq2), (f1, f2)
        else:
            pos, neg = (zq1, zq2), (f1, f2)
        x_q = self.encode_query(zq1, zq2, gen)
        x_pos = self.encode_keys(*pos, self.random_payload((n,), gen), gen)
        x_neg = self.encode_keys(*neg, self.random_payload((n,), gen), gen)
        return ContrastBatch(factor=factor, x_q=x_q, x_pos=x_pos, x_neg=x_neg)

    def select(self, cells: Sequence[int]) -> ToyDGP:
        """A DGP restricted to some cells (shares no storage with ``self``)."""
        sub = ToyDGP.__new__(ToyDGP)
        idx = torch.as_tensor(list(cells), dtype=torch.long)
        sub.configs = [self.configs[i] for i in idx.tolist()]
        sub.d_model, sub.context, sub.n_payload, sub.L = (
            self.d_model,
            self.context,
            self.n_payload,
            self.L,
        )
        for name in ("A1", "A2", "B1", "B2", "E", "mask1", "mask2", "binary", "noise"):
            setattr(sub, name, getattr(self, name)[idx].clone())
        return sub

    def tensors(self) -> dict[str, torch.Tensor]:
        """Stacked maps for a safetensors artifact."""
        return {
            "A1": self.A1,
            "A2": self.A2,
            "B1": self.B1,
            "B2": self.B2,
            "E": self.E,
        }


def make_dgp(configs: ToyConfig | Sequence[ToyConfig]) -> ToyDGP:
    """Build the (batched) DGP for one config or a list of configs."""
    if isinstance(configs, ToyConfig):
        configs = [configs]
    return ToyDGP(configs)

"""Data-generating process of the simplified setting (METHOD §3) and contrast sampling.

Context token ``x_i = A1 z1_i + A2 z2_i + e(y_i) + noise`` (i = 1..C); query token
``x_q = B1 z1* + B2 z2* + noise`` with ``(z1*, z2*) = (z1_{i*}, z2_{i*})`` for a target
position ``i*``. ``A1, A2, B1, B2`` and the payload embedding ``e`` are fixed random maps.

Everything is batched over ``K`` independent *cells* (one cell = one DGP + one model),
so a whole experiment grid is simulated with a handful of tensor ops. Latent dimensions
are padded to a common ``L = max(N, M)``; padded coordinates are always zero and the
padded columns of the maps are zero, so padding changes nothing numerically.

Gaussian latents are drawn on the sphere by default (``latent_norm="sphere"``): ``z ~ N(0, I_N)``
rescaled to norm ``√N``. With raw Gaussian latents a distractor with a large norm out-scores
the target under any dot-product (bilinear) match, capping every attention head below 100%;
on the sphere the target is the unique maximiser of ``z*ᵀ z_i`` (Cauchy–Schwarz) while
``E[z zᵀ] = I`` is unchanged, so the analytic ΔC is the same. ``"raw"`` keeps plain Gaussians.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import ConfigMixin, check_positive_int, check_range

__all__ = [
    "check_factor",
    "check_variant",
    "check_latent_norm",
    "VARIANTS",
    "FACTORS",
    "LATENT_NORMS",
    "ToyConfig",
    "ToyDGP",
    "ToyBatch",
    "ContrastBatch",
    "make_dgp",
]

VARIANTS = ("binary", "gaussian")
FACTORS = ("z1", "z2", "both")
LATENT_NORMS = ("sphere", "raw")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")


def check_latent_norm(latent_norm: str) -> None:
    if latent_norm not in LATENT_NORMS:
        raise ValueError(f"latent_norm must be one of {list(LATENT_NORMS)}, got {latent_norm!r}")


def check_factor(factor: str) -> None:
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {list(FACTORS)}, got {factor!r}")


@dataclass
class ToyConfig(ConfigMixin):
    """One cell of the simplified setting.

    Attributes:
        variant: ``"binary"`` (z ∈ {-1,+1}^N) or ``"gaussian"`` (z ~ N(0, I), see
            ``latent_norm``).
        n_z1: N, dimension of latent z1.
        n_z2: M, dimension of latent z2.
        d_model: token dimension.
        d_head: query/key (and value) dimension of the head.
        context: C, number of context tokens.
        n_payload: P, number of payload classes.
        noise: std of the isotropic Gaussian noise added to every token.
        seed: seeds the fixed random maps and the model's initial weights.
        latent_norm: gaussian variant only. ``"sphere"`` (default) rescales each drawn
            ``z ~ N(0, I_N)`` to norm ``√N`` (uniform direction; ``E[z zᵀ] = I`` still), so
            every key has the same latent norm and the target is the unique bilinear
            maximiser; ``"raw"`` keeps the plain Gaussian, where a distractor with a larger
            norm can out-score the target under any dot-product head (accuracy ceiling
            recorded as ``oracle_accuracy``). Binary latents already have norm ``√N``.
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
    latent_norm: str = "sphere"

    def __post_init__(self) -> None:
        check_variant(self.variant)
        check_latent_norm(self.latent_norm)
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
        raw = "_raw" if self.variant == "gaussian" and self.latent_norm == "raw" else ""
        return f"{self.variant}{raw}_N{self.n_z1}_M{self.n_z2}_s{self.seed}"

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
    ``binary [K]`` (variant per cell), ``sphere [K]`` (gaussian cells with
    ``latent_norm="sphere"``), ``noise [K]``.
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
                raise ValueError(
                    "cells trained together must share d_model, d_head, context, n_payload"
                )
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
        self.sphere = torch.tensor(
            [c.variant == "gaussian" and c.latent_norm == "sphere" for c in configs]
        )
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
        """Fresh ``(z1, z2)``, each ``[K, *shape, L]``; zero beyond N / M.

        Binary cells: signs of ``N(0, 1)`` draws. Gaussian cells: ``N(0, I)``; with
        ``latent_norm="sphere"`` each vector is rescaled to norm ``√dim`` (uniform on that
        sphere, so ``E[z zᵀ] = I`` as for the other variants).
        """
        g = self._latents(shape, gen)
        return g[..., 0, :], g[..., 1, :]

    def _latents(self, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
        """``(z1, z2)`` stacked as one contiguous ``[K, *shape, 2, L]`` tensor (see above)."""
        g = torch.randn(self.n_cells, *shape, 2, self.L, generator=gen)
        if bool(self.binary.any()):
            signs = torch.copysign(torch.ones(()), g)  # ±1, never 0
            g = (
                signs
                if bool(self.binary.all())
                else torch.where(self._bshape(self.binary, g.ndim), signs, g)
            )
        mask = torch.stack([self.mask1, self.mask2], 1)  # [K, 2, L]
        g.mul_(self._bshape(mask, g.ndim))
        if bool(self.sphere.any()):
            # per-vector factor [K, *shape, 2, 1]: √dim / ‖z‖ on sphere cells, 1 elsewhere
            dim = mask.sum(-1, keepdim=True).to(g.dtype)  # [K, 2, 1]: N and M
            radius = self._bshape(dim.sqrt(), g.ndim)
            norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True).clamp_min_(1e-12)
            factor = torch.where(self._bshape(self.sphere, g.ndim), radius / norm, 1.0)
            g.mul_(factor)
        return g

    def second_moment(self, factor: str) -> torch.Tensor:
        """Exact ``E[z zᵀ] − E[z z'ᵀ]`` ``[K, L, L]`` of ``factor``'s latent under contrast sampling.

        ``z'`` is a fresh independent draw (``E[z z'ᵀ] = 0``, latents are zero-mean) and
        ``E[z zᵀ] = I`` for binary, raw Gaussian and sphere-normalised Gaussian latents alike
        (the sphere of radius ``√dim`` is isotropic: ``E[z zᵀ] = (‖z‖²/dim) I``); padded
        coordinates are zero. ``"both"`` is block-diagonal over ``(z1, z2)``: not returned.
        """
        check_factor(factor)
        if factor == "both":
            raise ValueError("second_moment takes factor 'z1' or 'z2'")
        mask = self.mask1 if factor == "z1" else self.mask2
        return torch.diag_embed(mask.to(torch.float64))

    def _noise(self, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
        eps = torch.randn(self.n_cells, *shape, self.d_model, generator=gen)
        return eps.mul_(self._bshape(self.noise, eps.ndim))

    # --------------------------------------------------------------- encoders
    def _linear(self, feats: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``feats [K, *batch, f]`` times per-cell ``maps [K, d_model, f]`` → ``[K, *batch, d_model]``."""
        K = self.n_cells
        flat = feats.reshape(K, -1, feats.shape[-1])
        return torch.bmm(flat, maps.transpose(1, 2)).reshape(*feats.shape[:-1], self.d_model)

    def encode_keys(
        self, z1: torch.Tensor, z2: torch.Tensor, payload: torch.Tensor | None, gen: torch.Generator
    ) -> torch.Tensor:
        """Key-side tokens ``A1 z1 + A2 z2 + e(y) + noise`` ``[K, *batch, d_model]``.

        ``z1, z2 [K, *batch, L]``; ``payload [K, *batch]`` class ids or ``None`` (no payload).
        """
        parts, maps = [z1, z2], [self.A1, self.A2]
        if payload is not None:
            parts.append(torch.nn.functional.one_hot(payload, self.n_payload).to(z1.dtype))
            maps.append(self.E.transpose(1, 2))
        x = self._linear(torch.cat(parts, -1), torch.cat(maps, -1))
        return x.add_(self._noise(z1.shape[1:-1], gen))

    def encode_query(
        self, z1: torch.Tensor, z2: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        """Query tokens ``B1 z1 + B2 z2 + noise`` ``[K, *batch, d_model]`` from ``z [K, *batch, L]``."""
        x = self._linear(torch.cat([z1, z2], -1), torch.cat([self.B1, self.B2], -1))
        return x.add_(self._noise(z1.shape[1:-1], gen))

    def random_payload(self, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.n_payload, (self.n_cells, *shape), generator=gen)

    # --------------------------------------------------------------- sampling
    def sample_sequences(self, batch: int, gen: torch.Generator) -> ToyBatch:
        """``batch`` retrieval sequences per cell.

        Distractors are i.i.d. like the target; a binary distractor whose latents equal the
        target's exactly (an ambiguous sequence) gets one active coordinate flipped (the
        first of z1 or of z2, at random).
        """
        K, C, L = self.n_cells, self.context, self.L
        z = self._latents((batch, C), gen).view(K, batch, C, 2 * L)  # [z1 | z2]
        target = torch.randint(0, C, (K, batch), generator=gen)
        payload = self.random_payload((batch, C), gen)
        t_idx = target[..., None, None].expand(-1, -1, 1, L)
        if bool(self.binary.any()):  # Gaussian latents coincide with probability 0
            zt = z.gather(2, t_idx.repeat(1, 1, 1, 2))
            clash = (z == zt).all(-1)
            clash &= torch.arange(C) != target[..., None]
            if bool(clash.any()):
                k, b, c = clash.nonzero(as_tuple=True)
                which = torch.randint(0, 2, (k.numel(),), generator=gen) * L
                z[k, b, c, which] = -z[k, b, c, which]
        z1, z2 = z[..., :L], z[..., L:]
        x_ctx = self.encode_keys(z1, z2, payload, gen)
        x_q = self.encode_query(z1.gather(2, t_idx)[:, :, 0], z2.gather(2, t_idx)[:, :, 0], gen)
        return ToyBatch(x_ctx=x_ctx, x_q=x_q, target=target, payload=payload, z1=z1, z2=z2)

    def oracle_accuracy(self, batch: ToyBatch) -> torch.Tensor:
        """Accuracy ``[K]`` of the ideal bilinear matcher ``argmax_i z*·z_i`` (noise-free).

        1 for binary and sphere-normalised Gaussian latents (equal norms: the target is the
        unique maximiser); below 1 for raw Gaussian latents, where a distractor with a large
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
        for name in ("A1", "A2", "B1", "B2", "E", "mask1", "mask2", "binary", "sphere", "noise"):
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

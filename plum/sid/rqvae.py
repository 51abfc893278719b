"""The SIDv2 residual-quantised autoencoder (modules and k-means only).

Shapes: N items, M content embeddings ("modalities") per item with widths
``d_m``, latent width D, L levels with codebook sizes ``V_l``.

::

    x_m [N, d_m] --(standardise)--> encoder_m (MLP) --> h_m [N, D]
    concat(h_1..h_M) --fuse (Linear, M > 1 only)--> z [N, D]
    residual quantisation: r_0 = z; c_l = argmin_k |r_l - C_l[k]|;
                           q_l = C_l[c_l]; r_{l+1} = r_l - q_l
    z_q = q_0 + ... + q_{L-1} --> decoder_m (MLP) --> x_hat_m [N, d_m]

The training loop, losses and the public API live in
:mod:`plumrec.sid.tokenizer`; this module is the model it trains.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["RQVAE", "kmeans", "mlp", "nearest"]


def mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


# k-means fits its centroids on at most this many points per centroid, a uniform sample of the rest (as faiss
# does by default): the seeding's k passes and the Lloyd steps then cost O(k^2), whatever the catalogue size
KMEANS_POINTS_PER_CENTROID = 256
# k-means++ seeding reads at most max(SEED_POINTS, SEED_POINTS_PER_CENTROID * k) of those points (a uniform
# draw), so its k sequential passes read a bounded set; catalogues of up to 65,536 items seed exactly as
# over all their points
SEED_POINTS = 65536
SEED_POINTS_PER_CENTROID = 64
# rows a nearest-centroid search takes in one distance matrix (CHUNK x k); above it, blocks of BLOCK_ROWS rows
# (a 1,024 x k block of distances stays in cache; a 65,536 x k matrix does not)
CHUNK = 65536
BLOCK_ROWS = 1024


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[n, k]`` (expanded form, clamped at 0)."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)[None]).clamp_min_(0)


def nearest(x: torch.Tensor, c: torch.Tensor, *, dist=_sq_dists,
            chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x [n, d]``'s nearest row of ``c [k, d]``: ``(index [n] int64, distance [n])`` under
    ``dist`` (``(x, c) -> [n, k]``, default squared Euclidean; ties go to the lowest index, as ``argmin``).

    Up to ``chunk`` rows: ``dist`` over all of them at once. More rows, with the squared or plain Euclidean
    distance (``torch.cdist``): blocks of :data:`BLOCK_ROWS` rows, each one ``addmm`` of ``|c|^2 - 2 x c^T``
    and a row minimum (memory ``BLOCK_ROWS x k``); another ``dist``: ``chunk`` rows at a time."""
    if x.shape[0] > chunk and (dist is _sq_dists or dist is torch.cdist):
        idx, d2 = _nearest_blocked(x, c)
        return idx, (d2 if dist is _sq_dists else d2.sqrt())
    idx, best = [], []
    for s in range(0, x.shape[0], chunk):
        dd = dist(x[s:s + chunk], c)
        i = dd.argmin(1)
        idx.append(i)
        best.append(dd.gather(1, i[:, None]).squeeze(1))
    if not idx:
        return torch.zeros(0, dtype=torch.int64), x.new_zeros(0)
    return torch.cat(idx), torch.cat(best)


def _nearest_blocked(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest rows of ``c`` and squared distances, :data:`BLOCK_ROWS` rows of ``x`` at a time."""
    c_sq, x_sq, c_t = c.pow(2).sum(1), x.pow(2).sum(1), c.T.contiguous()
    idx = torch.empty(x.shape[0], dtype=torch.int64)
    best = torch.empty(x.shape[0], dtype=x.dtype)
    for s in range(0, x.shape[0], BLOCK_ROWS):
        part = torch.addmm(c_sq, x[s:s + BLOCK_ROWS], c_t, alpha=-2).min(1)
        idx[s:s + BLOCK_ROWS] = part.indices
        best[s:s + BLOCK_ROWS] = (part.values + x_sq[s:s + BLOCK_ROWS]).clamp_min_(0)
    return idx, best


def _kmeanspp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding over all of ``x [n, d]`` (``n > k``): ``k`` centroids ``[k, d]``."""
    n, d = x.shape
    c = torch.empty(k, d, dtype=x.dtype)
    c[0] = x[torch.randint(n, (1,), generator=generator)]
    best = _sq_dists(x, c[:1]).squeeze(1)
    for j in range(1, k):
        total = best.sum()
        if total <= 0:
            idx = torch.randint(n, (1,), generator=generator)
        else:
            idx = torch.multinomial(best / total, 1, generator=generator)
        c[j] = x[idx]
        best = torch.minimum(best, _sq_dists(x, c[j:j + 1]).squeeze(1))
    return c


def _kmeanspp_sampled(x: torch.Tensor, k: int, generator: torch.Generator, points: int) -> torch.Tensor:
    """k-means++ seeding over a uniform draw of ``points`` rows of ``x``, each draw an inverse-CDF lookup
    (a cumulative sum and a binary search) instead of ``torch.multinomial``, which rebuilds its distribution
    on every call."""
    x = x[torch.randperm(x.shape[0], generator=generator)[:points]]
    n, d = x.shape
    sq = x.pow(2).sum(1)
    c = torch.empty(k, d, dtype=x.dtype)
    c[0] = x[torch.randint(n, (1,), generator=generator)]
    best = (sq - 2 * (x @ c[0]) + c[0].pow(2).sum()).clamp_min_(0)
    for j in range(1, k):
        cum = torch.cumsum(best, 0)
        if cum[-1] <= 0:
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = min(int(torch.searchsorted(cum, torch.rand(1, generator=generator, dtype=cum.dtype) * cum[-1])),
                      n - 1)
        c[j] = x[idx]
        torch.minimum(best, (sq - 2 * (x @ c[j]) + c[j].pow(2).sum()).clamp_min_(0), out=best)
    return c


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, *, iters: int, generator: torch.Generator,
           max_points: int | None = None) -> torch.Tensor:
    """k-means++ seeding then ``iters`` Lloyd steps; returns centroids ``[k, d]``.

    The centroids are fitted on at most ``max_points`` rows of ``x`` (default
    ``KMEANS_POINTS_PER_CENTROID * k``), drawn uniformly without replacement
    when ``x`` has more; distances are computed ``CHUNK`` rows at a time. With
    fewer distinct points than ``k`` the surplus centroids are copies of
    random points plus small noise (they start dead and are revived by the
    restarts during training). An empty cluster in a Lloyd step is re-seeded
    at the point farthest from its centroid.
    """
    n, d = x.shape
    if n == 0:
        raise ValueError("kmeans needs at least one point")
    cap = KMEANS_POINTS_PER_CENTROID * k if max_points is None else int(max_points)
    if cap < k:
        raise ValueError(f"max_points must be >= k={k}, got {max_points}")
    if n > cap:
        x = x[torch.randperm(n, generator=generator)[:cap]]
        n = cap
    noise = 1e-3 * x.std().clamp_min(1e-6)
    if n <= k:
        extra = torch.randint(n, (k - n,), generator=generator)
        c = torch.cat([x, x[extra] + noise * torch.randn(k - n, d, generator=generator)])
        return c[torch.randperm(k, generator=generator)]
    seed_points = max(SEED_POINTS, SEED_POINTS_PER_CENTROID * k)
    c = _kmeanspp(x, k, generator) if n <= seed_points else _kmeanspp_sampled(x, k, generator, seed_points)
    for _ in range(iters):
        assign, dist = nearest(x, c)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        live = counts > 0
        c[live] = sums[live] / counts[live, None].to(x.dtype)
        if not live.all():
            far = dist.argsort(descending=True)
            c[~live] = x[far[: int((~live).sum())]]
    return c


class RQVAE(nn.Module):
    """Per-modality encoders, fusion, residual quantiser and per-modality decoders.

    Input standardisation (per-modality mean and a scalar scale, so that every
    modality has unit mean squared norm per dimension) is part of the module's
    state, so a saved tokenizer encodes new items exactly as at fit time.
    """

    def __init__(self, input_dims: Sequence[int], latent_dim: int, hidden_dims: Sequence[int],
                 codebook_sizes: Sequence[int]):
        super().__init__()
        self.input_dims = tuple(int(d) for d in input_dims)
        self.codebook_sizes = tuple(int(v) for v in codebook_sizes)
        self.latent_dim = int(latent_dim)
        hidden = list(hidden_dims)
        self.encoders = nn.ModuleList(mlp([d, *hidden, latent_dim]) for d in self.input_dims)
        n_inputs = len(self.input_dims)
        self.fuse = nn.Linear(n_inputs * latent_dim, latent_dim) if n_inputs > 1 else nn.Identity()
        self.decoders = nn.ModuleList(mlp([latent_dim, *hidden[::-1], d]) for d in self.input_dims)
        self.codebooks = nn.ParameterList(
            nn.Parameter(torch.randn(v, latent_dim) * 0.1) for v in self.codebook_sizes
        )
        for m, d in enumerate(self.input_dims):
            self.register_buffer(f"in_mean_{m}", torch.zeros(d))
            self.register_buffer(f"in_scale_{m}", torch.ones(()))

    @staticmethod
    def state_shapes(input_dims: Sequence[int], latent_dim: int, hidden_dims: Sequence[int],
                     codebook_sizes: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """Name -> shape of the state dict of ``RQVAE(input_dims, ...)``, computed without building it (a
        saved state is checked against its config before anything is allocated)."""
        out: dict[str, tuple[int, ...]] = {}

        def mlp_shapes(prefix: str, dims: list[int]) -> None:
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):  # Linear layers at 0, 2, ... (SiLU between)
                out[f"{prefix}.{2 * i}.weight"], out[f"{prefix}.{2 * i}.bias"] = (b, a), (b,)

        dims, hidden, latent = [int(d) for d in input_dims], [int(h) for h in hidden_dims], int(latent_dim)
        for m, d in enumerate(dims):
            mlp_shapes(f"encoders.{m}", [d, *hidden, latent])
            mlp_shapes(f"decoders.{m}", [latent, *hidden[::-1], d])
            out[f"in_mean_{m}"], out[f"in_scale_{m}"] = (d,), ()
        if len(dims) > 1:
            out["fuse.weight"], out["fuse.bias"] = (latent, len(dims) * latent), (latent,)
        for l, v in enumerate(codebook_sizes):
            out[f"codebooks.{l}"] = (int(v), latent)
        return out

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    # -- input standardisation ------------------------------------------------
    @torch.no_grad()
    def set_input_stats(self, xs: Sequence[torch.Tensor]) -> None:
        for m, x in enumerate(xs):
            mean = x.mean(0)
            self.set_stats(m, mean, (x - mean).pow(2).mean().sqrt())

    @torch.no_grad()
    def set_stats(self, m: int, mean: torch.Tensor, scale: torch.Tensor) -> None:
        """Input ``m``'s standardisation: ``mean [d_m]`` and the scalar ``scale`` (clamped to >= 1e-8, so that
        a constant input divides by a small number, not 0)."""
        getattr(self, f"in_mean_{m}").copy_(mean)
        getattr(self, f"in_scale_{m}").copy_(scale.clamp_min(1e-8))

    def standardise(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [(x - getattr(self, f"in_mean_{m}")) / getattr(self, f"in_scale_{m}") for m, x in enumerate(xs)]

    # -- forward pieces -----------------------------------------------------
    def encode_latent(self, xs_std: Sequence[torch.Tensor]) -> torch.Tensor:
        """Standardised inputs -> fused latent ``z [B, D]``."""
        h = [enc(x) for enc, x in zip(self.encoders, xs_std)]
        return self.fuse(torch.cat(h, dim=1)) if len(h) > 1 else h[0]

    def decode(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Latent ``[B, D]`` -> standardised reconstructions, one per modality."""
        return [dec(z) for dec in self.decoders]

    def quantize(self, z: torch.Tensor, levels: int | None = None):
        """Residual quantisation of ``z [B, D]``.

        Returns ``codes [B, L]`` (int64), ``quantized [L, B, D]`` (the chosen
        codewords, differentiable w.r.t. the codebooks) and ``residuals
        [L, B, D]`` (``r_l``, differentiable w.r.t. ``z``; each residual
        subtracts the *detached* codewords above it, so the codebook loss of
        level l trains only codebook l).
        """
        levels = self.num_levels if levels is None else levels
        r = z
        codes, quantized, residuals = [], [], []
        for l in range(levels):
            cb = self.codebooks[l]
            c = _sq_dists(r.detach(), cb.detach()).argmin(1)
            q = cb[c]
            codes.append(c)
            quantized.append(q)
            residuals.append(r)
            r = r - q.detach()
        return torch.stack(codes, 1), torch.stack(quantized), torch.stack(residuals)

"""SIDv2 Semantic-ID tokenizer: a residual-quantised autoencoder over item content.

Item content embeddings (one array, or several: text, image, metadata, ...)
go through one encoder each, are fused into one latent vector, and that
vector is quantised level by level (residual quantisation); the codes of the
L levels are the item's Semantic ID. The recipe is PLUM's SIDv2 on top of
the RQ-VAE of TIGER:

- **multiple content embeddings**, each with its own MLP encoder (and
  decoder), fused by a linear layer;
- **multi-resolution codebooks**: level sizes ``codebook_sizes``; PLUM's
  default halves the size at each level from 2048
  (:func:`multi_resolution_codebooks`), TIGER's is ``(256, 256, 256)``;
- **k-means initialisation** of every level's codebook on the residuals of
  the trained autoencoder (after ``warmup_epochs`` without quantisation);
- **reconstruction + codebook + commitment losses** with the
  straight-through estimator: ``L = sum_m w_m |x_m - x_hat_m|^2 / d_m
  + sum_l (|sg(r_l) - q_l|^2 + beta |r_l - sg(q_l)|^2) + lambda * L_cooc``;
- **progressive masking**: with probability ``mask_prob`` an item's
  reconstruction uses only its first ``k`` levels, ``k`` uniform in
  ``1..L-1``, so the coarse levels must carry most of the content
  (coarse-to-fine SIDs);
- **co-occurrence contrastive loss**: for pairs of items engaged together
  (``cooccurrence [P, 2]``), symmetric InfoNCE between their L2-normalised
  latents with in-batch negatives, temperature ``cooccurrence_temperature``,
  so items used together get nearby latents and hence shared SID prefixes;
- **dead-code restarts**: every ``restart_every`` epochs, codewords no item
  maps to are moved onto the residuals of items drawn in proportion to their
  quantisation error at that level (their Adam moments are reset).

``fit`` is deterministic for a seed (one ``torch.Generator`` drives every
draw; parameters are initialised under a forked, seeded RNG).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from plumrec.io import atomic_path
from plumrec.sid.quality import SIDQuality, sid_quality
from plumrec.sid.rows import Rows, as_tensor, block_stats, validate_embeddings, validate_pairs
from plumrec.sid.rqvae import RQVAE, kmeans, nearest
from plumrec.sid.saved import build_rqvae, read_tokenizer, write_tokenizer

__all__ = ["SIDConfig", "SemanticIdTokenizer", "multi_resolution_codebooks", "TIGER_CODEBOOKS"]

TIGER_CODEBOOKS = (256, 256, 256)


def multi_resolution_codebooks(first: int = 2048, levels: int = 4, factor: int = 2) -> tuple[int, ...]:
    """PLUM's multi-resolution sizes: ``first / factor**l`` at level l.

    ``multi_resolution_codebooks()`` -> ``(2048, 1024, 512, 256)``.
    """
    sizes = tuple(first // factor**l for l in range(levels))
    if levels < 1 or factor < 1 or min(sizes) < 2:
        raise ValueError(f"first={first}, levels={levels}, factor={factor} gives sizes {sizes}; "
                         "every size must be >= 2")
    return sizes


@dataclass(frozen=True)
class SIDConfig:
    """Hyper-parameters of :class:`SemanticIdTokenizer` (validated)."""

    codebook_sizes: tuple[int, ...] = (2048, 1024, 512, 256)
    # Defaults validated on Amazon Beauty (12,101 items, MiniLM text embeddings,
    # codebooks 256/128/64/32): uniqueness 97.5%, all level-1 codes used, in
    # about 3.5 s per epoch on one CPU thread. TIGER's wider (512, 256, 128)
    # encoder for 60 epochs gives 97.3%.
    latent_dim: int = 32
    hidden_dims: tuple[int, ...] = (256, 128)
    epochs: int = 50
    warmup_epochs: int = 5  # autoencoder only, then k-means initialisation
    batch_size: int = 1024
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    commitment_weight: float = 0.25
    mask_prob: float = 0.5  # progressive masking; 0 disables
    # used when fit() gets cooccurrence pairs; 0 disables. Beauty's end-to-end retrieval prefers 3.0
    # (`plum run`'s default): +8% validation Recall@10 / NDCG@10 over 0.1
    cooccurrence_weight: float = 0.1
    cooccurrence_temperature: float = 0.1
    cooccurrence_batch_size: int = 512
    restart_every: int = 5  # epochs between dead-code restarts; 0 disables
    kmeans_iters: int = 25
    # weight of each content embedding's reconstruction error, one per fit() input (None: equal);
    # normalised to mean 1, so only the ratios matter. Raising one input's weight makes the
    # latent, and hence the coarse SID levels, follow that input more.
    input_weights: tuple[float, ...] | None = None
    # items per training epoch, and the most the k-means initialisation and the dead-code restarts read:
    # a larger catalogue trains on a fresh uniform draw of this many items per epoch, read from its
    # arrays (memory maps included) batch by batch, and all its items are encoded at the end
    train_items: int = 1 << 19
    seed: int = 0

    def __post_init__(self):
        sizes = tuple(int(v) for v in self.codebook_sizes)
        object.__setattr__(self, "codebook_sizes", sizes)
        object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))
        if not sizes or min(sizes) < 2:
            raise ValueError(f"codebook_sizes must be a non-empty sequence of ints >= 2, got {self.codebook_sizes}")
        for name in ("latent_dim", "epochs", "batch_size", "cooccurrence_batch_size", "train_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims must be positive, got {self.hidden_dims}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")
        for name in ("learning_rate", "cooccurrence_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "commitment_weight", "cooccurrence_weight", "restart_every", "kmeans_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.input_weights is not None:
            w = tuple(float(v) for v in self.input_weights)
            if not w or min(w) < 0 or not sum(w) > 0 or not all(np.isfinite(w)):
                raise ValueError(f"input_weights must be finite, >= 0 and not all 0, got {self.input_weights}")
            object.__setattr__(self, "input_weights", w)

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)


# -- the tokenizer -------------------------------------------------------------

class SemanticIdTokenizer:
    """Learns Semantic IDs ``codes [N, L]`` from item content embeddings.

    Example::

        tok = SemanticIdTokenizer((256, 128, 64, 32), seed=0)
        codes = tok.fit([text_emb, image_emb], cooccurrence=pairs)   # [N, 4]
        new_codes = tok.encode([new_text_emb, new_image_emb])        # no retraining
        tok.save("sid/"); tok = SemanticIdTokenizer.load("sid/")

    Args:
        codebook_sizes: codebook size per level (``L = len(codebook_sizes)``);
            default PLUM's ``(2048, 1024, 512, 256)``, TIGER's is
            :data:`TIGER_CODEBOOKS`.
        seed: seeds every random draw of :meth:`fit`.
        **config: any other field of :class:`SIDConfig`.
    """

    def __init__(self, codebook_sizes: Sequence[int] = SIDConfig.codebook_sizes, *, seed: int = 0, **config):
        self.config = SIDConfig(codebook_sizes=tuple(codebook_sizes), seed=seed, **config)
        self.model: RQVAE | None = None
        self.codes: np.ndarray | None = None  # codes of the fitted catalogue
        self.history: list[dict] = []  # per-epoch mean losses of the last fit

    @classmethod
    def from_config(cls, config: SIDConfig) -> "SemanticIdTokenizer":
        fields = dataclasses.asdict(config)
        return cls(fields.pop("codebook_sizes"), seed=fields.pop("seed"), **fields)

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return self.config.codebook_sizes

    @property
    def num_levels(self) -> int:
        return self.config.num_levels

    @property
    def codewords(self) -> list[np.ndarray]:
        """The fitted codebooks: one ``[V_l, latent_dim]`` float32 array per level (level 0's
        centroids, then the residual centroids of each level below)."""
        return [cb.detach().cpu().numpy().copy() for cb in self._require_fitted().codebooks]

    def _require_fitted(self) -> RQVAE:
        if self.model is None:
            raise RuntimeError("the tokenizer is not fitted: call fit() or load() first")
        return self.model

    # -- training ---------------------------------------------------------------
    def fit(self, embeddings, cooccurrence=None, *, progress: bool = True,
            codes_path: str | Path | None = None) -> np.ndarray:
        """Train on the catalogue and return its codes ``[N, L]`` (int64).

        Runs on the CPU. The model is small, so on a busy machine with few
        cores ``torch.set_num_threads(1)`` is often faster than the default
        (3.5 s vs 10 s per Beauty epoch on a loaded 2-core machine).

        A catalogue of more than ``train_items`` items is never read whole: the
        input statistics come from two passes over blocks of rows, each epoch
        trains on ``train_items`` items drawn afresh and read batch by batch, the
        k-means initialisation and the dead-code restarts use a fixed draw of
        ``train_items`` items, and the codes are assigned block by block. Pass
        ``np.load(path, mmap_mode="r")`` (or a ``np.memmap``) for an embedding
        file larger than memory.

        Args:
            embeddings: ``[N, d]`` array/tensor, or a list of them (one per
                content embedding, each ``[N, d_m]``, same N).
            cooccurrence: optional ``[P, 2]`` int item-index pairs engaged
                together (e.g. :func:`plumrec.data.cooccurrence_pairs` on the
                training sequences); enables the co-occurrence loss when
                ``cooccurrence_weight > 0``.
            progress: show tqdm bars over the epochs and the encoding.
            codes_path: write the codes to this ``.npy`` file block by block as
                they are assigned (swapped in when complete) and return it
                memory-mapped, instead of an array in memory.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        inputs = validate_embeddings(embeddings)
        n = inputs[0].shape[0]
        pairs = validate_pairs(cooccurrence, n) if cooccurrence is not None else None
        use_cooc = pairs is not None and cfg.cooccurrence_weight > 0
        if cfg.input_weights is not None and len(cfg.input_weights) != len(inputs):
            raise ValueError(f"input_weights has {len(cfg.input_weights)} weights but fit() got {len(inputs)} "
                             "embeddings: give one weight per input")
        weights = [1.0] * len(inputs) if cfg.input_weights is None else \
            [w * len(inputs) / sum(cfg.input_weights) for w in cfg.input_weights]

        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = RQVAE([x.shape[1] for x in inputs], cfg.latent_dim, cfg.hidden_dims, cfg.codebook_sizes)
        if n <= cfg.train_items:
            inputs = [as_tensor(x) for x in inputs]
            model.set_input_stats(inputs)
            sample = None
        else:
            for m, x in enumerate(inputs):
                model.set_stats(m, *block_stats(x))
            sample = torch.randperm(n, generator=gen)[:cfg.train_items].sort().values
        rows = self._rows(model, inputs)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.history = []

        bar = tqdm(range(cfg.epochs), desc="SID tokenizer", disable=not progress, unit="epoch")
        for epoch in bar:
            quantize = epoch >= cfg.warmup_epochs
            if epoch == cfg.warmup_epochs:
                self._kmeans_init(model, rows, sample, gen)
            record = {**self._train_epoch(model, rows, pairs if use_cooc else None, weights, opt, gen, quantize),
                      "epoch": epoch}
            if quantize and cfg.restart_every and (epoch - cfg.warmup_epochs + 1) % cfg.restart_every == 0 \
                    and epoch < cfg.epochs - 1:
                record["restarted"] = self._restart_dead_codes(model, rows, sample, gen, opt)
            self.history.append(record)
            bar.set_postfix(recon=f"{record['recon']:.4f}", vq=f"{record['vq']:.4f}")
        model.eval()
        self.model = model
        self.codes = self._encode_rows(rows, codes_path, progress)
        return self.codes if codes_path is not None else self.codes.copy()

    @staticmethod
    def _rows(model: RQVAE, inputs: list) -> Rows:
        return Rows(inputs, [getattr(model, f"in_mean_{m}") for m in range(len(inputs))],
                    [getattr(model, f"in_scale_{m}") for m in range(len(inputs))])

    def _train_epoch(self, model: RQVAE, rows: Rows, pairs: torch.Tensor | None, weights: list[float], opt, gen,
                     quantize: bool) -> dict:
        """One epoch over ``train_items`` items (all of a smaller catalogue) in shuffled batches; the mean
        of each loss term. ``quantize``: after the warm-up, with the quantiser (straight-through) and
        progressive masking; ``pairs``: the co-occurrence pairs when their loss is on."""
        cfg, L = self.config, self.config.num_levels
        model.train()
        sums = {"recon": 0.0, "vq": 0.0, "cooc": 0.0}
        perm = torch.randperm(rows.num_rows, generator=gen)[:cfg.train_items]
        steps = 0
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            xb = rows.take(idx)
            z = model.encode_latent(xb)
            if quantize:
                _, q, r = model.quantize(z)  # [L, B, D] each
                vq = ((q - r.detach()).pow(2).sum(-1).mean()
                      + cfg.commitment_weight * (r - q.detach()).pow(2).sum(-1).mean())
                if cfg.mask_prob > 0 and L > 1:
                    keep = torch.full((len(idx),), L)
                    masked = torch.rand(len(idx), generator=gen) < cfg.mask_prob
                    keep[masked] = torch.randint(1, L, (int(masked.sum()),), generator=gen)
                    level_mask = (torch.arange(L)[:, None] < keep[None, :]).to(z.dtype)[..., None]
                    zq = (q.detach() * level_mask).sum(0)
                else:
                    zq = q.detach().sum(0)
                z_in = z + (zq - z).detach()  # straight-through estimator
            else:
                vq = z.new_zeros(())
                z_in = z
            recon = sum(w * F.mse_loss(xh, x) for w, xh, x in zip(weights, model.decode(z_in), xb)) / len(xb)
            loss = recon + vq
            if pairs is not None:
                cooc = self._cooc_loss(model, rows, pairs, gen)
                loss = loss + cfg.cooccurrence_weight * cooc
                sums["cooc"] += float(cooc.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["recon"] += float(recon.detach())
            sums["vq"] += float(vq.detach())
            steps += 1
        return {k: v / steps for k, v in sums.items()}

    def _cooc_loss(self, model: RQVAE, rows: Rows, pairs: torch.Tensor, gen) -> torch.Tensor:
        cfg = self.config
        pick = torch.randint(len(pairs), (min(cfg.cooccurrence_batch_size, len(pairs)),), generator=gen)
        a, b = pairs[pick, 0], pairs[pick, 1]
        za = F.normalize(model.encode_latent(rows.take(a)), dim=1)
        zb = F.normalize(model.encode_latent(rows.take(b)), dim=1)
        logits = za @ zb.T / cfg.cooccurrence_temperature
        # The same item may appear twice in a batch: only exact partners are positives.
        same = (a[:, None] == a[None, :]) & (b[:, None] == b[None, :])
        logits = logits.masked_fill(same & ~torch.eye(len(a), dtype=torch.bool), float("-inf"))
        target = torch.arange(len(a))
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    @torch.no_grad()
    def _latents(self, model: RQVAE, rows: Rows, sample: torch.Tensor | None) -> torch.Tensor:
        """Latents ``[K, D]`` of the rows ``sample`` (every row when None)."""
        model.eval()
        out = torch.cat([model.encode_latent(xb) for xb in rows.blocks(sample)])
        model.train()
        return out

    @torch.no_grad()
    def _kmeans_init(self, model: RQVAE, rows: Rows, sample: torch.Tensor | None, gen) -> None:
        r = self._latents(model, rows, sample)
        for l, cb in enumerate(model.codebooks):
            c = kmeans(r, cb.shape[0], iters=self.config.kmeans_iters, generator=gen)
            cb.copy_(c)
            r = r - c[nearest(r, c, dist=torch.cdist)[0]]

    @torch.no_grad()
    def _restart_dead_codes(self, model: RQVAE, rows: Rows, sample: torch.Tensor | None, gen, opt) -> int:
        """Move unused codewords onto residuals of badly quantised items.

        Level by level over the catalogue (or its draw ``sample``; a restart at
        level l changes the residuals below it; the nearest codewords are found
        in blocks of rows, :func:`~plumrec.sid.rqvae.nearest`). Returns how many
        codewords were restarted.
        """
        r = self._latents(model, rows, sample)
        restarted = 0
        for cb in model.codebooks:
            codes = nearest(r, cb, dist=torch.cdist)[0]
            dead = torch.bincount(codes, minlength=cb.shape[0]) == 0
            n_dead = int(dead.sum())
            if n_dead:
                err = (r - cb[codes]).pow(2).sum(1)
                weights = err + 1e-12
                pick = torch.multinomial(weights / weights.sum(), n_dead,
                                         replacement=n_dead > r.shape[0], generator=gen)
                noise = 1e-3 * r.std() * torch.randn(n_dead, r.shape[1], generator=gen)
                cb[dead] = r[pick] + noise
                state = opt.state.get(cb, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key][dead] = 0
                codes = nearest(r, cb, dist=torch.cdist)[0]
                restarted += n_dead
            r = r - cb[codes]
        return restarted

    # -- inference ----------------------------------------------------------------
    @torch.no_grad()
    def _encode_rows(self, rows: Rows, codes_path: str | Path | None = None, progress: bool = False,
                     chunk: int = 8192) -> np.ndarray:
        """Codes ``[N, L]`` int64 of every row, block by block: in memory, or written into the ``.npy``
        file ``codes_path`` as they come (:func:`plumrec.io.atomic_path`: a temporary file beside it, renamed
        when complete) and returned memory-mapped read-only."""
        shape = (rows.num_rows, self.num_levels)
        if codes_path is None:
            out = np.empty(shape, np.int64)
            self._assign(rows, out, progress, chunk)
            return out
        with atomic_path(codes_path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=shape)
            self._assign(rows, out, progress, chunk)
            out.flush()
            del out
        return np.load(codes_path, mmap_mode="r")

    def _assign(self, rows: Rows, out: np.ndarray, progress: bool, chunk: int) -> None:
        """Write the codes of ``rows``' blocks of ``chunk`` rows into ``out [N, L]``."""
        from tqdm.auto import tqdm

        model = self._require_fitted()
        s = 0
        with tqdm(total=rows.num_rows, desc="SID codes", disable=not progress, unit="item", unit_scale=True) as bar:
            for xb in rows.blocks(rows=chunk):
                codes, _, _ = model.quantize(model.encode_latent(xb))
                out[s:s + len(codes)] = codes.numpy()
                s += len(codes)
                bar.update(len(codes))

    @torch.no_grad()
    def encode(self, embeddings, *, codes_path: str | Path | None = None, progress: bool = False) -> np.ndarray:
        """Codes ``[N, L]`` (int64) of items, fitted or new, without retraining; read and assigned in
        blocks of rows (an array larger than memory can be a memory map). ``codes_path``: write them to
        that ``.npy`` file as they come and return it memory-mapped (see :meth:`fit`)."""
        model = self._require_fitted()
        model.eval()
        xs = validate_embeddings(embeddings, model.input_dims)
        return self._encode_rows(self._rows(model, xs), codes_path, progress)

    @torch.no_grad()
    def reconstruct(self, embeddings, levels: int | None = None) -> list[np.ndarray]:
        """Decoded embeddings (in input units) from the first ``levels`` levels."""
        model = self._require_fitted()
        model.eval()
        levels = self.num_levels if levels is None else levels
        if not 1 <= levels <= self.num_levels:
            raise ValueError(f"levels must be in [1, {self.num_levels}], got {levels}")
        xs = [as_tensor(x) for x in validate_embeddings(embeddings, model.input_dims)]
        _, q, _ = model.quantize(model.encode_latent(model.standardise(xs)), levels)
        outs = model.decode(q.sum(0))
        return [(o * getattr(model, f"in_scale_{m}") + getattr(model, f"in_mean_{m}")).numpy()
                for m, o in enumerate(outs)]

    @torch.no_grad()
    def reconstruction_error(self, embeddings) -> float:
        """Relative squared error ``sum |x - x_hat|^2 / sum |x - mean(x)|^2`` with
        all levels, averaged over the content embeddings (0 = perfect, 1 = no
        better than predicting the mean)."""
        model = self._require_fitted()
        xs = [as_tensor(x) for x in validate_embeddings(embeddings, model.input_dims)]
        recon = self.reconstruct(xs)
        errs = []
        for x, xh in zip(xs, recon):
            x = x.numpy().astype(np.float64)
            errs.append(((x - xh) ** 2).sum() / max(((x - x.mean(0)) ** 2).sum(), 1e-12))
        return float(np.mean(errs))

    def quality_report(self, embeddings, cooccurrence=None, **kwargs) -> SIDQuality:
        """:func:`plumrec.sid.quality.sid_quality` of ``encode(embeddings)`` with the
        reconstruction error filled in."""
        codes = self.encode(embeddings)
        return sid_quality(codes, self.codebook_sizes, cooccurrence=cooccurrence,
                           reconstruction_error=self.reconstruction_error(embeddings), **kwargs)

    # -- persistence -------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into the folder ``path``, swapped in atomically
        (other files in it are kept; :mod:`plumrec.sid.saved`)."""
        model = self._require_fitted()
        tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        if self.codes is not None:
            tensors["fitted_codes"] = torch.from_numpy(np.array(self.codes, np.int64))
        return write_tokenizer(path, dataclasses.asdict(self.config), model.input_dims, tensors)

    @classmethod
    def load(cls, path: str | Path) -> "SemanticIdTokenizer":
        """A tokenizer written by :meth:`save`; a damaged, missing or foreign file is a ``ValueError`` naming it."""
        folder, meta, tensors = read_tokenizer(path)
        try:
            tok = cls.from_config(SIDConfig(**meta["config"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{folder / 'config.json'}: not a SemanticIdTokenizer config ({e})") from None
        tok.model, tok.codes = build_rqvae(meta["input_dims"], tok.config, tensors, folder / "model.safetensors")
        return tok

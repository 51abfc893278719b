"""Synthetic catalogues at scale, written to disk block by block (never whole in memory).

- :func:`write_clustered_embeddings`: ``[N, d]`` float32 item embeddings around ``num_clusters`` centres
  in a ``.npy`` file (memory-mappable), with each item's cluster, for checking that a SID tokenizer's
  first level follows the clusters (:func:`plumrec.sid.quality.first_level_purity`).
- :func:`write_synthetic_events`: an interaction log of ``num_events`` events in Parquet shards sorted
  by user and time, the input :func:`plumrec.data.events.write_event_store` reads.

Both are deterministic for a seed and write one block of rows at a time, each from its own seeded
generator.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_clustered_embeddings", "write_synthetic_events"]

BLOCK_ROWS = 1 << 20  # rows per generated block: 512 MB of 128-d float32 at most in flight


def write_clustered_embeddings(path: str | Path, num_items: int, *, dim: int = 128, num_clusters: int = 1024,
                               noise: float = 0.35, seed: int = 0, progress: bool = True) -> tuple[Path, Path]:
    """Write ``num_items`` embeddings ``centre[c_i] + noise * N(0, I)`` (centres ``N(0, I)`` in ``dim``
    dimensions, clusters ``c_i`` uniform) to the ``.npy`` file ``path`` and the clusters (int32
    ``[num_items]``) beside it as ``<stem>.clusters.npy``; returns both paths."""
    from tqdm.auto import tqdm

    for name, value in (("num_items", num_items), ("dim", dim), ("num_clusters", num_clusters)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    path = Path(path)
    labels_path = path.with_name(f"{path.stem}.clusters.npy")
    centres = np.random.default_rng([seed, 0]).standard_normal((num_clusters, dim)).astype(np.float32)
    emb = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(num_items, dim))
    labels = np.lib.format.open_memmap(labels_path, mode="w+", dtype=np.int32, shape=(num_items,))
    for b, s in enumerate(tqdm(range(0, num_items, BLOCK_ROWS), desc="embeddings", disable=not progress)):
        rng = np.random.default_rng([seed, 1, b])
        n = min(BLOCK_ROWS, num_items - s)
        c = rng.integers(0, num_clusters, n)
        labels[s:s + n] = c
        emb[s:s + n] = centres[c] + np.float32(noise) * rng.standard_normal((n, dim), dtype=np.float32)
    emb.flush()
    labels.flush()
    return path, labels_path


def write_synthetic_events(out_dir: str | Path, num_events: int, *, num_items: int, mean_length: float = 10.0,
                           num_shards: int = 8, seed: int = 0, progress: bool = True) -> list[Path]:
    """Write about ``num_events`` events ``(user int64, item int64, time int64)`` as ``num_shards`` Parquet
    files ``events-00000.parquet`` ... in ``out_dir``, sorted by user, then time.

    Users have ``1 + Poisson(mean_length - 1)`` events; items follow a power law over a fixed shuffle of
    ``[0, num_items)`` (a few items are popular, most are rare). Shard ``k`` holds the users of its own
    seeded blocks, so the shards are written one block at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    if num_events < 1 or num_items < 1 or num_shards < 1 or not mean_length >= 1:
        raise ValueError(f"num_events, num_items, num_shards must be >= 1 and mean_length >= 1, got "
                         f"{num_events}, {num_items}, {num_shards}, {mean_length}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_shard = -(-num_events // num_shards)
    stride = _coprime_stride(num_items)
    paths, first_user = [], 0
    bar = tqdm(total=num_events, desc="events", disable=not progress, unit="event", unit_scale=True)
    for k in range(num_shards):
        path = out / f"events-{k:05d}.parquet"
        with pq.ParquetWriter(path, pa.schema([("user", pa.int64()), ("item", pa.int64()),
                                               ("time", pa.int64())])) as writer:
            written, b = 0, 0
            target = min(per_shard, num_events - k * per_shard)
            while written < target:
                rng = np.random.default_rng([seed, k, b])
                users_block = max(1, min(int(BLOCK_ROWS / mean_length), int(np.ceil((target - written) / mean_length))))
                lens = 1 + rng.poisson(mean_length - 1, users_block)
                users = np.repeat(np.arange(first_user, first_user + len(lens)), lens)
                pop = (rng.random(len(users)) ** 3 * num_items).astype(np.int64)  # power law over ranks
                items = (pop * stride) % num_items
                starts = np.repeat(np.cumsum(lens) - lens, lens)
                times = 1_600_000_000 + np.arange(len(users)) - starts
                writer.write_table(pa.table({"user": users, "item": items, "time": times}))
                first_user += len(lens)
                written += len(users)
                bar.update(len(users))
                b += 1
        paths.append(path)
    bar.close()
    return paths


def _coprime_stride(n: int) -> int:
    """A stride coprime to ``n`` near ``0.618 n``: ``i -> i * stride mod n`` shuffles the popularity ranks."""
    s = max(1, int(n * 0.6180339887))
    while np.gcd(s, n) != 1:
        s += 1
    return s

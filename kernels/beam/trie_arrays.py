"""``TrieArrays``: the SID trie's kernel arrays on one device, the one trie
object every beam op takes (``plum_kernels.torch`` and ``plum_kernels.jax``).

This module imports neither torch nor jax. ``TrieArrays`` becomes a JAX
pytree (the seven arrays its leaves, the integers its static aux data) the
first time jax is used through it (:func:`register_jax_pytree`, called by
``plum_kernels.jax`` on import and by :meth:`TrieArrays.from_trie`), so a
``TrieArrays`` of jax arrays can be an argument of a ``jax.jit`` /
``shard_map`` function: tries with equal shapes, dtypes and integers share
one trace. ``plumrec.sid.SIDTrie.to_torch`` / ``to_jax`` build it.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np

TRIE_ARRAYS = ("child_ptr", "child_token", "edge_word", "level_ptr", "edge_level_ptr", "shift", "mask")
TRIE_META = ("codebook_sizes", "num_internal", "num_edges", "chain_min_depth")

_REGISTER_LOCK = threading.Lock()
_registered = False


@dataclasses.dataclass(frozen=True)
class TrieArrays:
    """The SID trie's kernel arrays on one device (torch tensors or jax arrays;
    format in ``plumrec/sid/trie.py``).

    Arrays (``I`` internal nodes, ``E`` edges, ``L`` levels; int64 pointers
    are int32 in JAX without ``jax_enable_x64``):

    - ``child_ptr`` int64 ``[I + 1]``: children of node ``n`` are edges
      ``child_ptr[n]:child_ptr[n + 1]``;
    - ``child_token`` int16 (int32 if a codebook exceeds 32768) ``[E]``: the
      code on each edge, sorted within a node;
    - ``edge_word`` int32 ``[E]``: ``< 0``, internal child ``~w``; ``>= 0``,
      packed codes of a single-SID chain;
    - ``level_ptr`` int64 ``[L + 1]``, ``edge_level_ptr`` int64 ``[L + 1]``:
      first internal node / edge of each depth / level;
    - ``shift``, ``mask`` int32 ``[L]``: decoding of chain words, the level-``l``
      code of word ``w`` is ``(w >> shift[l]) & mask[l]``.

    Integers (host-side, static under ``jax.jit``): ``codebook_sizes`` (tuple of
    ``L`` ints ``V_l``), ``num_internal`` (``I``), ``num_edges`` (``E``),
    ``chain_min_depth`` (the shallowest depth a chain may start at).
    """

    child_ptr: Any
    child_token: Any
    edge_word: Any
    level_ptr: Any
    edge_level_ptr: Any
    shift: Any
    mask: Any
    codebook_sizes: tuple[int, ...]
    num_internal: int
    num_edges: int
    chain_min_depth: int = 0

    @classmethod
    def from_trie(cls, trie: Any, device: Any = None) -> "TrieArrays":
        """The JAX pytree of any object with these fields (a ``SIDTrie``, a
        ``TrieArrays`` of numpy or jax arrays).

        Args:
            trie: the object; its arrays are numpy or jax arrays (torch
                tensors raise ``TypeError``), its integers ints.
            device: a ``jax.Device`` (or sharding) to put the arrays on;
                ``None`` keeps jax arrays where they are and puts host arrays
                on the default device.

        Returns ``trie`` itself when it already is a ``TrieArrays`` of jax
        arrays and ``device`` is ``None``. int64 host arrays become int32
        without ``jax_enable_x64``; a value that does not fit raises
        ``ValueError`` naming the array.
        """
        import jax
        import jax.numpy as jnp

        register_jax_pytree()
        for name in TRIE_ARRAYS + TRIE_META[:3]:
            if not hasattr(trie, name):
                raise TypeError(f"trie must be a SIDTrie or its TrieArrays; it has no {name!r}")
        leaves = [getattr(trie, name) for name in TRIE_ARRAYS]
        if any(type(a).__module__.startswith("torch") for a in leaves):
            raise TypeError("trie arrays must be numpy or jax arrays: use SIDTrie.to_jax(), not to_torch()")
        if isinstance(trie, cls) and device is None and all(isinstance(a, jax.Array) for a in leaves):
            return trie
        arrays = {}
        for name, a in zip(TRIE_ARRAYS, leaves):
            a = jnp.asarray(narrow_int64(a, f"trie.{name}"))
            arrays[name] = jax.device_put(a, device) if device is not None else a
        return cls(**arrays, codebook_sizes=tuple(int(v) for v in trie.codebook_sizes),
                   num_internal=int(trie.num_internal), num_edges=int(trie.num_edges),
                   chain_min_depth=int(getattr(trie, "chain_min_depth", 0)))

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def num_states(self) -> int:
        """States are ``0 .. num_internal + num_edges - 1``."""
        return self.num_internal + self.num_edges


def narrow_int64(a: Any, name: str) -> Any:
    """``a`` as int32 if it is an int64 numpy array and jax runs without
    ``jax_enable_x64`` (``ValueError`` naming ``name`` if a value does not
    fit), else ``a`` unchanged."""
    import jax

    if isinstance(a, np.ndarray) and a.dtype == np.int64 and not jax.config.jax_enable_x64:
        if a.size and (int(a.max()) >= 2**31 or int(a.min()) < -(2**31)):
            raise ValueError(f"{name} needs int64; enable jax_enable_x64")
        a = a.astype(np.int32)
    return a


def register_jax_pytree() -> None:
    """Registers :class:`TrieArrays` as a JAX pytree (arrays as leaves, the
    integers as static aux data); later calls do nothing."""
    global _registered
    with _REGISTER_LOCK:
        if _registered:
            return
        import jax

        jax.tree_util.register_dataclass(TrieArrays, data_fields=list(TRIE_ARRAYS), meta_fields=list(TRIE_META))
        _registered = True

"""Atomic file writes: a reader (or a resumed run) never sees a partial file."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on a clean exit rename it onto ``path``.

    The temporary file is in ``path``'s directory (so ``os.replace`` is an
    atomic rename) and ends with ``path``'s suffix (so ``np.save`` adds no
    ``.npy``). On an error it is removed and ``path`` is left as it was::

        with atomic_path(out / "codes.npy") as tmp:
            np.save(tmp, codes)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

"""One damage of a file for the fuzz tests of loaders: flip a bit, truncate, or append bytes."""
from __future__ import annotations

from pathlib import Path

OPS = ("flip", "truncate", "extend")


def damage_file(path: Path, op: str, where: float, bit: int = 0, tail: bytes = b"\0") -> None:
    """Rewrite ``path`` with one damage at the relative position ``where`` in [0, 1]: ``flip`` XORs bit ``bit``
    of that byte, ``truncate`` cuts the file there, ``extend`` appends ``tail``."""
    data = bytearray(path.read_bytes())
    i = min(int(where * len(data)), len(data) - 1)
    if op == "flip":
        data[i] ^= 1 << bit
    elif op == "truncate":
        del data[i:]
    elif op == "extend":
        data += tail
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    path.write_bytes(bytes(data))

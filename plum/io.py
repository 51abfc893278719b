"""Atomic writes and reads that name their file.

Writers: a reader, a resumed run or a process killed at any moment sees either the old or the new version
of a file or folder, never a part of one. Files are written to a temporary file beside the target,
fsynced, renamed onto it, and the directory is fsynced. Folders are written to a temporary folder and
swapped in with two renames; between them the old version sits at ``<name>.replaced``, which
:func:`resolve_dir` reads if the target is missing (a kill between the two renames loses nothing).

Readers: every parse error (bad UTF-8, truncated JSON or TOML, a ``.npy`` or safetensors file that is
truncated or damaged) is a ``ValueError`` naming the file and, where there is one, the line; a missing
file is a :class:`MissingFileError` (both a ``FileNotFoundError`` and a ``ValueError``).

Tensors: :func:`save_tensors` records in the safetensors header the SHA-256 of the tensors and of the
files saved beside them (a config, a vocabulary), which :func:`read_tensors` and :func:`check_sidecars`
verify, so a changed byte in any of them is an error rather than a different model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    tomllib = None

__all__ = ["MissingFileError", "atomic_dir", "atomic_path", "check_sidecars", "read_json", "read_npy", "read_tensors",
           "read_text", "read_toml", "require_file", "resolve_dir", "save_tensors", "tensors_sha256", "write_json",
           "write_text", "write_tagged", "read_tagged"]


class MissingFileError(FileNotFoundError, ValueError):
    """A file that a loader needs is missing: a ``FileNotFoundError``, and a ``ValueError`` like every other
    damaged artefact."""


def _fsync(path: str | os.PathLike) -> None:
    """Flush ``path`` (a file or, on POSIX, a directory) to the disk."""
    if os.name != "posix" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on a clean exit fsync it and rename it onto ``path``.

    The temporary file is in ``path``'s directory (so ``os.replace`` is an
    atomic rename) and ends with ``path``'s suffix (so ``np.save`` adds no
    ``.npy``). On an error it is removed and ``path`` is left as it was::

        with atomic_path(out / "codes.npy") as tmp:
            np.save(tmp, codes)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp" + path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; the result gets the mode open() would give it
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _replaced(path: Path) -> Path:
    return path.with_name(path.name + ".replaced")


def _carry(src: Path, dst: Path) -> None:
    """Put ``src`` (a file, link or folder) at ``dst``: hard links where the file system allows, else copies."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(src, dst)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, keep: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on a clean exit swap it in for ``path``.

    With ``keep``, the entries of the old folder that the writer did not create are carried into the new
    one (hard links, or copies), so that writing a few files into a shared folder loses nothing else.
    Every file in it is fsynced first. An existing ``path`` is renamed to ``<name>.replaced``, the new
    folder renamed onto ``path``, and the old one removed; :func:`resolve_dir` finds the old version if a
    kill falls between the renames. On an error the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes 0700; the result gets the mode mkdir() would give it
    try:
        yield tmp
        if keep and resolve_dir(path).is_dir():
            for entry in resolve_dir(path).iterdir():
                if not os.path.lexists(tmp / entry.name):
                    _carry(entry, tmp / entry.name)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        old = _replaced(path)
        if old.exists():
            shutil.rmtree(old) if path.exists() else os.replace(old, path)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def resolve_dir(path: str | os.PathLike) -> Path:
    """``path``, or the old version :func:`atomic_dir` left at ``<name>.replaced`` when a kill fell between
    its two renames."""
    path = Path(path)
    if not path.exists() and _replaced(path).is_dir():
        return _replaced(path)
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_text(path: str | os.PathLike) -> str:
    """``path`` decoded as UTF-8; bytes that are not UTF-8 give a ``ValueError`` naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") \
            from None


def read_json(path: str | os.PathLike) -> Any:
    """``path`` parsed as JSON; a truncated or malformed file gives a ``ValueError`` naming the file and line."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); the file may be truncated") from None


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """``path`` parsed as TOML; a malformed file gives a ``ValueError`` naming the file (and line)."""
    if tomllib is None:
        raise ValueError(f"{path}: TOML files need Python >= 3.11 (tomllib); use a .json file")
    try:
        return tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None


def require_file(path: str | os.PathLike, why: str = "") -> Path:
    """``path`` as a ``Path``; a :class:`MissingFileError` naming it (and ``why`` it is needed) if it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} not found" + (f": {why}" if why else ""))
    return path


def _npy_bytes(path: Path) -> int | None:
    """The size a ``.npy`` file must have by its header (``None`` for a header format not checked here)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        return f.tell() + math.prod(shape) * dtype.itemsize


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """The array of a ``.npy`` file. A missing file is a :class:`MissingFileError`; a damaged one (bad
    header, size other than its header says, object array) a ``ValueError`` naming the file, read no further."""
    path = require_file(path)
    try:
        need = _npy_bytes(path)
        if need is not None and need != path.stat().st_size:
            raise ValueError(f"its header announces {need} bytes but it has {path.stat().st_size}")
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e}); it may be truncated or damaged") from None


_SHA = "plum.sha256"  # safetensors metadata: the tensors' digest; "plum.sha256:NAME": the digest of sidecar NAME


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Any], *, sidecars: Iterable[str | os.PathLike] = ()
                 ) -> None:
    """Write ``tensors`` to the safetensors file ``path`` atomically, recording in its header the SHA-256 of
    the tensors and of each sidecar (a file in ``path``'s folder that describes them, e.g. ``config.json``,
    written before): :func:`read_tensors` and :func:`check_sidecars` verify them."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {_SHA: tensors_sha256(tensors)}
    for side in map(Path, sidecars):
        if side.parent.resolve() != path.parent.resolve():
            raise ValueError(f"sidecar {side} must be in the folder of {path}")
        meta[f"{_SHA}:{side.name}"] = _file_sha256(side)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def _open_tensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError (not a ValueError), or an OSError from the mmap
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be truncated or damaged") from None


def check_sidecars(path: str | os.PathLike) -> None:
    """Check the sidecar files recorded by :func:`save_tensors` in ``path``'s header against their SHA-256
    (``ValueError`` naming a changed one, :class:`MissingFileError` a missing one). Nothing to check for a
    file saved otherwise, or a missing ``path`` (the read of ``path`` names it)."""
    path = Path(path)
    if not path.is_file():
        return
    meta = _open_tensors(path).metadata() or {}
    for key, digest in sorted(meta.items()):
        if not key.startswith(_SHA + ":"):
            continue
        name = key[len(_SHA) + 1:]
        side = path.parent / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{path}: its header names a sidecar {name!r} outside its folder: the file is damaged")
        require_file(side, f"{path} was saved with it")
        if _file_sha256(side) != digest:
            raise ValueError(f"{side} is not the file that {path} was saved with (their SHA-256 differ): it was "
                             "changed or damaged since")


def read_tensors(path: str | os.PathLike, *, expected: Mapping[str, tuple] | None = None, config: str = "") -> dict:
    """The tensors of the safetensors file ``path``, checked against the SHA-256 that :func:`save_tensors`
    recorded (if any) and, given ``expected`` (name -> shape, e.g. a model's built from ``config``), against
    those names and shapes before any data is read. Every failure is a ``ValueError`` naming ``path``
    (a missing file: :class:`MissingFileError`)."""
    path = require_file(path)
    f = _open_tensors(path)
    with f:
        if expected is not None:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            where = f" (as {config} describes them)" if config else ""
            missing, unknown = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
            if missing or unknown:
                raise ValueError(f"{path} does not hold the expected tensors{where}: missing {missing[:8]}, "
                                 f"unexpected {unknown[:8]}")
            for k, shape in expected.items():
                if shapes[k] != tuple(shape):
                    raise ValueError(f"{path}: tensor {k} has shape {shapes[k]}, expected {tuple(shape)}{where}")
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be damaged") from None
        digest = (f.metadata() or {}).get(_SHA)
    if digest is not None and tensors_sha256(tensors) != digest:
        raise ValueError(f"{path}: the tensors differ from the SHA-256 recorded when it was saved: the file is damaged")
    return tensors


def write_tagged(path: str | os.PathLike, meta: Mapping[str, Any], tensors: Mapping[str, Any], *, meta_name: str,
                 tensors_name: str, keep: bool = False) -> Path:
    """Write a folder of two files atomically (:func:`atomic_dir`, ``keep`` as there): the JSON ``meta_name``
    (``meta``, which carries its ``format`` tag and ``version``) and the safetensors ``tensors_name``, whose
    header records the JSON's SHA-256 (:func:`save_tensors`). Returns ``path``; :func:`read_tagged` reads it."""
    with atomic_dir(path, keep=keep) as tmp:
        write_json(tmp / meta_name, dict(meta))
        save_tensors(tmp / tensors_name, tensors, sidecars=[tmp / meta_name])
    return Path(path)


def read_tagged(path: str | os.PathLike, *, meta_name: str, tensors_name: str, fmt: str, version: int, what: str,
                noun: str, missing: str) -> tuple[Path, dict]:
    """``(folder, meta)`` of a folder :func:`write_tagged` wrote (the folder is :func:`resolve_dir` of
    ``path``): :class:`MissingFileError` without ``meta_name`` (``missing`` says why it is needed); then the
    JSON checked against the tensors file's record of it (:func:`check_sidecars`), then ``ValueError``
    naming the JSON unless it is an object tagged ``format == fmt`` (``what``: the kind, e.g. "an exploration
    policy") of ``version`` (``noun``: the kind in the version error, e.g. "exploration policy"). The tensors
    are read by the caller, who knows their expected shapes."""
    folder = resolve_dir(path)
    meta_file = require_file(folder / meta_name, missing)
    check_sidecars(folder / tensors_name)
    meta = read_json(meta_file)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{meta_file} is not {what} (format {found!r})")
    if meta.get("version") != version:
        raise ValueError(f"{meta_file}: unsupported {noun} format version {meta.get('version')!r} (this code reads "
                         f"version {version})")
    return folder, meta

"""plumrec.io: atomic writes (a writer killed at any moment leaves the old or the new version), and
readers whose every error names the file (and line)."""
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from plumrec.io import (
    MissingFileError,
    atomic_dir,
    atomic_path,
    check_sidecars,
    read_json,
    read_npy,
    read_tagged,
    read_tensors,
    read_text,
    read_toml,
    resolve_dir,
    save_tensors,
    write_json,
    write_tagged,
    write_text,
)


def test_atomic_path_renames_on_success_and_keeps_the_old_file_on_error(tmp_path):
    dst = tmp_path / "codes.npy"
    with atomic_path(dst) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".npy" and tmp != dst
        np.save(tmp, np.arange(3))  # the .npy suffix: np.save writes exactly tmp
    assert np.load(dst).tolist() == [0, 1, 2] and sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy"]
    with pytest.raises(RuntimeError, match="stopped"):
        with atomic_path(dst) as tmp:
            np.save(tmp, np.arange(5))
            raise RuntimeError("stopped mid-write")
    assert np.load(dst).tolist() == [0, 1, 2] and sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy"]


def test_readers_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\nstill ok\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"bad.txt: line 3: not UTF-8"):
        read_text(bad)
    trunc = tmp_path / "trunc.json"
    trunc.write_text('{\n "a": [1,\n 2')
    with pytest.raises(ValueError, match=r"trunc.json: line 3: not valid JSON"):
        read_json(trunc)
    (tmp_path / "latin.json").write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"latin.json: line 1: not UTF-8"):
        read_json(tmp_path / "latin.json")
    toml = tmp_path / "run.toml"
    toml.write_text("[sid]\nepochs = 3\n[cpt\nsteps = 1\n")
    with pytest.raises(ValueError, match=r"run.toml: not valid TOML .*line 3"):
        read_toml(toml)
    write_json(tmp_path / "ok.json", {"a": [1, 2]})
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}


def test_atomic_dir_swaps_keeps_other_files_and_recovers_between_its_renames(tmp_path):
    d = tmp_path / "model"
    with atomic_dir(d) as tmp:
        (tmp / "a.txt").write_text("old a")
        (tmp / "mine.txt").write_text("a file the writer does not write")
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("stopped")
    assert (d / "a.txt").read_text() == "old a" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(d, keep=True) as tmp:
        (tmp / "a.txt").write_text("new a")
    assert (d / "a.txt").read_text() == "new a" and (d / "mine.txt").exists()
    with atomic_dir(d) as tmp:  # without keep: the folder is what the writer wrote
        (tmp / "a.txt").write_text("newer a")
    assert sorted(p.name for p in d.iterdir()) == ["a.txt"]
    # a kill between the two renames: the old version waits at <name>.replaced
    os.replace(d, tmp_path / "model.replaced")
    assert resolve_dir(d) == tmp_path / "model.replaced" and (resolve_dir(d) / "a.txt").read_text() == "newer a"
    with atomic_dir(d, keep=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(p.name for p in d.iterdir()) == ["a.txt", "b.txt"] and resolve_dir(d) == d
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_read_npy_refuses_damaged_files_before_reading_them(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.int64).reshape(4, 3))
    data = (tmp_path / "a.npy").read_bytes()
    assert read_npy(tmp_path / "a.npy").tolist() == np.arange(12).reshape(4, 3).tolist()
    (tmp_path / "t.npy").write_bytes(data[:-5])
    with pytest.raises(ValueError, match=r"t.npy: not a readable .npy file \(its header announces 224 bytes"):
        read_npy(tmp_path / "t.npy")
    with open(tmp_path / "h.npy", "wb") as f:  # a header that claims 24 TB: refused, nothing allocated
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (10**12, 3)})
        f.write(np.arange(12, dtype=np.int64).tobytes())
    with pytest.raises(ValueError, match=r"h.npy: not a readable .npy file \(its header announces 24000000000"):
        read_npy(tmp_path / "h.npy")
    (tmp_path / "j.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="j.npy: not a readable .npy file"):
        read_npy(tmp_path / "j.npy")
    with pytest.raises(MissingFileError, match="none.npy not found") as e:
        read_npy(tmp_path / "none.npy")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)


def test_save_tensors_records_what_read_tensors_and_check_sidecars_verify(tmp_path):
    (tmp_path / "config.json").write_text('{"width": 4}')
    tensors = {"w": torch.arange(8.0).reshape(2, 4), "h": torch.ones(3, dtype=torch.bfloat16)}
    save_tensors(tmp_path / "w.safetensors", tensors, sidecars=[tmp_path / "config.json"])
    check_sidecars(tmp_path / "w.safetensors")
    back = read_tensors(tmp_path / "w.safetensors", expected={"w": (2, 4), "h": (3,)})
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match=r"w.safetensors: tensor w has shape \(2, 4\), expected \(4, 2\) \(as c"):
        read_tensors(tmp_path / "w.safetensors", expected={"w": (4, 2), "h": (3,)}, config="c")
    with pytest.raises(ValueError, match=r"w.safetensors does not hold the expected tensors.*missing \['x'\]"):
        read_tensors(tmp_path / "w.safetensors", expected={"w": (2, 4), "h": (3,), "x": (1,)})
    raw = bytearray((tmp_path / "w.safetensors").read_bytes())
    raw[-1] ^= 0x40  # one bit of the data
    (tmp_path / "w.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="w.safetensors: the tensors differ from the SHA-256"):
        read_tensors(tmp_path / "w.safetensors")
    (tmp_path / "config.json").write_text('{"width": 5}')
    with pytest.raises(ValueError, match="config.json is not the file that .*w.safetensors was saved with"):
        check_sidecars(tmp_path / "w.safetensors")
    (tmp_path / "config.json").unlink()
    with pytest.raises(MissingFileError, match="config.json not found"):
        check_sidecars(tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").write_bytes(bytes(raw[:40]))
    with pytest.raises(ValueError, match="w.safetensors: not a readable safetensors file"):
        read_tensors(tmp_path / "w.safetensors")


_WRITER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from plumrec.io import atomic_dir, atomic_path, write_json
    root, v = Path(sys.argv[1]), int(sys.argv[2])
    print("ready", flush=True)
    while True:
        v += 1
        write_json(root / "f.json", {"v": v, "pad": "x" * (40_000 + v % 7)})
        with atomic_path(root / "a.npy") as tmp:
            np.save(tmp, np.full(30_000, v))
        with atomic_dir(root / "d") as tmp:
            (tmp / "a.json").write_text(json.dumps({"v": v}))
            (tmp / "b.bin").write_bytes(bytes([v % 256]) * 100_000)
""")


def _versions(root) -> tuple[int, int, int]:
    """The version of each target, after checking that each is one complete version."""
    f = read_json(root / "f.json")
    assert len(f["pad"]) == 40_000 + f["v"] % 7
    a = read_npy(root / "a.npy")
    assert a.shape == (30_000,) and (a == a[0]).all()
    d = resolve_dir(root / "d")
    v = read_json(d / "a.json")["v"]
    assert (d / "b.bin").read_bytes() == bytes([v % 256]) * 100_000
    return f["v"], int(a[0]), v


def test_a_killed_writer_leaves_the_old_or_the_new_version(tmp_path):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", _WRITER.replace("while True", "for _ in range(1)"),
                           str(tmp_path), "0"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = _versions(tmp_path)
    rng = random.Random(0)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(max(seen))], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        now = _versions(tmp_path)
        assert all(n >= s for n, s in zip(now, seen)), (seen, now)  # nothing older than what was on disk
        seen = now
    assert max(seen) > 1  # the writer got through some versions between the kills


def test_atomic_writes_get_the_modes_plain_writes_get(tmp_path):
    """A file or folder written atomically has the mode ``open()`` / ``mkdir()`` would give it under the
    process's umask (the temporary file's 0600 / folder's 0700 must not leak into the result)."""
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f.txt").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750


def test_write_tagged_round_trips_and_read_tagged_refuses_foreign_or_changed_folders(tmp_path):
    names = dict(meta_name="m.json", tensors_name="t.safetensors")
    want = dict(names, fmt="kind", version=2, what="a thing", noun="thing", missing="a thing holds it")
    write_tagged(tmp_path / "a", {"format": "kind", "version": 2, "x": 1}, {"w": torch.arange(3.0)}, **names)
    folder, meta = read_tagged(tmp_path / "a", **want)
    assert folder == tmp_path / "a" and meta["x"] == 1
    assert read_tensors(folder / "t.safetensors")["w"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match=r"unsupported thing format version 2 \(this code reads version 3\)"):
        read_tagged(tmp_path / "a", **{**want, "version": 3})
    with pytest.raises(ValueError, match=r"m.json is not a thing \(format 'kind'\)"):
        read_tagged(tmp_path / "a", **{**want, "fmt": "other"})
    (tmp_path / "a" / "m.json").write_text('{"format": "kind", "version": 2, "x": 2}')
    with pytest.raises(ValueError, match="m.json is not the file that .*t.safetensors was saved with"):
        read_tagged(tmp_path / "a", **want)
    with pytest.raises(MissingFileError, match="m.json not found: a thing holds it"):
        read_tagged(tmp_path / "b", **want)

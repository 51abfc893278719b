import numpy as np
import pytest

from plum.io import atomic_path


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

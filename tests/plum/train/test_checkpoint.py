"""Checkpoints and resume: exact resume, the last N checkpoints, the checks a resume makes, damaged files (a
hypothesis fuzz), old single-file checkpoints, a torn metrics.jsonl, a training process killed while it writes
checkpoints, and a 2-process (gloo) run resumed by one process."""
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_training import run_torchrun
from tiny_training import tiny_lm_and_data as _setup
from tiny_training import tiny_train_config as _cfg

from plumrec.train import train
from plumrec.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_exact_resume(tmp_path, dropout):
    """With dropout the resumed run must also draw the same masks (the RNG state is checkpointed). The
    metrics log of the stopped run ends with a row after its checkpoint and a torn line (a run killed
    mid-append): both are dropped."""
    full, data = _setup(dropout=dropout)
    train(full, data, _cfg(grad_accum=2), tmp_path / "a")
    part, _ = _setup(dropout=dropout)
    train(part, data, _cfg(grad_accum=2), tmp_path / "b", stop_after=4)
    assert load_checkpoint(tmp_path / "b" / "checkpoint")["step"] == 4
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n" + '{"step": 6, "loss": 1.2')
    resumed, _ = _setup(seed=1, dropout=dropout)  # different init: everything must come from the checkpoint
    train(resumed, data, _cfg(grad_accum=2), tmp_path / "b")
    assert _same_weights(full, resumed), "resumed weights differ"
    ra, rb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["step"] for r in rb] == list(range(1, 7))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert not [p for p in os.listdir(tmp_path / "b") if ".tmp" in p]  # atomic writes leave nothing


def test_a_torn_line_inside_metrics_is_an_error_naming_the_line(tmp_path):
    train(_setup()[0], _setup()[1], _cfg(), tmp_path, stop_after=2)
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text(rows[0] + "\n" + rows[1][:7] + "\n" + rows[1] + "\n")
    metrics = re.escape(str(tmp_path / "metrics.jsonl"))
    with pytest.raises(ValueError, match=rf"{metrics}: line 2: not a JSON metrics row"):
        train(_setup()[0], _setup()[1], _cfg(), tmp_path)


def test_the_last_n_checkpoints_are_kept(tmp_path):
    """``checkpoint-<step>`` for the newest ``keep_checkpoints`` (which a resume may change), and
    ``checkpoint`` a link to the newest."""
    model, data = _setup()
    train(model, data, _cfg(checkpoint_every=1), tmp_path, stop_after=4)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 3]
    assert os.path.samefile(tmp_path / "checkpoint", tmp_path / "checkpoint-4")
    train(model, data, _cfg(checkpoint_every=1, keep_checkpoints=3, log_every=2), tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 5, 4] and latest_checkpoint(tmp_path).name == \
        "checkpoint-6"
    assert os.path.samefile(tmp_path / "checkpoint", tmp_path / "checkpoint-6")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "checkpoint-4", "checkpoint-5", "checkpoint-6",
                                            "metrics.jsonl"]
    assert sorted(os.listdir(tmp_path / "checkpoint-6")) == [".metadata", "__0_0.distcp", "state.json"]


def test_an_old_single_file_checkpoint_is_a_clear_error(tmp_path):
    """The single-file ``checkpoint-<step>.pt`` of earlier versions is refused (loaded or resumed from), never
    unpickled or silently ignored."""
    model, data = _setup()
    old = tmp_path / "checkpoint-3.pt"
    torch.save({"format": 2, "model": model.state_dict(), "step": 3}, old)
    with pytest.raises(ValueError, match=rf"{re.escape(str(old))}: a single-file checkpoint of an earlier plumrec "
                                         r"version; this version writes and resumes from checkpoint folders"):
        load_checkpoint(old)
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))} holds single-file checkpoints of an earlier "
                                         r"plumrec version \(checkpoint-3.pt\); .*start the run afresh"):
        train(model, data, _cfg(), tmp_path)
    train(model, data, _cfg(steps=1), tmp_path, resume=False)  # a fresh start still writes beside them
    assert load_checkpoint(tmp_path / "checkpoint")["step"] == 1


def test_resume_takes_the_newest_checkpoint_that_loads(tmp_path):
    full, data = _setup()
    train(full, data, _cfg(), tmp_path / "a")
    part = _setup()[0]
    train(part, data, _cfg(checkpoint_every=1), tmp_path / "b", stop_after=4)
    newest = tmp_path / "b" / "checkpoint-4"
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    resumed = _setup(seed=1)[0]
    with pytest.warns(UserWarning, match=rf"{re.escape(str(newest))}: damaged checkpoint \(__0_0.distcp fails its "
                                         r"SHA-256 check\); resuming from checkpoint-3 "
                                         r"instead \(checkpoint-4 is renamed checkpoint-4.damaged\)"):
        train(resumed, data, _cfg(checkpoint_every=1), tmp_path / "b")
    assert _same_weights(full, resumed)
    assert (tmp_path / "b" / "checkpoint-4.damaged").exists()
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [6, 5]


def test_resume_refuses_another_train_config_but_the_safe_fields(tmp_path):
    model, data = _setup()
    train(model, data, _cfg(), tmp_path, stop_after=3)
    path = re.escape(str(tmp_path / "checkpoint-3"))
    with pytest.raises(ValueError, match=rf"{path} was written with another TrainConfig "
                                         r"\(lr: 0.003 → 0.001; max_tokens: 96 → 64; seed: 5 → 6\); resume with the"):
        train(_setup()[0], data, _cfg(lr=1e-3, seed=6, max_tokens=64), tmp_path)
    with pytest.raises(ValueError, match=r"\(steps: 6 → 5 \(steps may only grow\)\)"):
        train(_setup()[0], data, _cfg(steps=5), tmp_path)
    with pytest.raises(ValueError, match=r"\(ema_decay: 0.0 → 0.5; ema_warmup: 10.0 → 2.0\)"):
        train(_setup()[0], data, _cfg(ema_decay=0.5, ema_warmup=2.0), tmp_path)
    safe = _cfg(steps=7, log_every=3, checkpoint_every=2, keep_checkpoints=1, nonfinite="skip", progress=True)
    assert train(model, data, safe, tmp_path, stop_after=1)["step"] == 4


def test_a_checkpoint_beyond_the_requested_steps_is_an_error(tmp_path):
    model, data = _setup()
    train(model, data, _cfg(), tmp_path)
    other = _setup(seed=1)[0]
    before = {k: v.clone() for k, v in other.state_dict().items()}
    path = re.escape(str(tmp_path / "checkpoint-6"))
    with pytest.raises(ValueError, match=rf"{path} is at step 6, beyond this run's "
                                         r"steps=4; resume with steps >= 6"):
        train(other, data, _cfg(steps=4), tmp_path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items()), "the weights must stay"
    assert train(other, data, _cfg(), tmp_path) == {} and _same_weights(model, other)  # a finished run re-entered


def test_ema_resumes_exactly_and_refuses_another_decay(tmp_path):
    # 0.4: reached at step 5 of 6, so the resumed part runs on the cap (0.5 would never be reached)
    full, data = _setup()
    train(full, data, _cfg(ema_decay=0.4), tmp_path / "a")
    part, _ = _setup()
    train(part, data, _cfg(ema_decay=0.4), tmp_path / "b", stop_after=4)
    resumed, _ = _setup(seed=1)
    train(resumed, data, _cfg(ema_decay=0.4), tmp_path / "b")
    assert _same_weights(full, resumed), "resumed averaged weights differ"
    again, _ = _setup(seed=2)  # a finished run re-entered: nothing to train, the model still gets the average
    assert train(again, data, _cfg(ema_decay=0.4), tmp_path / "b") == {}
    assert _same_weights(full, again)
    for other in (0.0, 0.35):
        with pytest.raises(ValueError, match=f"another TrainConfig \\(ema_decay: 0.4 → {other}\\)"):
            train(_setup()[0], data, _cfg(ema_decay=other), tmp_path / "b")
    with pytest.raises(ValueError, match=r"another TrainConfig \(ema_warmup: 10.0 → 3\)"):
        train(_setup()[0], data, _cfg(ema_decay=0.4, ema_warmup=3), tmp_path / "b")


def _other_model_checkpoint(tmp_path, **kw):
    model, data = _setup(**kw)
    train(model, data, _cfg(steps=1), tmp_path)
    return tmp_path / "checkpoint-1"


def _copy(src: Path, dst: Path, edit=None) -> Path:
    """``src`` (a checkpoint folder) copied to ``dst``, ``edit(dst)`` applied."""
    shutil.copytree(src, dst)
    if edit is not None:
        edit(dst)
    return dst


def _rehash(path: Path) -> None:
    """Rewrite ``state.json`` of ``path`` with the SHA-256 of the files as they are now (a forged checkpoint)."""
    state = json.loads((path / "state.json").read_text())
    state["files"] = {n: hashlib.sha256((path / n).read_bytes()).hexdigest() for n in state["files"]}
    body = {k: v for k, v in state.items() if k != "sha256"}
    state["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (path / "state.json").write_text(json.dumps(state))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch RAN",))


def test_damaged_or_foreign_checkpoints_name_the_folder(tmp_path, monkeypatch):
    """A truncated shard, a missing index, a flipped bit, an edited or foreign state, and an index that would run
    code even with matching hashes: each a ValueError naming the folder, loaded alone or resumed from."""
    monkeypatch.chdir(tmp_path)
    model, data = _setup()
    good = _other_model_checkpoint(tmp_path / "good")
    shard = lambda p: p / "__0_0.distcp"  # noqa: E731
    cases = {"truncated": (lambda p: shard(p).write_bytes(shard(p).read_bytes()[:500]), "__0_0.distcp fails its "),
             "no-index": (lambda p: (p / ".metadata").unlink(), "it holds"),
             "flipped": (lambda p: shard(p).write_bytes(bytes([shard(p).read_bytes()[0] ^ 0x10])
                                                        + shard(p).read_bytes()[1:]), "fails its SHA-256 check"),
             "edited": (lambda p: (p / "state.json").write_text((p / "state.json").read_text().replace(
                 '"step": 1', '"step": 0')), "state.json fails its SHA-256 check"),
             "text": (lambda p: (p / "state.json").write_text('{"step": 3'), "not a readable checkpoint"),
             "code": (lambda p: (pickle.dump(_RunsCode(), (p / ".metadata").open("wb")), _rehash(p)),
                      "not a loadable checkpoint index")}
    for name, (edit, message) in cases.items():
        path = _copy(good, tmp_path / name / "checkpoint-1", edit)
        with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{re.escape(message)}"):
            load_checkpoint(path, tensors=True)
        where = f"no checkpoint in {re.escape(str(path.parent))} loads: {re.escape(str(path))}: "
        with pytest.raises(ValueError, match=where):
            train(_setup()[0], data, _cfg(), path.parent)
    assert not (tmp_path / "RAN").exists(), "the checkpoint's index ran code"
    foreign = tmp_path / "foreign" / "checkpoint-1"
    foreign.mkdir(parents=True)
    (foreign / "state.json").write_text('{"step": 1}')
    with pytest.raises(ValueError, match=rf"{re.escape(str(foreign))}: not a plumrec training checkpoint of "
                                         r"format 3 \(found None\)"):
        load_checkpoint(foreign)
    for kw, what in [(dict(hidden=48), r"hidden_size: 48 → 32"), (dict(sizes=(8, 6)), r"vocab_size: \d+ → \d+")]:
        path = _other_model_checkpoint(tmp_path / what[:6], **kw)
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is a checkpoint of another model "
                                             rf"\(architecture or vocabulary\): .* is \(\d+, \d+\) in it, "
                                             rf".*model config {what}"):
            train(_setup()[0], data, _cfg(steps=1), path.parent)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz")
    model, data = _setup()
    train(model, data, _cfg(steps=1, ema_decay=0.3, ema_warmup=1.0), out)
    path = out / "checkpoint-1"
    return path, load_checkpoint(path, tensors=True)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


_EDITS = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.just("flip-tail"), st.integers(1, 400), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64), st.just(0)))


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from([".metadata", "__0_0.distcp", "state.json"]), edit=_EDITS)
def test_fuzz_a_damaged_checkpoint_loads_correctly_or_is_a_clear_error(saved_checkpoint, name, edit):
    src, original = saved_checkpoint
    kind, where, bit = edit
    data = bytearray((src / name).read_bytes())
    if kind.startswith("flip"):
        i = int(where * (len(data) - 1)) if kind == "flip" else max(len(data) - where, 0)
        data[i] ^= 1 << bit
    elif kind == "truncate":
        data = data[: int(where * (len(data) - 1))]
    else:
        data += where
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "checkpoint-1"
        shutil.copytree(src, path)
        (path / name).write_bytes(bytes(data))
        try:
            loaded = load_checkpoint(path, tensors=True)
        except ValueError as e:
            assert str(path) in str(e)
        else:
            assert _equal(original, loaded), f"{name}: {edit} loaded other state"


def _train_in_child(out: str, steps: int) -> None:
    torch.set_num_threads(1)
    model, data = _setup()
    train(model, data, _cfg(steps=steps, checkpoint_every=1), out)


def _kill_while_checkpointing(out: Path, steps: int) -> bool:
    """Fork a process that trains into ``out`` and SIGKILL it while it writes a checkpoint (a temporary file
    beside a checkpoint it completed), or at the latest three checkpoints after its first; whether a write
    was under way when the kill was sent."""
    before = {s for s, _ in list_checkpoints(out)}
    proc = multiprocessing.get_context("fork").Process(target=_train_in_child, args=(str(out), steps), daemon=True)
    proc.start()
    writing = False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.is_alive():
            new = {s for s, _ in list_checkpoints(out)} - before
            writing = bool(new) and any(n.endswith(".tmp") for n in os.listdir(out))
            if writing or len(new) >= 3:
                break
            time.sleep(0.0005)
        assert proc.is_alive(), f"the training process ended (exit code {proc.exitcode}) before it was killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.join(30)
    return writing


def test_a_process_killed_while_it_writes_checkpoints_resumes_exactly(tmp_path):
    """A training process (forked, so it starts warm) is killed three times mid-run, while it writes a
    checkpoint whenever the poll catches one; the run resumed from what is left reaches the weights and
    metrics of a run never interrupted."""
    steps, out = 16, tmp_path / "killed"
    full, data = _setup()
    train(full, data, _cfg(steps=steps), tmp_path / "full")
    caught = [_kill_while_checkpointing(out, steps) for _ in range(3)]
    assert any(caught), "no kill fell on a checkpoint being written"
    assert list_checkpoints(out)[0][0] < steps
    resumed = _setup(seed=1)[0]
    train(resumed, data, _cfg(steps=steps, checkpoint_every=1), out)
    assert _same_weights(full, resumed), "the killed and resumed run ends with other weights"
    assert [r["loss"] for r in _rows(out)] == [r["loss"] for r in _rows(tmp_path / "full")]
    assert [s for s, _ in list_checkpoints(out)] == [steps, steps - 1] and not list(out.glob("*.tmp*"))


def test_resume_into_the_same_model_object_is_exact(tmp_path):
    """A model that still holds the gradients of its last run resumes its optimizer state too."""
    full, data = _setup()
    train(full, data, _cfg(lr=3e-2), tmp_path / "a")
    same, _ = _setup()
    for _ in range(3):
        train(same, data, _cfg(lr=3e-2), tmp_path / "b", stop_after=2)
    assert _same_weights(full, same)


_SAVE_AT_2 = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path[:0] = [{support!r}]
    from tiny_training import tiny_lm_and_data as _setup, tiny_train_config as _cfg
    from plumrec.train import train
    from plumrec.train.distributed import shutdown_distributed
    dist.init_process_group("gloo")
    model, data = _setup(dtype=torch.float64)
    train(model, data, _cfg(grad_accum=1, fsdp={fsdp}), {out!r}, stop_after=3)
    shutdown_distributed()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)  # no interpreter finalization: see shutdown_distributed (gloo worker threads)
""")


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes_save_and_one_process_resumes(tmp_path, fsdp):
    """Two gloo processes (DDP or FSDP2, grad_accum=1) train 3 of 6 steps and save a sharded checkpoint; one
    process with grad_accum=2 (the same global batch) resumes it and reproduces the losses and weights of one
    process trained from the start (float64: the two summation orders agree to ~1e-13). One process with
    grad_accum=1 (half the global batch) is refused."""
    out, script = tmp_path / "run", tmp_path / "save.py"
    script.write_text(_SAVE_AT_2.format(support=str(Path(__file__).resolve().parents[2] / "support"), out=str(out),
                                        fsdp=fsdp))
    res = run_torchrun(script)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = load_checkpoint(out / "checkpoint")
    assert saved["step"] == 3 and saved["world_size"] == 2
    assert len(list((out / "checkpoint-3").glob("*.distcp"))) == 2  # a shard file per rank
    with pytest.raises(ValueError, match=r"written by 2 processes with grad_accum=1, this run has 1 with "
                                         r"grad_accum=1; the global batch"):
        train(_setup(dtype=torch.float64)[0], _setup()[1], _cfg(), out)
    ref, data = _setup(dtype=torch.float64)
    train(ref, data, _cfg(grad_accum=2, fsdp=fsdp), tmp_path / "single")
    resumed = _setup(seed=1, dtype=torch.float64)[0]
    train(resumed, data, _cfg(grad_accum=2, fsdp=fsdp), out)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-9, atol=1e-11, msg=k)
    rows, single = _rows(out), _rows(tmp_path / "single")
    assert [r["step"] for r in rows] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in single], rtol=1e-9)


def test_no_package_source_loads_with_weights_only_false():
    """Every ``torch.load`` in plumrec and plum_kernels runs no pickled code."""
    repo = Path(__file__).resolve().parents[3]
    sources = [p for folder in ("plum", "kernels") for p in sorted((repo / folder).rglob("*.py"))]
    assert len(sources) > 20
    found = [f"{p.relative_to(repo)}:{i}" for p in sources
             for i, line in enumerate(p.read_text().splitlines(), 1) if "weights_only=False" in line.replace(" ", "")]
    assert not found, found

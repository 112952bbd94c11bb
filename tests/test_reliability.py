"""Reliability and security (issue 6): faults, bad input and hostile updates never lose data or let anyone in.

Every test is bounded (tiny models, ``max_examples`` caps) so the whole file runs in ``make test``.
See ``docs/reliability.md`` for the table of what was tried and what happened.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from shpeft_monai import SHPEFTConfig, extract_delta, inject, select_mask, trainable_parameters
from shpeft_monai.io import DeltaFileError, delta_to_bytes, load_delta, save_delta
from tests.fuzz_targets import (
    fuzz_decode_update,
    fuzz_delta_bytes,
    fuzz_update_arrays,
    join_safetensors,
    split_safetensors,
)

pytestmark = pytest.mark.reliability
REPO = Path(__file__).resolve().parents[1]
# derandomize: a fixed, reproducible example sequence; no shrinking: bounded time
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)


# ------------------------------------------------------------------------------------------ helpers
def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


CFG = SHPEFTConfig(budget=6, hybrid="task_agnostic", head=("2",), eligible=("linear", "bias"))


def _delta(seed: int = 0, scale: float = 0.1):
    net = _net(0)
    inject(net, select_mask(net, CFG), CFG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(net):
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return extract_delta(net, meta={"seed": seed})


@functools.lru_cache(maxsize=1)
def _valid_bytes() -> bytes:
    return delta_to_bytes(_delta())


def _same_delta(a, b) -> bool:
    return (
        a.mask.fingerprint == b.mask.fingerprint
        and all(torch.equal(a.values[n], b.values[n]) for n in a.values)
        and all(torch.equal(a.head[n], b.head[n]) for n in a.head)
    )


# ------------------------------------------------------------------ 1a. fuzz the delta loader
def test_valid_delta_bytes_round_trip():
    assert fuzz_delta_bytes(_valid_bytes()) is not None


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_delta_loader_random_bytes(data):
    fuzz_delta_bytes(data)


@FUZZ
@given(st.binary(max_size=64))
def test_fuzz_delta_loader_random_bytes_behind_valid_length_prefix(body):
    # a plausible 8-byte prefix gets the loader past the first length check into the JSON parser
    fuzz_delta_bytes(len(body).to_bytes(8, "little") + body)


@FUZZ
@given(st.data())
def test_fuzz_delta_loader_mutated_valid_file(data):
    good = _valid_bytes()
    op = data.draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    if op == "flip":
        b = bytearray(good)
        for pos in data.draw(st.lists(st.integers(0, len(good) * 8 - 1), min_size=1, max_size=4)):
            b[pos // 8] ^= 1 << (pos % 8)
        mutated = bytes(b)
    elif op == "truncate":
        mutated = good[: data.draw(st.integers(0, len(good) - 1))]
    elif op == "append":
        mutated = good + data.draw(st.binary(min_size=1, max_size=64))
    else:
        start = data.draw(st.integers(0, len(good) - 1))
        mutated = good[:start] + data.draw(st.binary(max_size=32)) + good[start + 1 :]
    out = fuzz_delta_bytes(mutated)
    if out is not None and mutated != good:
        # accepted only if nothing that matters changed (the checksum covers every tensor byte)
        assert _same_delta(out, fuzz_delta_bytes(good))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(st.data())
def test_fuzz_delta_loader_header_edits(data):
    """Edit one header field (tensor entry, metadata entry, or the metadata itself) to any JSON value."""
    header, body = split_safetensors(_valid_bytes())
    meta = header["__metadata__"]
    where = data.draw(st.sampled_from(["tensor", "meta-json", "meta-raw", "metadata", "top"]))
    value = data.draw(JSON)
    if where == "tensor":
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        if field is None:
            header[name] = value
        else:
            header[name] = {**header[name], field: value}
    elif where == "meta-json":  # a metadata string holding other valid JSON (layout, config, meta)
        meta[data.draw(st.sampled_from(["layout", "config", "meta"]))] = json.dumps(value)
    elif where == "meta-raw":  # a metadata entry that is not a string at all
        meta[data.draw(st.sampled_from(sorted(meta)))] = value
    elif where == "metadata":
        header["__metadata__"] = value
    else:
        header[data.draw(st.text(max_size=6))] = value
    fuzz_delta_bytes(join_safetensors(header, body))


@pytest.mark.parametrize(
    "edit",
    [
        "metadata-list",
        "tensor-entry-int",
        "layout-list",
        "layout-tensors-list",
        "offsets-str",
    ],
)
def test_delta_loader_header_regressions(edit):
    """Header shapes that a JSON-level fuzzer finds quickly; each must be a clean DeltaFileError."""
    header, body = split_safetensors(_valid_bytes())
    if edit == "metadata-list":
        header["__metadata__"] = [1]
    elif edit == "tensor-entry-int":
        header["delta.values"] = 0
    elif edit == "layout-list":
        header["__metadata__"]["layout"] = "[]"
    elif edit == "layout-tensors-list":
        layout = json.loads(header["__metadata__"]["layout"])
        layout["tensors"] = [1]
        header["__metadata__"]["layout"] = json.dumps(layout)
    else:
        header["delta.values"]["data_offsets"] = ["a", "b"]
    with pytest.raises(DeltaFileError):
        from shpeft_monai.io import delta_from_bytes

        delta_from_bytes(join_safetensors(header, body))


# ------------------------------------------------------------------ 2. atomic writes, truncation
def test_kill_during_save_keeps_previous_artefact(tmp_path, monkeypatch):
    path = tmp_path / "delta.safetensors"
    old, new = _delta(1), _delta(2)
    save_delta(path, old)

    def killed(src, dst):  # the process dies after writing the temporary file, before the rename
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_delta(path, new)
    monkeypatch.undo()
    assert _same_delta(load_delta(path), old)  # the previous artefact is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors"]  # no temp file left

    # a real SIGKILL cannot run the cleanup: a left-over partial temp file never loads as valid
    data = delta_to_bytes(new)
    partial = tmp_path / ".delta.safetensors.abc.tmp"
    partial.write_bytes(data[: len(data) // 2])
    with pytest.raises(DeltaFileError):
        load_delta(partial)
    assert _same_delta(load_delta(path), old)


def test_kill_during_write_leaves_no_half_file(tmp_path, monkeypatch):
    path = tmp_path / "delta.safetensors"
    save_delta(path, _delta(1))
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError):
        save_delta(path, _delta(2))
    monkeypatch.undo()
    assert _same_delta(load_delta(path), _delta(1))
    assert [p.name for p in tmp_path.iterdir()] == ["delta.safetensors"]


def test_truncated_delta_at_every_eighth_is_refused(tmp_path):
    data = _valid_bytes()
    for i in range(8):
        cut = len(data) * i // 8
        path = tmp_path / f"cut{i}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(DeltaFileError):
            load_delta(path)
    with pytest.raises(FileNotFoundError):
        load_delta(tmp_path / "never-written.safetensors")


# ------------------------------------------------------------------ 1b + 5. hostile federated updates
@contextlib.contextmanager
def _flower_run():
    """Messages are created inside a Flower run; give the test process a run identity."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@functools.lru_cache(maxsize=1)
def _fed():
    from tests.test_federated import HEAD, tiny_mask

    return tiny_mask(), HEAD


def _honest(node: int, value: float, n: int, fp: str | None = None, server_round: int = 3):
    from shpeft_monai.fl import codec
    from tests.test_federated import head_arrays, reply

    mask, _ = _fed()
    vals = np.linspace(-1, 1, mask.k, dtype=np.float32) * value
    rd = codec.encode_update(vals, head_arrays(value), fp or mask.fingerprint, num_examples=n)
    return reply(node, rd, server_round)


def _aggregate(replies, server_round: int = 3):
    from shpeft_monai.fl import codec
    from tests.test_federated import strategy_with

    s = strategy_with(_fed()[0])
    arrays, metrics = s.aggregate_train(server_round, replies)
    return s, (None if arrays is None else codec.split_arrays(arrays)), metrics


DTYPES = st.sampled_from(["float32", "float64", "float16", "int64", "int8", "bool", "complex64", "uint8"])


@FUZZ
@given(
    st.data(),
    DTYPES,
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=12),
    st.sampled_from(["good", "other", "", 7]),
    st.one_of(st.none(), st.integers(-5, 10**7), st.floats(allow_nan=True), st.booleans()),
    st.booleans(),
    st.booleans(),
)
def test_fuzz_federated_update_decoder_and_aggregation(data, dtype, shape, fp, n, with_head, raw):
    """Random arrays, dtypes, lengths, NaNs, fingerprints and counts: ReplyRejected or a valid update,
    and the round always completes with the honest replies only."""
    from flwr.app import Array

    mask, head_shapes = _fed()
    if raw:  # raw bytes that need not match dtype and shape
        values = Array(
            dtype=dtype,
            shape=tuple(shape),
            stype="numpy.ndarray",
            data=data.draw(st.binary(max_size=64)),
        )
    else:
        values = data.draw(hnp.arrays(np.dtype(dtype), shape))
    arrays = {"values": values}
    if with_head:
        for name, sh in head_shapes.items():
            arrays["head." + name] = data.draw(
                hnp.arrays(np.dtype(dtype), st.sampled_from([sh, (1,)]), elements=None)
            )
    with _flower_run():
        rd = fuzz_update_arrays(
            arrays, None if n is None else {"num-examples": n}, mask.fingerprint if fp == "good" else fp
        )
        if rd is None:
            return
        out = fuzz_decode_update(rd, mask_fingerprint=mask.fingerprint, k=mask.k, head_shapes=head_shapes)
        from tests.test_federated import reply

        honest = [_honest(1, 1.0, 10), _honest(2, 3.0, 30)]
        _, got, metrics = _aggregate([honest[0], reply(9, rd, server_round=3), honest[1]])
        if out is None:  # rejected: the result is the honest-only aggregate, bit for bit
            _, want, _ = _aggregate(honest)
            assert metrics["sites-accepted"] == 2 and metrics["sites-rejected"] == 1
            assert np.array_equal(got[0], want[0])
            assert all(np.array_equal(got[1][k], want[1][k]) for k in want[1])
        else:
            assert metrics["sites-accepted"] == 3 and np.isfinite(got[0]).all()


def _hostile(kind: str, server_round: int = 3):
    from shpeft_monai.fl import codec
    from tests.test_federated import head_arrays, reply

    mask, _ = _fed()
    fp, vals = mask.fingerprint, np.ones(mask.k, np.float32)
    if kind == "nan":
        vals[0] = np.nan
        return reply(9, codec.encode_update(vals, head_arrays(1), fp, num_examples=5), server_round)
    if kind == "oversized":  # a dense-sized payload instead of k values
        dense = np.ones(mask.k * 5000, np.float32)
        return reply(9, codec.encode_update(dense, head_arrays(1), fp, num_examples=5), server_round)
    if kind == "mis-indexed":  # values for another mask (another fingerprint)
        return _honest(9, 100.0, 5, fp="f" * 64, server_round=server_round)
    if kind == "zero-examples":
        return reply(9, codec.encode_update(vals * 100, head_arrays(100), fp, num_examples=0), server_round)
    if kind == "huge-examples":  # tries to dominate the weighted mean
        big = codec.encode_update(vals * 100, head_arrays(100), fp, num_examples=10**12)
        return reply(9, big, server_round)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan", "oversized", "mis-indexed", "zero-examples", "huge-examples"])
def test_hostile_update_is_dropped_logged_and_result_is_honest_mean(kind, caplog):
    with _flower_run():
        honest = [_honest(1, 1.0, 10), _honest(2, 3.0, 30)]
        with caplog.at_level(logging.WARNING, logger="shpeft_monai.fl.strategy"):
            s, got, metrics = _aggregate([honest[0], _hostile(kind), honest[1]])
        _, want, _ = _aggregate(honest)
    assert metrics["sites-accepted"] == 2 and metrics["sites-rejected"] == 1
    # exactly the honest-only aggregate (same code path, same order) ...
    assert np.array_equal(got[0], want[0])
    assert all(np.array_equal(got[1][k], want[1][k]) for k in want[1])
    # ... which is the example-weighted mean of the honest values
    mask, _ = _fed()
    base = np.linspace(-1, 1, mask.k, dtype=np.float32).astype(np.float64)
    np.testing.assert_allclose(got[0], (10 * base + 30 * 3 * base) / 40, rtol=1e-6, atol=1e-7)
    assert [r["node"] for r in s.rejected] == [9]
    assert any("node 9" in rec.getMessage() for rec in caplog.records)


def test_replayed_old_round_reply_is_rejected():
    from shpeft_monai.fl import codec
    from tests.test_federated import head_arrays, reply

    mask, _ = _fed()
    with _flower_run():
        old = codec.encode_update(
            np.full(mask.k, 50.0, np.float32),
            head_arrays(50),
            mask.fingerprint,
            num_examples=10,
            config={"server-round": 1},
        )
        s, _, metrics = _aggregate([_honest(1, 1.0, 10), reply(9, old)], server_round=3)
    assert metrics["sites-accepted"] == 1 and [r["node"] for r in s.rejected] == [9]
    assert s.rejected[0]["reason"] == "reply is for round 1 (replayed?)"


# ------------------------------------------------------------------ 3. SIGKILL and resume
TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from torch import nn
    from ignite.engine import Engine, Events
    from shpeft_monai.handlers import TrainingCheckpoint
    from shpeft_monai.io import save_delta
    from shpeft_monai.methods import prepare_method
    from shpeft_monai.model import extract_delta, trainable_parameters

    out, pause = Path(sys.argv[1]), float(sys.argv[2])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(4)]
    cfg = {"budget": 10, "head": ["2"], "calibration_batches": 2}
    net = prepare_method(net, "shpeft", shpeft=cfg, calib_loader=data, output_dir=out, progress=False)
    opt = torch.optim.AdamW(trainable_parameters(net), lr=1e-2, weight_decay=0.01)

    def step(engine, batch):
        time.sleep(pause)
        x, y = batch
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    engine = Engine(step)
    TrainingCheckpoint(out, net, opt, resume=True).attach(engine)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: print("epoch", e.state.epoch, flush=True))
    engine.run(data, max_epochs=6)
    save_delta(out / "final_delta.safetensors", extract_delta(net))
    print("done", flush=True)
    """
)


def _train(script: Path, out: Path, pause: float = 0.0, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(pause)],
        cwd=REPO,  # never /tmp: stray modules there would shadow ours
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_sigkill_mid_training_then_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"

    # the uninterrupted reference and the victim start together (import time dominates)
    ref = _train(script, ref_dir)
    victim = _train(script, run_dir, pause=0.1, start_new_session=True)
    deadline = time.monotonic() + 90
    while not (run_dir / "last_trainer.json").is_file():  # written after last_state.pt
        assert victim.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    time.sleep(0.15)  # somewhere inside the next epoch (4 steps of >= 0.1 s each)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (run_dir / "final_delta.safetensors").exists()
    killed_at = json.loads((run_dir / "last_trainer.json").read_text())["epoch"]
    assert 1 <= killed_at < 6
    out, _ = ref.communicate(timeout=120)
    assert ref.returncode == 0, out

    resumed = _train(script, run_dir)
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out
    epochs = [int(line.split()[1]) for line in out.splitlines() if line.startswith("epoch")]
    assert epochs == list(range(killed_at + 1, 7))  # continued after the last complete epoch

    a, b = load_delta(ref_dir / "final_delta.safetensors"), load_delta(run_dir / "final_delta.safetensors")
    assert a.mask.fingerprint == b.mask.fingerprint  # same mask (reloaded from mask.safetensors)
    # fixed data order + no randomness in the step + optimizer state restored: bitwise on CPU
    assert _same_delta(a, b)


def test_sigkill_before_the_first_checkpoint_resumes_with_the_warmed_up_head(tmp_path):
    """Killed after selection (mask saved, head warmed up) but before any checkpoint: the resumed run
    warms the head up again from the same start, so it ends bitwise where the uninterrupted run does."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _train(script, ref_dir)
    victim = _train(script, run_dir, pause=0.1, start_new_session=True)
    assert victim.stdout.readline().startswith("epoch 1")  # selection done, first epoch under way
    time.sleep(0.15)  # inside epoch 1 (4 steps of >= 0.1 s): no checkpoint yet
    os.killpg(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=30)
    assert (run_dir / "mask.safetensors").is_file() and not (run_dir / "last_trainer.json").exists()
    resumed = _train(script, run_dir)
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out
    assert ref.communicate(timeout=120)[0] and ref.returncode == 0
    a, b = load_delta(ref_dir / "final_delta.safetensors"), load_delta(run_dir / "final_delta.safetensors")
    assert _same_delta(a, b)


def test_sigkill_at_random_points_then_resume_matches_uninterrupted_run(tmp_path):
    """Three SIGKILLs at random moments of training (a checkpoint save included, wherever they fall),
    a resume after each: the final delta is bitwise the uninterrupted run's."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _train(script, ref_dir)
    delays = []
    for _ in range(3):
        victim = _train(script, run_dir, pause=0.1, start_new_session=True)
        line = victim.stdout.readline()  # first "epoch" line: selection done, training under way
        if not line.startswith("epoch"):  # already finished (or failed): nothing left to kill
            victim.communicate(timeout=120)
            break
        delays.append(round(rng.uniform(0.0, 2.4), 3))  # 6 epochs x 4 steps x 0.1 s
        time.sleep(delays[-1])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=30)
    resumed = _train(script, run_dir)
    out, _ = resumed.communicate(timeout=120)
    why = f"random seed {seed}, kill delays {delays} s after training started"
    assert resumed.returncode == 0, (why, out)
    out, _ = ref.communicate(timeout=120)
    assert ref.returncode == 0, out
    a, b = load_delta(ref_dir / "final_delta.safetensors"), load_delta(run_dir / "final_delta.safetensors")
    assert a.mask.fingerprint == b.mask.fingerprint, why
    assert _same_delta(a, b), why


# ------------------------------------------------------------------ 4. bad input at scale
def _nifti(path: Path, arr: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


def _bad_datalist(tmp_path: Path) -> tuple[list[dict], list[int]]:
    from shpeft_monai.data import br35h_root

    try:
        root = br35h_root()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    d = tmp_path / "data"
    d.mkdir()
    real = sorted((root / "no").glob("*.jpg"))[:8] + sorted((root / "yes").glob("*.jpg"))[:8]
    good = []
    for i, src in enumerate(real):
        dst = d / f"good{i}.jpg"
        shutil.copyfile(src, dst)
        good.append({"image": str(dst), "label": 0 if "/no/" in str(src) else 1})
    jpeg = real[0].read_bytes()
    (d / "random.jpg").write_bytes(os.urandom(2048))
    (d / "bad_header.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 16 + jpeg[200:])
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 5])
    (d / "empty.jpg").write_bytes(b"")
    (d / "empty.nii.gz").write_bytes(b"")
    _nifti(d / "nan.nii.gz", np.full((16, 16), np.nan, np.float32))
    ok = _nifti(d / "ok.nii.gz", np.random.default_rng(0).random((16, 16)).astype(np.float32))
    (d / "truncated.nii.gz").write_bytes(ok.read_bytes()[: ok.stat().st_size // 2])
    _nifti(d / "five_channels.nii.gz", np.zeros((16, 16, 1, 1, 5), np.float32))  # 5 components
    bad = [
        {"image": str(d / "random.jpg"), "label": 0},
        {"image": str(d / "bad_header.jpg"), "label": 1},
        {"image": str(d / "truncated.jpg"), "label": 0},
        {"image": str(d / "empty.jpg"), "label": 1},
        {"image": str(d / "empty.nii.gz"), "label": 1},
        {"image": str(d / "missing.jpg"), "label": 0},
        {"image": str(d / "sub" / "missing.nii.gz"), "label": 1},
        {"image": str(d / "nan.nii.gz"), "label": 0},
        {"image": str(d / "truncated.nii.gz"), "label": 1},
        {"image": str(d / "five_channels.nii.gz"), "label": 0},
        {"image": good[0]["image"], "label": 2},  # label out of range
        {"image": good[1]["image"], "label": -1},
        {"image": good[2]["image"], "label": "yes"},
        {"label": 1},  # no image at all
    ]
    good.append({"image": str(ok), "label": 1})
    # interleave deterministically: 17 good, 14 bad, 31 entries
    items = [(g, True) for g in good] + [(b, False) for b in bad]
    order = np.random.default_rng(3).permutation(len(items))
    datalist = [items[i][0] for i in order]
    bad_idx = [j for j, i in enumerate(order) if not items[i][1]]
    return datalist, bad_idx


def test_preflight_reports_every_bad_entry_at_once(tmp_path):
    from shpeft_monai.data import DataError, preflight

    datalist, bad_idx = _bad_datalist(tmp_path)
    assert len(datalist) == 31 and len(bad_idx) == 14
    good, problems = preflight(datalist, num_classes=2, skip_bad=True)
    assert sorted(p["index"] for p in problems) == bad_idx, problems
    assert all(p["reason"] for p in problems)
    assert good == [s for i, s in enumerate(datalist) if i not in bad_idx]  # exactly the good ones, in order
    with pytest.raises(DataError) as info:
        # without skipping: one error naming every problem (good files left out: they were decoded above)
        preflight([s for i, s in enumerate(datalist) if i in bad_idx], num_classes=2)
    msg = str(info.value)
    for j, p in enumerate(problems[:10]):  # every problem is named in the one error (list may be capped)
        assert f"[{j}] {p['image']}" in msg

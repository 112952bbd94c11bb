"""Artefact contract (issue 10): integrity over metadata and tensors, the mask's own format, the
``shpeft inspect`` diagnosis of bad files, standard JSON from the one writer, and the one tensor hash."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from shpeft_monai import SHPEFTConfig, extract_delta, inject, select_mask, trainable_parameters
from shpeft_monai.cli import main
from shpeft_monai.io import (
    FORMAT,
    MASK_FILE,
    MASK_FORMAT,
    DeltaFileError,
    MaskFile,
    load_artefact,
    load_delta,
    load_mask,
    save_delta,
    save_mask,
    write_json,
)
from shpeft_monai.sparse import fingerprint_tensors
from tests.fuzz_targets import fuzz_delta_bytes, fuzz_mask_bytes, join_safetensors, split_safetensors

CFG = SHPEFTConfig(budget=6, hybrid="task_agnostic", head=("2",), eligible=("linear", "bias"))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    net = _net()
    mask = select_mask(net, CFG)
    inject(net, mask, CFG)
    with torch.no_grad():
        for p in trainable_parameters(net):
            p.add_(0.1)
    return {
        "delta": save_delta(tmp_path / "delta.safetensors", extract_delta(net, meta={"epoch": 3})),
        "mask": save_mask(tmp_path / MASK_FILE, mask, CFG.to_dict(), {"selection_seconds": 0.5}),
    }


def _edit_metadata(path: Path, part: str, edit) -> None:
    """Rewrite the header with one metadata value changed; the tensor bytes stay as they are."""
    header, body = split_safetensors(path.read_bytes())
    value = json.loads(header["__metadata__"][part])
    edit(value)
    header["__metadata__"][part] = json.dumps(value)
    path.write_bytes(join_safetensors(header, body))


EDITS = {
    "config": lambda v: v.update(budget=999),
    "meta": lambda v: v.update(note="edited"),
    "layout": lambda v: v.update(base_fingerprint="0" * 64),
}


# ------------------------------------------------------------------------ integrity of every part
def test_rewritten_header_without_edits_still_loads(files) -> None:
    for path in files.values():
        header, body = split_safetensors(path.read_bytes())
        path.write_bytes(join_safetensors(header, body))  # other whitespace, same content
    assert load_delta(files["delta"]).meta == {"epoch": 3}
    assert load_mask(files["mask"]).meta == {"selection_seconds": 0.5}


@pytest.mark.parametrize("kind", ["delta", "mask"])
@pytest.mark.parametrize("part", sorted(EDITS))
def test_edited_metadata_is_refused_naming_the_part(files, kind, part) -> None:
    _edit_metadata(files[kind], part, EDITS[part])
    with pytest.raises(DeltaFileError, match=rf"checksum mismatch: the {part} metadata was modified"):
        load_artefact(files[kind])


def test_edited_tensor_bytes_are_refused(files) -> None:
    data = bytearray(files["delta"].read_bytes())
    data[-1] ^= 0x01
    files["delta"].write_bytes(bytes(data))
    with pytest.raises(DeltaFileError, match="checksum mismatch: the tensor data was modified"):
        load_delta(files["delta"])


def test_added_metadata_entry_is_refused(files) -> None:
    header, body = split_safetensors(files["delta"].read_bytes())
    header["__metadata__"]["extra"] = "x"
    files["delta"].write_bytes(join_safetensors(header, body))
    with pytest.raises(DeltaFileError, match="added or removed"):
        load_delta(files["delta"])


def test_retired_format_is_refused_with_the_fix(files) -> None:
    header, body = split_safetensors(files["delta"].read_bytes())
    header["__metadata__"]["format"] = "shpeft-delta/1"
    files["delta"].write_bytes(join_safetensors(header, body))
    with pytest.raises(DeltaFileError, match=r"'shpeft-delta/1' is retired.*re-create"):
        load_delta(files["delta"])


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_fuzz_mask_loader_mutated_valid_file(files, data) -> None:
    """Bit flips, cuts and header edits of a mask file: refused cleanly or, if accepted, unchanged."""
    good = files["mask"].read_bytes()
    op = data.draw(st.sampled_from(["flip", "truncate", "header"]))
    if op == "flip":
        b = bytearray(good)
        pos = data.draw(st.integers(0, len(good) * 8 - 1))
        b[pos // 8] ^= 1 << (pos % 8)
        mutated = bytes(b)
    elif op == "truncate":
        mutated = good[: data.draw(st.integers(0, len(good) - 1))]
    else:
        header, body = split_safetensors(good)
        key = data.draw(st.sampled_from(sorted(header["__metadata__"])))
        header["__metadata__"][key] = data.draw(st.text(max_size=12))
        mutated = join_safetensors(header, body)
    out = fuzz_mask_bytes(mutated)
    assert fuzz_delta_bytes(mutated) is None  # never taken for a delta
    if out is not None:
        assert out.mask.fingerprint == load_mask(files["mask"]).mask.fingerprint


# ------------------------------------------------------------------------ the mask's own format
def test_mask_round_trip(files) -> None:
    net = _net()
    mask = select_mask(net, CFG)
    loaded = load_mask(files["mask"])
    assert isinstance(loaded, MaskFile)
    back, config, meta = loaded
    assert back.fingerprint == mask.fingerprint and back.base_fingerprint == mask.base_fingerprint
    assert all(torch.equal(back.indices[n], mask.indices[n]) for n in mask.indices)
    assert config == CFG.to_dict() and meta == back.meta == {"selection_seconds": 0.5}
    header, _ = split_safetensors(files["mask"].read_bytes())
    assert header["__metadata__"]["format"] == MASK_FORMAT and set(header) == {"__metadata__", "mask.indices"}


def test_mask_file_passed_to_load_delta_is_refused(files) -> None:
    with pytest.raises(DeltaFileError, match=r"mask file .*load_mask"):
        load_delta(files["mask"])


def test_delta_file_passed_to_load_mask_is_refused(files) -> None:
    with pytest.raises(DeltaFileError, match=r"delta file .*load_delta"):
        load_mask(files["delta"])


def test_prepare_method_saves_and_resumes_the_mask(tmp_path) -> None:
    from shpeft_monai.methods import prepare_method

    first = prepare_method(_net(), "shpeft", shpeft=CFG, output_dir=tmp_path, progress=False)
    saved = load_mask(tmp_path / MASK_FILE)
    assert saved.config == CFG.to_dict() and "selection_seconds" in saved.meta
    again = prepare_method(_net(), "shpeft", shpeft=CFG, output_dir=tmp_path, progress=False)
    from shpeft_monai import get_mask

    assert get_mask(first).fingerprint == saved.mask.fingerprint == get_mask(again).fingerprint


# ------------------------------------------------------------------------ shpeft inspect
def _inspect(path: Path, capsys) -> tuple[int, str, str]:
    code = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_inspect_good_delta(files, capsys) -> None:
    code, out, _ = _inspect(files["delta"], capsys)
    report = json.loads(out)
    assert code == 0 and report["kind"] == "delta" and report["format"] == FORMAT
    assert report["selected_backbone_weights"] == 6 and report["meta"] == {"epoch": 3}


def test_inspect_mask(files, capsys) -> None:
    code, out, _ = _inspect(files["mask"], capsys)
    report = json.loads(out)
    assert code == 0 and report["kind"] == "mask" and report["format"] == MASK_FORMAT
    assert report["selected_backbone_weights"] == 6 and report["config"]["budget"] == 6


def test_inspect_random_bytes(tmp_path, capsys) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    code, _, err = _inspect(path, capsys)
    assert code != 0 and "not a safetensors file" in err and "truncated" not in err


def test_inspect_directory(files, capsys) -> None:
    code, _, err = _inspect(files["delta"].parent, capsys)
    assert code != 0 and "is a directory" in err and MASK_FILE in err and "does not exist" not in err


def test_inspect_missing_file(tmp_path, capsys) -> None:
    code, _, err = _inspect(tmp_path / "nope.safetensors", capsys)
    assert code != 0 and "does not exist" in err


def test_inspect_truncated_delta(files, capsys) -> None:
    data = files["delta"].read_bytes()
    _, body = split_safetensors(data)
    files["delta"].write_bytes(data[:-10])
    code, _, err = _inspect(files["delta"], capsys)
    assert code != 0
    assert (
        f"truncated: the header promises {len(body)} bytes of tensor data but the file has {len(body) - 10}"
        in err
    )


def test_inspect_tampered_delta(files, capsys) -> None:
    _edit_metadata(files["delta"], "config", EDITS["config"])
    code, _, err = _inspect(files["delta"], capsys)
    assert code != 0 and "checksum mismatch" in err and "config" in err and "modified" in err


# ------------------------------------------------------------------------ one JSON writer
def test_write_json_is_standard_json(tmp_path) -> None:
    payload = {
        "nan": math.nan,
        "inf": -math.inf,
        "np_nan": np.float32("nan"),
        "np_float": np.float64(0.25),
        "np_int": np.int64(7),
        "array": np.array([1.0, np.inf, 2.0]),
        "tensor": torch.tensor([0.5]),
        "path": Path("/a/b"),
        "tuple": (1, 2),
        np.int64(3): "numpy key",
    }
    text = write_json(tmp_path / "m.json", payload).read_text()

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")

    back = json.loads(text, parse_constant=refuse)
    assert back == {
        "nan": None,
        "inf": None,
        "np_nan": None,
        "np_float": 0.25,
        "np_int": 7,
        "array": [1.0, None, 2.0],
        "tensor": [0.5],
        "path": "/a/b",
        "tuple": [1, 2],
        "3": "numpy key",
    }
    assert text.endswith("\n") and [p.name for p in tmp_path.iterdir()] == ["m.json"]


# ------------------------------------------------------------------------ one tensor hash
def test_tensor_hash_is_unchanged_and_checks_the_artefact(files) -> None:
    tensors = {
        "b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a.bias": torch.tensor([1, -2, 3], dtype=torch.int64),
        "c": torch.zeros(0),
    }
    # the value before io's checksum and the fingerprint were merged: base fingerprints stay valid
    assert fingerprint_tensors(tensors.items()) == (
        "93e2fc68bf46f43768cb36b1967eade0b7e5a5201cbf8b33172969f126f5fbac"
    )
    from safetensors.torch import load

    header, _ = split_safetensors(files["delta"].read_bytes())
    record = json.loads(header["__metadata__"]["sha256"])
    assert record["tensors"] == fingerprint_tensors(load(files["delta"].read_bytes()).items())

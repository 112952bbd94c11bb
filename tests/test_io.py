"""Delta artefact: bit-exact round trip, merge into a fresh base, refusal of foreign or tampered files."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

from shpeft_monai import (
    DeltaFileError,
    DeltaMismatchError,
    SHPEFTConfig,
    apply_delta,
    extract_delta,
    inject,
    load_delta,
    save_delta,
    select_mask,
    trainable_parameters,
)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 2)
    )


CFG = SHPEFTConfig(budget=20, hybrid="task_agnostic", head=("4",), eligible=("linear", "conv", "bias"))


@pytest.fixture()
def trained(tmp_path):
    net = _net(0)
    inject(net, select_mask(net, CFG), CFG)
    with torch.no_grad():
        for p in trainable_parameters(net):
            p.add_(torch.randn_like(p) * 0.1)
    delta = extract_delta(net, meta={"model": "toy"})
    path = save_delta(tmp_path / "delta.safetensors", delta)
    return net, delta, path


def test_save_load_is_bit_exact(trained) -> None:
    _, delta, path = trained
    back = load_delta(path)
    assert back.mask.fingerprint == delta.mask.fingerprint
    for n in delta.values:
        assert torch.equal(back.values[n], delta.values[n])
        assert torch.equal(back.mask.indices[n], delta.mask.indices[n])
    for n in delta.head:
        assert torch.equal(back.head[n], delta.head[n])
    assert back.config == delta.config and back.meta == {"model": "toy"}


def test_apply_delta_to_fresh_base_equals_trained_model(trained) -> None:
    net, _, path = trained
    x = torch.randn(2, 3, 8, 8)
    fresh = apply_delta(_net(0), load_delta(path))
    assert torch.equal(fresh(x), net(x))


def test_delta_for_another_base_model_is_refused(trained) -> None:
    _, _, path = trained
    with pytest.raises(DeltaMismatchError, match="made for base weights"):
        apply_delta(_net(1), load_delta(path))


def test_delta_for_another_head_size_is_refused(trained) -> None:
    _, _, path = trained
    other = _net(0)
    other[4] = nn.Linear(16, 3)
    with pytest.raises(DeltaMismatchError, match="same number of classes"):
        apply_delta(other, load_delta(path))


def test_tampered_value_is_refused(trained) -> None:
    _, _, path = trained
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DeltaFileError, match="checksum"):
        load_delta(path)


def test_trailing_garbage_and_truncation_are_refused(trained) -> None:
    _, _, path = trained
    good = path.read_bytes()
    path.write_bytes(good + b"junk")
    with pytest.raises(DeltaFileError, match="unexpected bytes"):
        load_delta(path)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DeltaFileError):
        load_delta(path)


def test_out_of_range_indices_are_refused(trained) -> None:
    from safetensors.torch import load, save

    _, _, path = trained
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors = load(data)
    tensors["mask.indices"][-1] = 10**9
    from shpeft_monai.sparse import fingerprint_tensors

    record = json.loads(meta["sha256"])
    record["tensors"] = fingerprint_tensors(tensors.items())  # a well-formed but hostile file
    meta["sha256"] = json.dumps(record)
    path.write_bytes(save(tensors, metadata=meta))
    with pytest.raises(DeltaFileError, match="outside"):
        load_delta(path)


def test_missing_file_names_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_delta(tmp_path / "nope.safetensors")


def test_mask_for_another_architecture_is_refused() -> None:
    net = _net(0)
    mask = select_mask(net, CFG)
    other = nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 2)
    )
    with pytest.raises(DeltaMismatchError, match="another architecture"):
        inject(other, mask, CFG)


def test_cli_inspect_reports_the_delta(trained, capsys) -> None:
    from shpeft_monai.cli import main

    _, delta, path = trained
    assert main(["inspect", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["selected_backbone_weights"] == delta.mask.k == 20
    assert out["mask_fingerprint"] == delta.mask.fingerprint
    assert main(["inspect", str(path.parent / "missing.safetensors")]) == 2

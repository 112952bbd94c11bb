"""Contracts of users' own data: open_dataset (folders, CSV, datalist JSON), class names from the data,
grouped splits that refuse tiny classes, the leak check, the datalist hash, and every format on one path."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shpeft_monai.data import (
    BR35H_CLASSES,
    DataError,
    DatasetSplits,
    check_splits,
    image_transforms,
    open_dataset,
    preflight,
)

SPLITS = ("train", "validation", "test")
FOUR = ("glioma", "meningioma", "none", "pituitary")


def _noise_png(path: Path, seed: int, size: int = 24) -> Path:
    """A distinct little RGB image (random noise: no two files are near duplicates of each other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _class_tree(root: Path, counts: dict[str, int]) -> Path:
    seed = 0
    for cls, n in counts.items():
        for i in range(n):
            _noise_png(root / cls / f"{cls}_{i:03d}.png", seed)
            seed += 1
    return root


def _where(ds: DatasetSplits) -> dict[str, str]:
    return {Path(e["image"]).name: s for s in SPLITS for e in ds.splits[s]}


@pytest.fixture
def four_classes(tmp_path) -> Path:
    return _class_tree(tmp_path / "tumours", dict(zip(FOUR, (12, 10, 20, 8), strict=True)))


# ---------------------------------------------------------------------------------------------------------
# Sources and class names
# ---------------------------------------------------------------------------------------------------------


def test_folder_classes_and_counts_come_from_the_data(four_classes):
    ds = open_dataset(four_classes)
    assert ds.class_names == FOUR and ds.num_classes == 4
    assert (ds.kind, ds.grouping, ds.source) == ("folder", "content", str(four_classes))
    everything = [e for s in SPLITS for e in ds.splits[s]]
    assert Counter(e["label"] for e in everything) == {0: 12, 1: 10, 2: 20, 3: 8}
    for s in SPLITS:  # every class reaches every split
        assert {e["label"] for e in ds.splits[s]} == {0, 1, 2, 3}, s
    for e in everything:
        assert Path(e["image"]).is_absolute() and Path(e["image"]).parent.name == FOUR[e["label"]]
    assert json.loads(json.dumps(ds.identity()))["class_names"] == list(FOUR)


def test_csv_flat_folder_with_string_labels(tmp_path):
    flat = tmp_path / "flat"
    rows = [(f"img{i}.png", ("benign", "malignant")[i % 2]) for i in range(20)]
    for i, (name, _) in enumerate(rows):
        _noise_png(flat / "images" / name, i)
    with open(flat / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("filename", "label"), *((f"images/{n}", lab) for n, lab in rows)])
    ds = open_dataset(flat / "labels.csv")
    assert ds.kind == "csv" and ds.class_names == ("benign", "malignant") and ds.grouping == "content"
    labels = {Path(e["image"]).name: e["label"] for s in SPLITS for e in ds.splits[s]}
    assert labels == {n: ("benign", "malignant").index(lab) for n, lab in rows}


def test_csv_split_column_is_the_users_split(tmp_path):
    given = ["train"] * 6 + ["val"] * 2 + ["Testing"] * 2
    with open(tmp_path / "data.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("path", "label", "split"))
        for i, s in enumerate(given):
            w.writerow((_noise_png(tmp_path / f"{i}.png", i).name, i % 2, s))
    ds = open_dataset(tmp_path / "data.csv")
    assert ds.grouping == "committed" and ds.class_names == ("0", "1")
    assert {s: len(ds.splits[s]) for s in SPLITS} == {"train": 6, "validation": 2, "test": 2}
    assert [Path(e["image"]).name for e in ds.splits["validation"]] == ["6.png", "7.png"]


def test_datalist_string_labels_follow_its_classes(tmp_path):
    names = [f"{i}.png" for i in range(18)]
    for i, n in enumerate(names):
        _noise_png(tmp_path / "img" / n, i)
    spec = {
        "classes": ["tumour", "healthy"],  # deliberately not sorted: the declared order wins
        "training": [
            {"image": f"img/{n}", "label": ("healthy", "tumour")[i % 2]} for i, n in enumerate(names)
        ],
    }
    (tmp_path / "datalist.json").write_text(json.dumps(spec))
    ds = open_dataset(tmp_path / "datalist.json")
    assert ds.kind == "datalist" and ds.class_names == ("tumour", "healthy")
    assert ds.grouping == "content"  # only `training` given: the split is made here
    for e in (e for s in SPLITS for e in ds.splits[s]):
        assert e["label"] == int(int(Path(e["image"]).stem) % 2 == 0)  # healthy (even) -> 1


def test_explicit_num_classes_mismatch_is_refused(four_classes):
    with pytest.raises(DataError) as info:
        open_dataset(four_classes, num_classes=2)
    msg = str(info.value)
    assert "num_classes=2" in msg and "4 classes (glioma, meningioma, none, pituitary)" in msg
    assert "leave class_names and num_classes unset" in msg


def test_explicit_class_names_mismatch_is_refused(four_classes):
    with pytest.raises(DataError) as info:
        open_dataset(four_classes, class_names=["no_tumour", "tumour"])
    msg = str(info.value)
    assert (
        "2 name(s) (no_tumour, tumour)" in msg and "4 class(es) (glioma, meningioma, none, pituitary)" in msg
    )


def test_explicit_class_names_order_string_labels(four_classes):
    order = ("pituitary", "none", "meningioma", "glioma")
    ds = open_dataset(four_classes, class_names=order, num_classes=4)
    assert ds.class_names == order
    assert all(Path(e["image"]).parent.name == order[e["label"]] for s in SPLITS for e in ds.splits[s])


def test_digit_string_labels_are_class_indices(tmp_path):
    with open(tmp_path / "t.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("image", "label"))
        w.writerows((_noise_png(tmp_path / f"{i}.png", i).name, str(i % 11)) for i in range(44))
    ds = open_dataset(tmp_path / "t.csv", val_fraction=0.25, test_fraction=0.25)
    assert ds.class_names == tuple(str(i) for i in range(11))  # numeric order: "10" is the last class
    assert all(e["label"] == int(Path(e["image"]).stem) % 11 for s in SPLITS for e in ds.splits[s])


def test_integer_labels_are_named_by_explicit_class_names(tmp_path):
    spec = {
        "training": [{"image": _noise_png(tmp_path / f"{i}.png", i).name, "label": i % 3} for i in range(15)]
    }
    (tmp_path / "d.json").write_text(json.dumps(spec))
    assert open_dataset(tmp_path / "d.json").class_names == ("0", "1", "2")
    assert open_dataset(tmp_path / "d.json", class_names="abc").class_names == ("a", "b", "c")
    with pytest.raises(DataError, match=r"labels go up to 2 \(3 classes\) but class_names has 2"):
        open_dataset(tmp_path / "d.json", class_names=["a", "b"])


# ---------------------------------------------------------------------------------------------------------
# The split made here
# ---------------------------------------------------------------------------------------------------------


def test_tiny_class_is_refused_by_name(tmp_path):
    root = _class_tree(tmp_path / "t", {"glioma": 10, "meningioma": 3})
    shutil.copy(root / "meningioma" / "meningioma_000.png", root / "meningioma" / "copy.png")
    (root / "meningioma" / "meningioma_002.png").unlink()  # 3 images, 2 content groups
    with pytest.raises(DataError) as info:
        open_dataset(root)
    msg = str(info.value)
    assert "class 'meningioma' has 3 image(s) in 2 content groups" in msg and "glioma" not in msg
    assert "at least 3 groups per class" in msg and "add images" in msg


def test_exact_duplicates_stay_in_one_split(tmp_path):
    root = _class_tree(tmp_path / "d", {"a": 20, "b": 20})
    for cls in ("a", "b"):
        for i in range(0, 20, 2):  # half the images get a byte-identical copy under another name
            shutil.copy(root / cls / f"{cls}_{i:03d}.png", root / cls / f"zz_copy_{cls}_{i:03d}.png")
    for seed in range(5):
        where = _where(open_dataset(root, seed=seed))
        for name in (n for n in where if n.startswith("zz_copy_")):
            assert where[name] == where[name.removeprefix("zz_copy_")], (seed, name)


def test_near_duplicate_grouping_keeps_mirrored_copies_together(tmp_path):
    root = _class_tree(tmp_path / "m", {"a": 12, "b": 12})
    for cls in ("a", "b"):
        for i in range(0, 12, 3):
            with Image.open(root / cls / f"{cls}_{i:03d}.png") as im:
                im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / cls / f"zz_flip_{cls}_{i:03d}.png")
    for seed in range(3):
        ds = open_dataset(root, seed=seed, grouping="near_duplicate")
        assert ds.grouping == "near_duplicate"
        where = _where(ds)
        for name in (n for n in where if n.startswith("zz_flip_")):
            assert where[name] == where[name.removeprefix("zz_flip_")], (seed, name)


def test_split_is_deterministic_per_seed(four_classes):
    first = open_dataset(four_classes, seed=7)
    assert open_dataset(four_classes, seed=7).splits == first.splits
    assert open_dataset(four_classes, seed=8).splits != first.splits


def test_sha256_changes_with_a_label_and_only_then(four_classes):
    ds = open_dataset(four_classes)
    again = open_dataset(four_classes)
    assert ds.sha256 == again.sha256 and len(ds.sha256) == 64
    changed = {s: [dict(e) for e in ds.splits[s]] for s in SPLITS}
    changed["test"][0]["label"] = (changed["test"][0]["label"] + 1) % 4
    other = DatasetSplits(changed, ds.class_names, ds.source, ds.kind, ds.grouping)
    assert other.sha256 != ds.sha256


# ---------------------------------------------------------------------------------------------------------
# check_splits
# ---------------------------------------------------------------------------------------------------------


def test_duplicate_within_a_split_is_warned(tmp_path, caplog):
    a, b = _noise_png(tmp_path / "a.png", 0), _noise_png(tmp_path / "b.png", 1)
    shutil.copy(a, tmp_path / "a_again.png")
    again, c = tmp_path / "a_again.png", _noise_png(tmp_path / "c.png", 2)
    train = [str(a), str(a), str(again), str(b)]  # a listed twice, and a byte-identical copy of a
    splits = {
        "train": [{"image": p, "label": int(p == str(again))} for p in train],
        "test": [{"image": str(c), "label": 0}],
    }
    with caplog.at_level(logging.WARNING):
        warnings = check_splits(splits)
    assert any(f"lists {a} 2 times" in w for w in warnings)
    assert any("byte-identical" in w and str(again) in w and str(a) in w for w in warnings)
    assert all("with different labels (0, 1)" in w for w in warnings)  # the copy is labelled otherwise
    assert len(warnings) == 2 and all(w in caplog.text for w in warnings)


def test_cross_split_leak_raises_naming_both_files(tmp_path):
    a = _noise_png(tmp_path / "train" / "scan.png", 0)
    leaked = tmp_path / "test" / "scan_renamed.png"
    leaked.parent.mkdir()
    shutil.copy(a, leaked)
    splits = {
        "train": [
            {"image": str(a), "label": 0},
            {"image": str(_noise_png(tmp_path / "x.png", 1)), "label": 1},
        ],
        "test": [{"image": str(leaked), "label": 0}],
    }
    with pytest.raises(DataError) as info:
        check_splits(splits)
    msg = str(info.value)
    assert "1 image(s) appear in more than one split" in msg
    assert f"train: {a}" in msg and f"test: {leaked}" in msg


def test_given_split_with_a_leak_is_refused_by_open_dataset(tmp_path):
    a = _noise_png(tmp_path / "a.png", 0)
    shutil.copy(a, tmp_path / "a_copy.png")
    spec = {
        "training": [
            {"image": "a.png", "label": 0},
            {"image": _noise_png(tmp_path / "b.png", 1).name, "label": 1},
        ],
        "test": [{"image": "a_copy.png", "label": 0}],
    }
    (tmp_path / "d.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="a_copy.png"):
        open_dataset(tmp_path / "d.json")


@pytest.mark.slow
def test_br35h_committed_split_has_no_cross_split_copies():
    ds = open_dataset("br35h")  # hashes all 3,000 files; raises on a leak
    assert ds.class_names == BR35H_CLASSES == ("no_tumour", "tumour")
    assert (ds.kind, ds.grouping) == ("br35h", "committed")
    assert check_splits(ds.splits) == [  # one byte-identical pair, inside validation (same near-dup group)
        f"split 'validation' holds 2 byte-identical files: {ds.root() / 'no' / 'no355.jpg'}, "
        f"{ds.root() / 'no' / 'no532.jpg'}"
    ]


# ---------------------------------------------------------------------------------------------------------
# Formats and preflight
# ---------------------------------------------------------------------------------------------------------


def test_every_format_goes_through_open_dataset_preflight_and_transforms(tmp_path):
    import pydicom.data
    from nibabel.testing import data_path

    root = tmp_path / "formats"
    photos, scans = root / "photo", root / "scan"
    photos.mkdir(parents=True)
    scans.mkdir()
    ramp = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)
    Image.fromarray(ramp).save(photos / "sixteen_bit.png")  # PIL mode I;16
    with Image.open(photos / "sixteen_bit.png") as im:
        assert im.mode.startswith("I")
    rgba = np.random.default_rng(1).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(photos / "rgba.png")
    grey = np.random.default_rng(2).integers(0, 256, (40, 28), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(photos / "grey.jpg")
    _noise_png(photos / "rgb.png", 3)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(pydicom.data.get_testdata_file(name), scans / name)
    for name in ("example4d.nii.gz", "anatomical.nii"):
        shutil.copy(os.path.join(data_path, name), scans / name)

    ds = open_dataset(root)
    assert ds.class_names == ("photo", "scan")
    tf = image_transforms(16, train=False)
    for s in SPLITS:
        good, problems = preflight(ds.splits[s], ds.num_classes, class_names=ds.class_names)
        assert problems == [] and len(good) == len(ds.splits[s])
        for e in good:
            out = tf(e)
            assert tuple(out["image"].shape) == (3, 16, 16) and torch.isfinite(out["image"]).all(), e
    assert sum(len(ds.splits[s]) for s in SPLITS) == 8


def test_preflight_out_of_range_label_names_the_classes(four_classes):
    ds = open_dataset(four_classes)
    with pytest.raises(DataError) as info:
        preflight(ds.splits["test"], 2, check_decode=False, class_names=BR35H_CLASSES)
    msg = str(info.value)
    assert "is outside [0, 2)" in msg
    assert "this model has 2 classes (no_tumour, tumour) but the datalist uses labels up to 3" in msg
    assert "leave num_classes unset" in msg
    assert "skip_bad" not in msg  # skipping would silently train on half the classes

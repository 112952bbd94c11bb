"""Contracts of the data layer: the committed Br35H split, one loading path for JPEG/NIfTI/DICOM, preflight."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from shpeft_monai.data import (
    BR35H_CLASSES,
    BR35H_FOLDERS,
    DataError,
    LoadMedicalImaged,
    br35h_root,
    class_names,
    folder_datalist,
    image_transforms,
    load_split,
    num_classes,
    preflight,
    subsample,
)
from shpeft_monai.data.grouping import dihedral_hashes, grey_thumbnail, min_hamming

REPO = Path(__file__).resolve().parents[1]
RESOURCE = REPO / "shpeft_monai" / "resources" / "br35h_split.json"
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def raw_split() -> dict:
    return json.loads(RESOURCE.read_text())


@pytest.fixture(scope="module")
def root() -> Path:
    return br35h_root()


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_br35h_split", REPO / "scripts" / "make_br35h_split.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _nifti_file() -> str:
    from nibabel.testing import data_path

    return os.path.join(data_path, "example4d.nii.gz")


def _dicom_file(name: str = "CT_small.dcm") -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is not installed"
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# The committed split
# ---------------------------------------------------------------------------------------------------------


def test_split_header(raw_split):
    assert raw_split["dataset"] == "br35h"
    assert raw_split["classes"] == list(BR35H_FOLDERS)  # folder names; class names: BR35H_CLASSES
    assert isinstance(raw_split["seed"], int) and raw_split["method"]
    assert set(raw_split["splits"]) == set(SPLITS)
    groups = {e["group"] for s in SPLITS for e in raw_split["splits"][s]}
    assert raw_split["groups"] == len(groups)


def test_split_covers_all_files_once(raw_split, root):
    images = [e["image"] for s in SPLITS for e in raw_split["splits"][s]]
    assert len(images) == 3000
    assert len(set(images)) == len(images)  # no duplicates, hence disjoint splits
    on_disk = {f"{c}/{p.name}" for c in BR35H_FOLDERS for p in (root / c).iterdir()}
    assert set(images) == on_disk  # every file exists and none is left out


def test_split_paths_relative_and_labels_match_folder(raw_split):
    for s in SPLITS:
        for e in raw_split["splits"][s]:
            path = e["image"]
            assert not os.path.isabs(path) and ".." not in Path(path).parts and "\\" not in path
            cls, _ = path.split("/")
            assert e["label"] == BR35H_FOLDERS.index(cls)


def test_split_sizes_and_stratification(raw_split):
    sizes = {s: len(raw_split["splits"][s]) for s in SPLITS}
    for s, share in (("train", 0.70), ("validation", 0.15), ("test", 0.15)):
        assert abs(sizes[s] / 3000 - share) < 0.02, sizes
        positives = sum(e["label"] for e in raw_split["splits"][s]) / sizes[s]
        assert abs(positives - 0.5) < 0.03, (s, positives)


def test_no_group_crosses_splits(raw_split):
    where: dict[int, set[str]] = {}
    for s in SPLITS:
        for e in raw_split["splits"][s]:
            where.setdefault(e["group"], set()).add(s)
    assert all(len(v) == 1 for v in where.values())
    labels: dict[int, set[int]] = {}
    for s in SPLITS:
        for e in raw_split["splits"][s]:
            labels.setdefault(e["group"], set()).add(e["label"])
    assert all(len(v) == 1 for v in labels.values())  # no group mixes labels


def test_no_exact_duplicate_crosses_splits_by_independent_hash(raw_split, root):
    """Recompute a different hash (imagehash 64-bit pHash) and look for copies, mirrored or not, across splits."""
    imagehash = pytest.importorskip("imagehash")
    flips = (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180)
    split_of, plain, mirrored = [], [], []
    for s in SPLITS:
        for e in raw_split["splits"][s]:
            with Image.open(root / e["image"]) as im:
                im.draft("L", (32, 32))
                grey = im.convert("L")
            split_of.append(s)
            plain.append(imagehash.phash(grey).hash.ravel())
            if s != "train":  # flips are involutions: flipping the held-out side covers both directions
                mirrored += [(len(plain) - 1, imagehash.phash(grey.transpose(t)).hash.ravel()) for t in flips]
    sp = np.asarray(split_of)
    h = np.asarray(plain, dtype=np.float32)
    same = (h @ h.T + (1 - h) @ (1 - h).T) == 64
    np.fill_diagonal(same, False)
    cross = sp[:, None] != sp[None, :]
    assert int((same & ~cross).sum()) > 1000  # the check has power: Br35H is full of copies...
    assert int((same & cross).sum()) == 0  # ...and none of them straddles two splits
    rows = np.asarray([i for i, _ in mirrored])
    m = np.asarray([b for _, b in mirrored], dtype=np.float32)
    same_mirrored = (m @ h.T + (1 - m) @ (1 - h).T) == 64
    assert int(same_mirrored.sum()) > 100  # mirrored copies exist...
    assert int((same_mirrored & (sp[rows][:, None] != sp[None, :])).sum()) == 0  # ...on one side only


def test_load_split_br35h_absolute_paths(root):
    splits = load_split("br35h")
    assert {k: len(v) for k, v in splits.items()} == {
        s: len(v) for s, v in json.loads(RESOURCE.read_text())["splits"].items()
    }
    first = splits["train"][0]
    assert Path(first["image"]).is_absolute() and Path(first["image"]).is_file()
    assert Path(first["image"]).parent.parent == root
    assert isinstance(first["label"], int)
    assert num_classes(splits) == 2 and class_names("br35h") == list(BR35H_CLASSES) == ["no_tumour", "tumour"]


def test_split_script_deterministic_on_small_tree(tmp_path, root):
    mod = _script()
    names = sorted((root / "no").iterdir())[:25] + sorted((root / "yes").iterdir())[:25]
    for p in names:
        (tmp_path / p.parent.name).mkdir(exist_ok=True)
        shutil.copy(p, tmp_path / p.parent.name / p.name)
    first = mod.dumps(mod.build(tmp_path, threshold=40, seed=0))
    assert first == mod.dumps(mod.build(tmp_path, threshold=40, seed=0))
    payload = json.loads(first)
    assert sum(len(v) for v in payload["splits"].values()) == 50
    assert str(tmp_path) not in first  # relative paths only


def test_dihedral_hash_sees_mirrored_copy(root):
    thumb = grey_thumbnail(root / "no" / "No12.jpg")
    pair = np.stack([thumb, thumb[:, ::-1]])  # the image and its mirror image
    hashes = dihedral_hashes(pair)
    assert (hashes[0, 0] != hashes[0, 1]).sum() > 64  # plain pHash: the mirror looks like another image
    assert min_hamming(hashes)[0, 1] == 0  # dihedral pHash: the same image


@pytest.mark.slow
def test_split_script_reproduces_committed_file():
    assert _script().main(["--check"]) == 0


# ---------------------------------------------------------------------------------------------------------
# Transforms: one path for JPEG modes, NIfTI and DICOM
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def br35h_by_mode(root) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for c in BR35H_FOLDERS:
        for p in sorted((root / c).iterdir()):
            with Image.open(p) as im:
                found.setdefault(im.mode, p)
    return found


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
@pytest.mark.parametrize("train", [False, True])
def test_br35h_modes_become_rgb_tensors(br35h_by_mode, mode, train):
    path = br35h_by_mode[mode]
    out = image_transforms(48, train=train)({"image": str(path), "label": 1})
    assert out["image"].shape == (3, 48, 48) and out["image"].dtype == torch.float32
    assert torch.isfinite(out["image"]).all()
    assert out["label"].dtype == torch.long and int(out["label"]) == 1


def test_mixed_modes_collate_into_one_batch(br35h_by_mode):
    from monai.data import DataLoader, Dataset

    datalist = [
        {"image": str(br35h_by_mode[m]), "label": i % 2} for i, m in enumerate(("RGB", "L", "RGBA", "P"))
    ]
    batch = next(iter(DataLoader(Dataset(datalist, image_transforms(32, train=True)), batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("source", ["jpeg", "nifti", "ct", "mr"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_medical_formats_load_through_the_same_transforms(root, source, spatial_dims):
    path = {
        "jpeg": str(root / "no" / "No12.jpg"),
        "nifti": _nifti_file(),
        "ct": _dicom_file("CT_small.dcm"),
        "mr": _dicom_file("MR_small.dcm"),
    }[source]
    loaded = LoadMedicalImaged("image", spatial_dims=spatial_dims)({"image": path})["image"]
    assert loaded.dtype == np.float32 and loaded.min() >= 0.0 and loaded.max() <= 1.0 and loaded.max() > 0.5
    assert loaded.shape[0] == (3 if spatial_dims == 2 else 1) and loaded.ndim == spatial_dims + 1
    for train in (False, True):
        out = image_transforms(16, train=train, spatial_dims=spatial_dims)({"image": path, "label": 0})
        expected = (3, 16, 16) if spatial_dims == 2 else (1, 16, 16, 16)
        assert tuple(out["image"].shape) == expected and out["image"].dtype == torch.float32
        assert torch.isfinite(out["image"]).all()


def test_volume_gives_its_middle_axial_slice():
    path = _nifti_file()
    img = nib.as_closest_canonical(nib.load(path))
    volume = np.asarray(img.dataobj, dtype=np.float32)[..., 0]
    mid = volume[:, :, volume.shape[2] // 2]
    loaded = LoadMedicalImaged("image", spatial_dims=2)({"image": path})["image"]
    assert loaded.shape == (3, *mid.shape)
    assert np.array_equal(loaded[0], loaded[1]) and np.array_equal(loaded[0], loaded[2])
    assert np.corrcoef(loaded[0].ravel(), mid.ravel())[0, 1] > 0.95


def test_eval_transforms_are_deterministic_and_normalised(root):
    path = str(root / "yes" / "y0.jpg")
    tf = image_transforms(32, train=False, mean=(0.5,), std=(0.25,))
    a, b = tf({"image": path})["image"], tf({"image": path})["image"]
    assert torch.equal(a, b)
    assert a.min() >= (0 - 0.5) / 0.25 - 1e-5 and a.max() <= (1 - 0.5) / 0.25 + 1e-5


# ---------------------------------------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def hostile_datalist(tmp_path, root) -> list[dict]:
    good = tmp_path / "good.jpg"
    shutil.copy(root / "no" / "No12.jpg", good)
    payload = (root / "yes" / "y0.jpg").read_bytes()
    (tmp_path / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "truncated.jpg").write_bytes(payload[: len(payload) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    nib.save(
        nib.Nifti1Image(np.full((8, 8, 4), np.nan, dtype=np.float32), np.eye(4)), tmp_path / "nan.nii.gz"
    )
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4, 1, 5), dtype=np.float32), np.eye(4)), tmp_path / "five.nii.gz")
    return [
        {"image": str(good), "label": 1},
        {"image": str(tmp_path / "corrupt.jpg"), "label": 0},
        {"image": str(tmp_path / "truncated.jpg"), "label": 0},
        {"image": str(tmp_path / "empty.png"), "label": 0},
        {"image": str(tmp_path / "missing.jpg"), "label": 0},
        {"image": str(tmp_path / "nan.nii.gz"), "label": 0},
        {"image": str(good), "label": 2},  # out of range for 2 classes
        {"image": str(good), "label": "1"},  # not an int
        {"image": str(tmp_path / "five.nii.gz"), "label": 0},  # 5 channels for a 2D model
    ]


EXPECTED_REASONS = {
    1: "cannot decode",
    2: "cannot decode",
    3: "empty file",
    4: "missing",
    5: "NaN/Inf",
    6: "outside [0, 2)",
    7: "not an integer",
    8: "channel",
}


def test_preflight_reports_every_problem_at_once(hostile_datalist):
    with pytest.raises(DataError) as info:
        preflight(hostile_datalist, num_classes=2)
    message = str(info.value)
    assert f"{len(EXPECTED_REASONS)} bad sample(s) out of {len(hostile_datalist)}" in message
    for index, reason in EXPECTED_REASONS.items():
        line = next(ln for ln in message.splitlines() if ln.strip().startswith(f"[{index}]"))
        assert hostile_datalist[index]["image"] in line and reason in line, line
    assert "skip_bad=True" in message and "skip_bad_samples" in message
    assert {p["index"] for p in info.value.problems} == set(EXPECTED_REASONS)


def test_preflight_skip_bad_returns_only_good(hostile_datalist, caplog):
    good, problems = preflight(hostile_datalist, num_classes=2, skip_bad=True)
    assert good == [hostile_datalist[0]]
    assert {p["index"] for p in problems} == set(EXPECTED_REASONS)
    assert all(set(p) == {"image", "index", "reason"} for p in problems)
    assert sum("skipping sample" in r.getMessage() for r in caplog.records) == len(EXPECTED_REASONS)


def test_preflight_message_truncates_long_lists(tmp_path):
    datalist = [{"image": str(tmp_path / f"gone{i}.jpg"), "label": 0} for i in range(80)]
    with pytest.raises(DataError) as info:
        preflight(datalist, num_classes=2)
    assert "... and 30 more" in str(info.value) and len(info.value.problems) == 80


def test_preflight_passes_real_formats(root):
    datalist = [
        {"image": str(root / "no" / "no400.jpg"), "label": 0},
        {"image": _nifti_file(), "label": 1},
        {"image": _dicom_file("CT_small.dcm"), "label": 1},
    ]
    good, problems = preflight(datalist, num_classes=2)
    assert good == datalist and problems == []


# ---------------------------------------------------------------------------------------------------------
# Datalists
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def class_tree(tmp_path, root) -> Path:
    tree = tmp_path / "tree"
    for cls, src in (("tumour", "yes"), ("healthy", "no")):
        (tree / cls).mkdir(parents=True)
        for p in sorted((root / src).iterdir())[:10]:
            shutil.copy(p, tree / cls / p.name)
    (tree / "healthy" / "notes.txt").write_text("not an image")
    return tree


def test_folder_datalist_stratified_split(class_tree):
    splits = folder_datalist(class_tree, seed=3)
    assert class_names(class_tree) == ["healthy", "tumour"]
    images = [e["image"] for s in SPLITS for e in splits[s]]
    assert len(images) == len(set(images)) == 20  # disjoint, complete, notes.txt ignored
    for s, n in (("train", 6), ("validation", 2), ("test", 2)):
        assert Counter(e["label"] for e in splits[s]) == {0: n, 1: n}
    for e in splits["train"]:
        assert (
            Path(e["image"]).is_absolute()
            and Path(e["image"]).parent.name == ["healthy", "tumour"][e["label"]]
        )
    assert folder_datalist(class_tree, seed=3) == splits
    assert folder_datalist(class_tree, seed=4) != splits
    flipped = folder_datalist(class_tree, classes=["tumour", "healthy"], seed=3)
    assert all(Path(e["image"]).parent.name == "tumour" for e in flipped["train"] if e["label"] == 0)
    assert load_split(class_tree) == folder_datalist(class_tree)


def test_folder_datalist_rejects_bad_fractions(class_tree):
    with pytest.raises(ValueError, match="val_fraction"):
        folder_datalist(class_tree, val_fraction=0.6, test_fraction=0.5)


def test_load_split_user_json_resolves_relative_paths(class_tree, tmp_path):
    spec = {
        "training": [
            {"image": "healthy/" + p.name, "label": 0} for p in sorted((class_tree / "healthy").glob("*.jpg"))
        ],
        "validation": [{"image": str(next((class_tree / "tumour").glob("*.jpg"))), "label": 1}],
    }
    inside = class_tree / "datalist.json"
    inside.write_text(json.dumps(spec))
    splits = load_split(inside)
    assert len(splits["train"]) == 10 and len(splits["validation"]) == 1 and splits["test"] == []
    assert all(Path(e["image"]).is_file() for s in SPLITS for e in splits[s])
    outside = tmp_path / "elsewhere" / "datalist.json"
    outside.parent.mkdir()
    outside.write_text(json.dumps(spec))
    assert load_split(outside, root=class_tree) == splits
    assert num_classes(splits) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="no split key"):
        load_split(bad)


def test_subsample_is_stratified_seeded_subset():
    datalist = [{"image": f"{i}.jpg", "label": int(i % 4 == 0)} for i in range(400)]  # 25 % positives
    small = subsample(datalist, 40, seed=1)
    assert len(small) == 40 and Counter(e["label"] for e in small) == {0: 30, 1: 10}
    assert all(e in datalist for e in small)
    assert [e["image"] for e in small] == sorted((e["image"] for e in small), key=lambda s: int(s[:-4]))
    assert small == subsample(datalist, 40, seed=1) and small != subsample(datalist, 40, seed=2)
    assert subsample(datalist, 1000, seed=0) == datalist


def test_subsample_keeps_a_rare_class_and_refuses_fewer_samples_than_classes():
    datalist = [{"image": f"{i}.png", "label": 2 if i < 2 else i % 2} for i in range(100)]  # 2 rare
    small = subsample(datalist, 10, seed=0)
    counts = Counter(e["label"] for e in small)
    assert len(small) == 10 and counts[2] == 1 and counts[0] + counts[1] == 9  # 0.2 rounds to 0 otherwise
    assert subsample(datalist, 3, seed=0) and {e["label"] for e in subsample(datalist, 3, seed=0)} == {
        0,
        1,
        2,
    }
    with pytest.raises(ValueError, match="cannot hold one sample of each of the 3 classes"):
        subsample(datalist, 2, seed=0)

"""The bundle's metadata.json passes MONAI's verify_metadata offline, against the schema kept in the repo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import scripts as bundle_scripts
from monai.bundle import verify_metadata

from tests.conftest import BUNDLE

META = BUNDLE / "metadata.json"
SCHEMA = BUNDLE / "meta_schema.json"
REQUIRED = json.loads(SCHEMA.read_text())["required"]
# the schema file is ours, kept in the repository: no published hash to check it against
pytestmark = pytest.mark.filterwarnings("ignore:No hash value provided:UserWarning")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """verify_metadata downloads its schema unless `filepath` exists: refuse any download."""
    real = bundle_scripts.download_url

    def local_only(url, filepath="", *args, **kwargs):
        if not Path(filepath).is_file():
            raise AssertionError(f"verify_metadata tried to download {url}")
        return real(url, filepath, *args, **kwargs)

    monkeypatch.setattr(bundle_scripts, "download_url", local_only)


def _write(tmp_path: Path, meta: dict) -> Path:
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta))
    return path


def test_metadata_is_valid_against_the_repo_schema() -> None:
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA))


def test_version_has_a_changelog_entry() -> None:
    meta = json.loads(META.read_text())
    assert meta["version"] in meta["changelog"]


@pytest.mark.parametrize("key", REQUIRED)
def test_metadata_missing_a_required_key_fails(tmp_path, key) -> None:
    meta = json.loads(META.read_text())
    del meta[key]
    with pytest.raises(ValueError, match=key):
        verify_metadata(meta_file=str(_write(tmp_path, meta)), filepath=str(SCHEMA))


def test_input_tensor_without_dtype_fails(tmp_path) -> None:
    meta = json.loads(META.read_text())
    del meta["network_data_format"]["inputs"]["image"]["dtype"]
    with pytest.raises(ValueError):
        verify_metadata(meta_file=str(_write(tmp_path, meta)), filepath=str(SCHEMA))


def test_wrong_type_fails(tmp_path) -> None:
    meta = json.loads(META.read_text())
    meta["version"] = 1
    with pytest.raises(ValueError, match="version|1"):
        verify_metadata(meta_file=str(_write(tmp_path, meta)), filepath=str(SCHEMA))

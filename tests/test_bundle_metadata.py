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


def test_measured_metrics_are_written_from_a_run(tmp_path) -> None:
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("bundle_metadata", REPO / "scripts" / "bundle_metadata.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(
        json.dumps({"accuracy": 0.91234, "balanced_accuracy": 0.9, "f1_macro": 0.8999, "roc_auc": None})
    )
    (run / "run.json").write_text(
        json.dumps(
            {"method": "shpeft", "network_name": "vit", "img_size": 112, "data": {"sizes": {"test": 452}}}
        )
    )
    meta = tmp_path / "metadata.json"
    meta.write_text(META.read_text())
    assert tool.main([str(run), "--metadata", str(meta)]) == 0
    written = json.loads(meta.read_text())
    assert written["eval_metrics"] == {"accuracy": 0.9123, "balanced_accuracy": 0.9, "f1_macro": 0.8999}
    assert tool.main([str(run), "--metadata", str(meta), "--check"]) == 0
    verify_metadata(meta_file=str(meta), filepath=str(SCHEMA))


def test_bundle_metadata_carries_measured_metrics() -> None:
    """Never the placeholder zeros: the committed numbers come from scripts/bundle_metadata.py."""
    metrics = json.loads(META.read_text())["eval_metrics"]
    assert metrics and all(0.5 < v <= 1.0 for v in metrics.values())
    assert "make demo" in json.loads(META.read_text())["eval_metrics_source"]

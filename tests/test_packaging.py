"""The bundle's configs ship inside the package, so `shpeft demo` and the bundle commands work from a
normal (non-editable) install as well as from the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from shpeft_monai import cli

from .conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (path,) = out.glob("shpeft_monai-*.whl")
    return path


def test_wheel_carries_every_bundle_config(wheel) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.relative_to(REPO / "shpeft_monai") for p in cli.BUNDLE.rglob("*") if p.is_file())
    assert configs, "no bundle configs found next to the package"
    missing = [str(c) for c in configs if f"shpeft_monai/{c.as_posix()}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "shpeft_monai/bundles/br35h_shpeft/docs/README.md" in names


def test_demo_finds_the_bundle_inside_the_package() -> None:
    assert cli.BUNDLE.is_relative_to(REPO / "shpeft_monai")
    assert (cli.BUNDLE / "train.yaml").is_file() and (cli.BUNDLE / "overlays" / "cpu_demo.yaml").is_file()


def test_configs_command_prints_the_installed_bundle(capsys) -> None:
    assert cli.main(["configs"]) == 0
    assert capsys.readouterr().out.strip() == str(cli.BUNDLE)

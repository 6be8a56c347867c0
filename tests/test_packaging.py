"""A non-editable install (``pip install .``) carries its configs and data and works from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_under_src_is_listed_for_the_wheel() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src" / "mergelab").rglob("__init__.py")
    }
    assert found | {"mergelab.resources.conf", "mergelab.resources.data"} == listed


def test_the_wheel_finds_its_configs_and_data_from_anywhere(tmp_path: Path) -> None:
    src = tmp_path / "src_copy"  # built from a copy: the build writes build/ and egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("src", "conf", "data"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("mergelab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        "mergelab/resources/conf/config.yaml",
        "mergelab/resources/conf/method/fisher.yaml",
        "mergelab/resources/data/embedded/tasks.yaml",
        "mergelab/resources/data/embedded/tweet_sentiment/test.parquet",
        "mergelab/resources/data/papers/awd_vit_b32.yaml",
        "mergelab/resources/data/clip8/tasks.yaml",
    }
    assert shipped <= names, sorted(shipped - names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the unpacked wheel shadows the editable install
    probe = "import mergelab.locations as l; print(l.CONFIG_DIR); print(l.DATA_DIR)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(site / "mergelab/resources/conf"), str(site / "mergelab/resources/data")]
    help_out = subprocess.run(
        [sys.executable, "-m", "mergelab.cli", "--help"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert help_out.returncode == 0, help_out.stderr
    assert "fisher" in help_out.stdout
    job = subprocess.run(
        [sys.executable, "-m", "mergelab.cli", "--cfg", "job", "--resolve", "logger=none"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert job.returncode == 0, job.stderr
    dirs = {Path(line.split(": ", 1)[1]) for line in job.stdout.splitlines() if line.strip().startswith("data_dir:")}
    assert dirs == {site / "mergelab/resources/data", site / "mergelab/resources/data/embedded"}  # paths, eval
    assert (site / "mergelab/resources/data/embedded/tasks.yaml").is_file()

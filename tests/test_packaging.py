"""A non-editable install (``pip install .``) carries its configs and data, works from any directory and writes its
results under the current directory's ``outputs/``, never inside the installed package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests import test_run_flow
from tests.test_run_flow import pool_overrides

ROOT = Path(__file__).resolve().parents[1]

#: The tiny Llama pool (base and two experts, written by tests/test_run_flow.py's fixture for this module too).
pool_dirs = test_run_flow.pool_dirs


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built (once per module) from a copy of the sources, as ``pip install .`` builds it."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src_copy"  # built from a copy: the build writes build/ and egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("src", "conf", "data"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp / "wheels"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (built,) = wheels.glob("mergelab-*.whl")
    return built


def test_every_package_under_src_is_listed_for_the_wheel() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src" / "mergelab").rglob("__init__.py")
    }
    assert found | {"mergelab.resources.conf", "mergelab.resources.data"} == listed


def test_the_wheel_finds_its_configs_and_data_from_anywhere(wheel: Path, tmp_path: Path) -> None:
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
    roots = [line.split(": ", 1)[1] for line in job.stdout.splitlines() if line.strip().startswith("output_root:")]
    assert roots == [str(elsewhere / "outputs")]  # the current dir's, not the package's
    assert (site / "mergelab/resources/data/embedded/tasks.yaml").is_file()


def test_a_checkout_writes_under_the_repository_from_any_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source checkout (or an editable install) keeps every run's results in ``<repo>/outputs``."""
    from hydra import compose, initialize_config_dir

    from mergelab.cli import CONFIG_DIR  # registers the config resolvers

    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=["logger=none"], return_hydra_config=True)
    assert Path(cfg.paths.output_root) == ROOT / "outputs"
    assert Path(cfg.hydra.run.dir).parent == ROOT / "outputs" / "runs"
    assert Path(cfg.hydra.sweep.dir).parent == ROOT / "outputs" / "multirun"


def fresh_venv(where: Path, wheel: Path) -> tuple[Path, Path]:
    """A new venv with only ``wheel`` installed in it, which sees the project venv's packages (torch & co.) through a
    ``.pth`` line instead of reinstalling them. Returns its bin dir and its site-packages.

    The wheel is installed (by the project's pip, run with the new interpreter) before that line exists, so pip sees
    no other mergelab and touches nothing outside the new venv. A plain path line adds the project's site-packages
    without running its ``.pth`` files: the editable install's finder, which maps ``mergelab`` to ``src/``, stays out.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    bin_dir = where / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=300)
    purelib = [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    site = Path(subprocess.run(purelib, check=True, capture_output=True, text=True).stdout.strip())
    shared = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))  # the project venv's
    (site / "zz_project_venv.pth").write_text("".join(f"{p}\n" for p in shared))
    return bin_dir, site


def snapshot(tree: Path) -> dict[str, tuple[int, int]]:
    """Every file and dir under ``tree`` with its size and modification time: any write inside changes it."""
    return {str(p.relative_to(tree)): (p.stat().st_size, p.stat().st_mtime_ns) for p in [tree, *tree.rglob("*")]}


def test_an_installed_wheel_writes_its_results_under_the_current_dir(
    wheel: Path, pool_dirs: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """``pip install`` of the wheel into a fresh venv, then ``mergelab`` run from another dir: a merge lands in
    ``./outputs/runs/<timestamp>``, a sweep in ``./outputs/multirun/<timestamp>/<job>``; ``--help`` and a config
    error work there too; nothing is written inside the installed package."""
    bin_dir, site = fresh_venv(tmp_path / "venv", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    # No bytecode written on import either, so that the package's tree must stay exactly as pip left it.
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONDONTWRITEBYTECODE": "1"}

    def mergelab(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_dir / "mergelab"), *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600
        )

    probe = "import mergelab, mergelab.locations as l; print(mergelab.__file__); print(l.FROM_CHECKOUT)"
    out = subprocess.run(
        [str(bin_dir / "python"), "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(site / "mergelab" / "__init__.py"), "False"]  # the wheel's mergelab, not the source tree's
    package = site / "mergelab"
    before = snapshot(package)

    helped = mergelab("--help")
    assert helped.returncode == 0, helped.stderr
    assert "fisher" in helped.stdout
    wrong = mergelab("method=magic", "logger=none")
    assert wrong.returncode != 0
    assert "Could not find 'method/magic'" in wrong.stderr
    assert not (elsewhere / "outputs").exists()  # refused before a run dir is claimed

    merge = ["method=ties", "method.k=30", "eval=none"]
    ran = mergelab(*pool_overrides(pool_dirs), *merge)
    assert ran.returncode == 0, ran.stderr[-3000:]
    (run_dir,) = (elsewhere / "outputs" / "runs").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["merged_model"] == str(run_dir / "merged_model")
    assert (run_dir / "merged_model" / "mergelab_recipe.json").is_file()
    swept = mergelab("-m", *pool_overrides(pool_dirs), *merge, "method.scaling=0.5")
    assert swept.returncode == 0, swept.stderr[-3000:]
    (sweep_dir,) = (elsewhere / "outputs" / "multirun").iterdir()
    assert (sweep_dir / "0" / "metrics.json").is_file()

    assert sorted(p.name for p in elsewhere.iterdir()) == ["outputs"]  # nothing else in the current dir
    assert snapshot(package) == before
    assert not (package / "resources" / "outputs").exists()

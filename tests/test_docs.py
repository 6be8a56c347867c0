"""The documentation: the MkDocs site builds strictly, README.md stays short and links only to pages and anchors that
exist, and the generated regions (scripts/docs_regions.py) are current and rendered from their sources."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "docs_regions.py"
PENDING = "(figures pending: experiments/first_hour.json)"
# A markdown link's target: [text](target), the target without its title.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# The banner mkdocs-material prints on every build is noise in a failure's output.
MKDOCS_ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}


def load_generator() -> ModuleType:
    """scripts/docs_regions.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("docs_regions", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = load_generator()


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of ``config`` into ``site``."""
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "--site-dir", str(site)]
    return subprocess.run(cmd, capture_output=True, text=True, env=MKDOCS_ENV, timeout=300, check=False)


def nav_pages() -> list[str]:
    """The markdown files mkdocs.yml's nav lists."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [page for entry in nav for page in entry.values()]


def anchors(page: Path) -> set[str]:
    """The heading anchors of a markdown page, as MkDocs's toc extension spells them."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # no headings inside code blocks
    return {slugify(m[1].replace("`", ""), "-") for m in re.finditer(r"^#{1,6} (.+?)\s*$", text, re.M)}


# ----------------------------------------------------------------------------------------------- the site


def test_the_site_builds_strictly_with_every_page(tmp_path: Path) -> None:
    proc = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav_pages()) == docs  # every page is in the nav, and the nav names no missing page
    for page in docs:
        built = tmp_path / "site" / ("index.html" if page == "index.md" else page.replace(".md", "/index.html"))
        assert built.is_file(), page
    methods = (tmp_path / "site" / "methods" / "index.html").read_text()
    for path in sorted((ROOT / "conf" / "method").glob("*.yaml")):
        assert f'id="{path.stem}"' in methods, f"no section for {path.name} on the methods page"


def test_the_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    # The check above would pass vacuously if strict mode did not catch bad links: break one in a copy.
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "index.md").open("a") as f:
        f.write("\nSee [the missing page](no-such-page.md) and [a missing section](methods.md#no-such-section).\n")
    proc = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    assert "no-such-page.md" in proc.stderr and "no-such-section" in proc.stderr, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------- README


def test_readme_is_short_and_links_only_to_docs_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    targets = LINK.findall(readme)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "the README links into the docs"
    for target in local:
        path, _, anchor = target.partition("#")
        assert path.startswith("docs/"), f"README links outside docs/: {target}"
        page = ROOT / path
        assert page.is_file(), f"README links to a missing page: {target}"
        if anchor:
            assert anchor in anchors(page), f"README links to a missing section: {target}"
    linked = {t.partition("#")[0].removeprefix("docs/") for t in local}
    assert set(nav_pages()) <= linked, f"pages the README does not link: {sorted(set(nav_pages()) - linked)}"


def test_readme_setup_commands_are_the_ones_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Set-up: two commands\n")
    setup = readme[start : readme.index("\n## ", start + 1)]
    commands = re.findall(r"^```bash\n(.*?)\n```", setup, re.M | re.S)
    assert len(commands) == 2 and commands[0].endswith("&& mergelab experiment=embedded_table")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci  # .ci/run runs exactly the README's test command
    assert "<!-- generated:first_hour -->" in setup


# ----------------------------------------------------------------------------------------------- generated regions


def test_generated_regions_are_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    regions = {
        path.relative_to(ROOT).as_posix(): set(gen.OPENING.findall(path.read_text()))
        for path in gen.markdown_files(ROOT)
    }
    assert {"first_hour", "methods_table"} <= regions["README.md"]
    assert "methods" in regions["docs/methods.md"]
    assert {"first_hour", "embedded_table", "smollm2_generative", "smollm2_data_free"} <= regions["docs/benchmarks.md"]
    if not (ROOT / "experiments" / "first_hour.json").exists():  # pending: the region keeps its placeholder
        for name in ("README.md", "docs/benchmarks.md"):
            assert PENDING in (ROOT / name).read_text(), name


TINY_METHOD = """\
# Tiny merging (Nobody et al. 2030): a method for this test.
# Its second header line.
defaults:
  - /method@merge: task_arithmetic
  - _self_

_target_: my.pkg.Tiny
name: tiny
alpha: 0.25        # how much of it
mode: fast         # fast | slow (the slow one
                   # is exact)
# A note on the options below.
seed: 7
include: ['a|b']
grid:
  alpha: [0.1, 0.25]
"""


def region_file(path: Path, *names: str, body: str = "old text") -> Path:
    """A markdown file holding an empty-ish region of each of ``names``."""
    parts = [f"# Page\n\n<!-- generated:{n} -->\n\n{body}\n\n<!-- /generated:{n} -->\n" for n in names]
    path.write_text("\n".join(parts) + "\nThe end.\n")
    return path


def test_the_generator_renders_a_method_yaml_and_finds_it_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "conf" / "method").mkdir(parents=True)
    yaml_path = tmp_path / "conf" / "method" / "tiny.yaml"
    yaml_path.write_text(TINY_METHOD)
    page = region_file(tmp_path / "page.md", "methods", "methods_table")
    args = ["--root", str(tmp_path), str(page)]
    assert gen.main(["--check", *args]) == 1  # "old text" is stale
    err = capsys.readouterr().err
    assert "page.md: region 'methods' is stale" in err and "page.md: region 'methods_table' is stale" in err
    assert "old text" in page.read_text()  # --check writes nothing

    assert gen.main(args) == 0
    text = page.read_text()
    assert "### tiny" in text
    assert "Tiny merging (Nobody et al. 2030): a method for this test. Its second header line." in text
    assert "`method=tiny` · class `my.pkg.Tiny`" in text
    assert "- `alpha` = `0.25` — how much of it" in text
    assert "- `mode` = `fast` — fast | slow (the slow one is exact)" in text  # a continued comment
    assert "A note on the options below.\n\n- `seed` = `7`\n" in text  # a comment block: a note, the option bare
    assert "- `include` = `['a|b']`" in text
    assert "- `grid` = `{alpha: [0.1, 0.25]}`" in text
    assert "- `merge` = `task_arithmetic` — the inner method" in text
    # The README table: a link to the section, the title, only short scalar options.
    row = next(line for line in text.splitlines() if line.startswith("| [`tiny`]"))
    assert row == (
        "| [`tiny`](docs/methods.md#tiny) | Tiny merging (Nobody et al. 2030) "
        "| `merge` (task_arithmetic), `alpha` (0.25), `mode` (fast), `seed` (7) | - |"
    )
    assert text.endswith("The end.\n") and "old text" not in text
    capsys.readouterr()
    assert gen.main(["--check", *args]) == 0

    yaml_path.write_text(TINY_METHOD.replace("alpha: 0.25 ", "alpha: 0.5  "))
    assert gen.main(["--check", *args]) == 1
    assert "region 'methods' is stale" in capsys.readouterr().err
    assert gen.main(args) == 0 and "- `alpha` = `0.5` — how much of it" in page.read_text()


FIRST_HOUR = {
    "date": "2031-02-03",
    "machine": "a 2-core test box",
    "warm_table": {"first_row_s": 12.34, "total_s": 456.7, "rows": 17},
    "cold": {"command1_s": None, "expert_s": 88.8},
    "eval": {
        "before_examples_per_s": 101.5,
        "after_examples_per_s": 253.75,
        "speedup": 2.5,
        "identical_predictions": True,
        "examples": 3000,
        "profile": {"matrix_products_share": 0.834, "matrix_products_gflops": 213.6},
    },
}


def test_the_first_hour_region_waits_for_its_json_then_renders_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = region_file(tmp_path / "README.md", "first_hour", body=PENDING)
    before = page.read_text()
    args = ["--root", str(tmp_path), str(page)]
    assert gen.main(["--check", *args]) == 0  # no JSON yet: skipped, not stale
    assert "region 'first_hour' skipped (experiments/first_hour.json does not exist yet)" in capsys.readouterr().out
    assert gen.main(args) == 0 and page.read_text() == before  # left as it is

    (tmp_path / "experiments").mkdir()
    source = tmp_path / "experiments" / "first_hour.json"
    source.write_text(json.dumps(FIRST_HOUR))
    assert gen.main(["--check", *args]) == 1
    assert "README.md: region 'first_hour' is stale" in capsys.readouterr().err
    assert gen.main(args) == 0
    text = page.read_text()
    assert PENDING not in text
    assert "Measured on 2031-02-03 (a 2-core test box)" in text
    for cell in (
        "| warm table: first row written | 12.3 s |",
        "| warm table: all 17 rows | 456.7 s |",
        "| cold: the first set-up command | not measured |",
        "| cold: one expert fine-tuned | 88.8 s |",
        "| evaluation before | 101.5 examples/s |",
        "| evaluation after | 253.8 examples/s |",
        "| evaluation speed-up | 2.50x |",
        "| identical predictions (3000 examples) | yes |",
        "| evaluation time in matrix products (profiled) | 83% |",
        "| matrix products' rate (fp32, all threads) | 214 GFLOP/s |",
    ):
        assert cell in text, cell
    assert gen.main(["--check", *args]) == 0

    broken = {**FIRST_HOUR, "eval": {k: v for k, v in FIRST_HOUR["eval"].items() if k != "speedup"}}
    source.write_text(json.dumps(broken))
    assert gen.main(["--check", *args]) == 2
    assert "first_hour.json: missing key 'eval.speedup'" in capsys.readouterr().err


def test_a_run_table_region_renders_the_metrics_json(tmp_path: Path) -> None:
    run = tmp_path / "experiments" / "smollm2_generative"
    run.mkdir(parents=True)
    rows = {
        "pretrained": {"scores": {"a": {"acc": 0.25}, "b": {"acc": 0.5}}, "avg_acc": 0.375, "avg_norm_acc": 0.5},
        "ties": {"scores": {"a": {"acc": 0.123456}, "b": {"acc": None}}, "avg_acc": 0.2},
    }
    run.joinpath("metrics.json").write_text(json.dumps({"tasks": ["a", "b"], "report_split": "test", "rows": rows}))
    page = region_file(tmp_path / "bench.md", "smollm2_generative")
    assert gen.main(["--root", str(tmp_path), str(page)]) == 0
    text = page.read_text()
    assert "| Method | a | b | Avg acc | Norm acc |" in text
    assert "| pretrained | 25.00 | 50.00 | 37.50 | 50.00 |" in text
    assert "| ties | 12.35 | - | 20.00 | - |" in text  # a missing score is a dash, never 0


def test_the_mergekit_parity_region_renders_the_benchmarks_json(tmp_path: Path) -> None:
    (tmp_path / "experiments").mkdir()
    results = {
        "ties_weights": {"mergekit_yaml": "merge_method: ties\n", "max_abs_diff": 0.0, "max_abs_change_from_base": 0.5},
        "slerp": {"mergekit_yaml": "merge_method: slerp\n", "max_abs_diff": 4.8e-7, "max_abs_change_from_base": 0.065},
        "sce": {"error": "Traceback ..."},
    }
    data = {"date": "2031-02-03", "mergekit": "9.9", "torch": "2.13.0", "results": results}
    (tmp_path / "experiments" / "bench_mergekit_methods.json").write_text(json.dumps(data))
    page = region_file(tmp_path / "bench.md", "mergekit_parity")
    assert gen.main(["--root", str(tmp_path), str(page)]) == 0
    text = page.read_text()
    assert "Measured on 2031-02-03 against MergeKit 9.9" in text
    assert "| `ties_weights` | `ties` | 0 | 0.5 |" in text and "| `slerp` | `slerp` | 4.8e-07 | 0.065 |" in text
    assert "| `sce` | - | MergeKit failed | - |" in text


def test_the_streaming_region_renders_each_methods_spread_and_the_ratio_to_mergekit(tmp_path: Path) -> None:
    (tmp_path / "experiments").mkdir()
    run = {"read_s": 3.0, "cpu_s": 5.0, "rss_before_mib": 428, "load_before": 0.5, "load_after": 1.0}
    merge = [
        {"method": "ta", **run, "wall_s": 3.1, "peak_rss_mib": 440},
        {"method": "ta", **run, "wall_s": 3.5, "peak_rss_mib": 442, "load_before": 0.9},
    ]
    e2e = [
        {"process": p, "wall_s": w, "cpu_s": 1.0, "peak_rss_mib": 500, "load_before": 1.0}
        for p, w in (("ties", 20.0), ("ties", 22.0), ("mergekit_ties", 210.0))
    ]
    about = {"date": "2031-02-03", "machine": "a 2-core test box", "input_gib": 8.2}
    data = {"merge": {**about, "rows": merge}, "end_to_end": {**about, "rows": e2e}}
    source = tmp_path / "experiments" / "bench_streaming_merge.json"
    source.write_text(json.dumps(data))
    page = region_file(tmp_path / "bench.md", "streaming_merge")
    assert gen.main(["--root", str(tmp_path), str(page)]) == 0
    text = page.read_text()
    assert "measured on 2031-02-03 (a 2-core test box), 8.2 GiB of inputs" in text
    assert "load average before each run 0.5 - 0.9" in text
    assert "| task arithmetic | 2 | 3.1 - 3.5 | 5.0 | 440 - 442 | 428 |" in text
    assert "| TIES, exact global pruning | 2 | 20.0 - 22.0 | 1.0 | 500 | 0.10x MergeKit TIES (per tensor) |" in text
    source.write_text(json.dumps({"merge": {**about, "rows": [{"wall_s": 1.0}]}}))
    assert gen.main(["--check", "--root", str(tmp_path), str(page)]) == 2  # a row without its method: refused


def test_the_kernel_audit_region_names_the_rows_that_moved_and_the_artifacts(tmp_path: Path) -> None:
    run = tmp_path / "experiments" / "embedded_table"
    run.mkdir(parents=True)
    still = {"avg_spread": 0.0, "tasks_moved": []}
    data = {
        "date": "2031-02-03",
        "machine": "a 2-core test box",
        "runs": {"avx512": {"env": ""}, "avx2": {"env": "ATEN_CPU_CAPABILITY=avx2"}},
        "rows": {"ties": still, "awd_ta": {"avg_spread": 0.06, "tasks_moved": ["a", "c"]}},
        "experts": {"a": {"byte_identical": False, "max_abs_diff": 3.8e-5, "max_abs": 7.91}},
        "artifacts": {"awd_ta/delta.safetensors": {"byte_identical": True, "max_abs_diff": 0.0, "max_abs": 0.5}},
    }
    (run / "kernel_spread.json").write_text(json.dumps(data))
    page = region_file(tmp_path / "bench.md", "kernel_audit")
    assert gen.main(["--root", str(tmp_path), str(page)]) == 0
    text = page.read_text()
    assert "`avx512`: this machine's own choice; `avx2`: `ATEN_CPU_CAPABILITY=avx2`" in text
    assert "Rows that moved: 1 of 2: awd_ta (tasks a, c; average spread 0.06)." in text
    assert "| `expert a` | no | 3.8e-05 | 7.91 |" in text and "| `awd_ta/delta.safetensors` | yes | 0 | 0.5 |" in text


def test_bad_markers_are_refused_naming_the_file_and_region(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unknown = region_file(tmp_path / "unknown.md", "no_such_region")
    assert gen.main(["--root", str(tmp_path), "--check", str(unknown)]) == 2
    assert "unknown.md: unknown region 'no_such_region'" in capsys.readouterr().err
    unclosed = tmp_path / "unclosed.md"
    unclosed.write_text("<!-- generated:methods -->\nno end marker\n")
    assert gen.main(["--root", str(tmp_path), "--check", str(unclosed)]) == 2
    assert "unclosed.md: region(s) ['methods'] have no matching" in capsys.readouterr().err
    # A marker quoted inside prose (a code span) is not a region.
    quoted = tmp_path / "quoted.md"
    quoted.write_text("Regions are delimited by `<!-- generated:NAME -->` lines.\n")
    assert gen.main(["--root", str(tmp_path), "--check", str(quoted)]) == 0

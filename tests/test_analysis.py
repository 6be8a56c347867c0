"""``mergelab-analyze``: the task vectors' cosines, per-layer norms and sign conflicts of a pool, before and after a
method's transformation, checked against a direct computation from the checkpoints' state dicts."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from mergelab.analyze_cli import command_line
from mergelab.locations import CONFIG_DIR
from mergelab.methods import DARE, TIES
from mergelab.reports.analysis import analyze_pool, figure_format_of
from tests.conftest import ListPool

SCRIPT = Path(sys.executable).parent / "mergelab-analyze"
TASKS = ["a", "b", "c"]
PLOTS = ("cosine", "layer_norms", "sign_conflicts")

State = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Llama and three experts: sparse noise (so entries are zero, overlap and conflict partly);
    expert c leaves block 1 as pretrained (a zero task vector there)."""
    root = tmp_path_factory.mktemp("analysis_pool")
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    dirs = {"base": root / "base"}
    for i, task in enumerate(TASKS):
        g = torch.Generator().manual_seed(i + 1)
        state = {}
        for k, v in base.state_dict().items():
            noise = 0.05 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.6)
            state[k] = v if task == "c" and ".layers.1." in k else v + noise
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(state)
        model.save_pretrained(root / task)
        dirs[task] = root / task
    return dirs


def overrides(dirs: dict[str, Path]) -> list[str]:
    experts = "{" + ",".join(f"{t}:'{dirs[t]}'" for t in TASKS) + "}"
    # Small row blocks: every tensor of more than 40 elements is streamed in several blocks.
    return ["model=checkpoints", f"model.pretrained={dirs['base']}", f"model.experts={experts}", "model.chunk_elems=40"]


def analyze_cli(args: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    """The console script, as a user runs it."""
    cmd = [str(SCRIPT), *args, f"hydra.run.dir={out}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    return subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=300)


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error:" in line]


# ------------------------------------------------------------------------------------- the direct computation


def states(dirs: dict[str, Path]) -> tuple[State, list[State]]:
    return load_file(str(dirs["base"] / "model.safetensors")), [
        load_file(str(dirs[t] / "model.safetensors")) for t in TASKS
    ]


def task_vectors(dirs: dict[str, Path]) -> list[State]:
    base, experts = states(dirs)
    return [{k: e[k].float() - b.float() for k, b in base.items()} for e in experts]


def layer(name: str) -> str:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return m.group(1) if m else "other"


def stage(taus: list[State]) -> dict[str, object]:
    """Cosines, norms and sign conflicts straight from the definitions (float64, elementwise)."""
    names = list(taus[0])
    groups = {"all": names, **{g: [n for n in names if layer(n) == g] for g in ("0", "1", "other")}}
    out: dict[str, object] = {}
    for g, members in groups.items():
        flat = torch.stack([torch.cat([t[n].double().reshape(-1) for n in members]) for t in taus])
        numel = flat.shape[1]
        norms = flat.norm(dim=1)
        sign = flat.sign()
        elected = flat.sum(0).sign()
        conflicts = torch.tensor(
            [[float(((sign[i] * sign[j]) < 0).sum()) / numel for j in range(len(taus))] for i in range(len(taus))]
        )
        out[g] = {
            "norms": norms,
            "cosine": (flat @ flat.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-24),
            "pairwise": conflicts,
            "nonzero": (flat != 0).double().mean(1),
            # TIES: a nonzero entry whose sign differs from the elected sign of the sum
            "elected": float(((flat != 0) & (sign != elected)).any(0).double().mean()),
        }
    return out


def ties_kept(taus: list[State], k: float = 20.0) -> list[State]:
    """TIES by the paper: each vector trimmed to its top-k% magnitudes over the whole model, the sign of the sum
    elected (ties: the majority sign), the agreeing entries kept."""
    trimmed = []
    for t in taus:
        mags = torch.cat([v.abs().reshape(-1) for v in t.values()])
        threshold = mags.sort(descending=True).values[math.ceil(mags.numel() * k / 100) - 1]
        trimmed.append({n: torch.where(v.abs() >= threshold, v, 0.0) for n, v in t.items()})
    signs = {n: sum(t[n] for t in trimmed).sign() for n in taus[0]}
    total = sum(float(s.sum()) for s in signs.values())
    majority = -1.0 if total < 0 else 1.0
    signs = {n: torch.where(s == 0, majority, s) for n, s in signs.items()}
    return [{n: torch.where(v * signs[n] > 0, v, 0.0) for n, v in t.items()} for t in trimmed]


def check_stage(got: dict, want: dict[str, dict]) -> None:
    """``got`` (a stage of analysis.json) against :func:`stage` of the same vectors."""
    w = want["all"]
    assert torch.allclose(torch.tensor(got["cosine"], dtype=torch.float64), w["cosine"], atol=1e-9)
    assert torch.allclose(torch.tensor(got["norm"], dtype=torch.float64), w["norms"], rtol=1e-9)
    for g in ("0", "1", "other"):
        assert torch.allclose(torch.tensor(got["layer_norms"][g], dtype=torch.float64), want[g]["norms"], atol=1e-9)
    for g in ("all", "0", "1", "other"):
        c = got["sign_conflict"][g]
        assert torch.allclose(torch.tensor(c["pairwise"], dtype=torch.float64), want[g]["pairwise"].double())
        assert torch.allclose(torch.tensor(c["overlap"], dtype=torch.float64).diagonal(), want[g]["nonzero"])
        assert c["elected"] == pytest.approx(want[g]["elected"])
        pairs = [float(want[g]["pairwise"][i, j]) for i in range(3) for j in range(i + 1, 3)]
        assert c["mean_pairwise"] == pytest.approx(sum(pairs) / len(pairs))


# ------------------------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def ties_analysis(pool_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ties") / "out"
    proc = analyze_cli([*overrides(pool_dirs), "method=ties"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_streamed_pool_statistics_match_a_direct_computation(pool_dirs: dict[str, Path], ties_analysis: Path) -> None:
    result = json.loads((ties_analysis / "analysis.json").read_text())
    assert result["tasks"] == TASKS
    assert list(result["layers"]) == ["0", "1", "other"]
    taus = task_vectors(pool_dirs)
    assert result["tensors"] == len(taus[0])
    assert sum(v["numel"] for v in result["layers"].values()) == sum(t.numel() for t in taus[0].values())
    want = stage(taus)
    check_stage(result["before"], want)
    # The fixture's facts, seen through the file: c's block-1 norm is 0, and so are its conflicts there.
    assert result["before"]["layer_norms"]["1"][2] == 0.0
    assert result["before"]["sign_conflict"]["1"]["pairwise"][0][2] == 0.0
    assert (
        0.1
        < result["before"]["sign_conflict"]["all"]["mean_pairwise"]
        < result["before"]["sign_conflict"]["all"]["elected"]
    )
    for plot in PLOTS:
        assert (ties_analysis / f"{plot}.png").stat().st_size > 1000


def test_ties_after_statistics_are_those_of_its_trimmed_agreeing_vectors(
    pool_dirs: dict[str, Path], ties_analysis: Path
) -> None:
    result = json.loads((ties_analysis / "analysis.json").read_text())
    assert result["method"]["name"] == "ties" and result["method"]["transform"] == "TIES.sparsify_chunk"
    assert result["method"]["options"]["k"] == 20
    kept = ties_kept(task_vectors(pool_dirs))
    check_stage(result["after"], stage(kept))
    # what TIES is for: no conflicts left; about k% of each vector kept (minus the disagreeing entries)
    assert result["after"]["sign_conflict"]["all"]["elected"] == 0.0
    assert all(0.1 < d < 0.2 for d in torch.tensor(result["after"]["sign_conflict"]["all"]["overlap"]).diagonal())


def test_in_memory_pool_gives_the_streamed_numbers(pool_dirs: dict[str, Path], ties_analysis: Path) -> None:
    streamed = json.loads((ties_analysis / "analysis.json").read_text())
    base, experts = states(pool_dirs)
    pool = ListPool(base, experts)
    pool.tasks = TASKS
    result = analyze_pool(pool, TIES())
    for key in ("before", "after"):
        for a, b in ((result[key]["cosine"], streamed[key]["cosine"]), (result[key]["norm"], streamed[key]["norm"])):
            assert torch.allclose(
                torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=1e-12
            )
        assert result[key]["sign_conflict"] == streamed[key]["sign_conflict"]  # counts: exact


def test_dare_after_statistics_and_svg_plots(pool_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = analyze_cli([*overrides(pool_dirs), "method=dare", "method.p=0.3", "seed=5", "--format", "svg"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "analysis.json").read_text())
    taus = task_vectors(pool_dirs)
    check_stage(result["before"], stage(taus))
    dropped = DARE(p=0.3, seed=5).drop(taus)  # the masks a DARE merge of these vectors draws
    check_stage(result["after"], stage(dropped))
    kept = torch.tensor(result["after"]["sign_conflict"]["all"]["overlap"]).diagonal()
    before = torch.tensor(result["before"]["sign_conflict"]["all"]["overlap"]).diagonal()
    assert torch.allclose(kept / before, torch.full((3,), 0.7), atol=0.03)
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".png", ".svg")) == [f"{p}.svg" for p in PLOTS]


def test_awd_after_statistics_are_those_of_tau_minus_its_fitted_delta_and_every_plot_follows_the_format(
    pool_dirs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = analyze_cli([*overrides(pool_dirs), "method=awd", "method.steps=3", "--format=svg"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Every figure is svg, AWD's own plots (saved with its delta) included; no png anywhere.
    figures = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.suffix in (".png", ".svg", ".pdf"))
    awd_plots = [f"artifacts/analysis-awd/{p}.svg" for p in ("cosine_before_after", "delta_norms_and_losses")]
    assert figures == sorted([*awd_plots, *(f"{p}.svg" for p in PLOTS)])
    result = json.loads((out / "analysis.json").read_text())
    delta_dir = out / "artifacts" / "analysis-awd" / "delta"  # written as it is fitted, tensor by tensor
    delta: State = {}
    for shard in delta_dir.glob("*.safetensors"):
        delta.update(load_file(str(shard)))
    assert delta and all(".layers." in n for n in delta)
    taus = task_vectors(pool_dirs)
    check_stage(result["after"], stage([{n: v - delta[n] if n in delta else v for n, v in t.items()} for t in taus]))
    assert result["method"]["report"]["L_O_end"] <= result["method"]["report"]["L_O_start"]


def test_an_earlier_analysis_is_never_overwritten_unless_asked(pool_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "analysis.json").write_text('{"mine": 1}')
    proc = analyze_cli(overrides(pool_dirs), out)
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert "already holds ['analysis.json']" in line and "overwrite=true" in line
    assert json.loads((out / "analysis.json").read_text()) == {"mine": 1}
    assert not (out / "cosine.png").exists()
    proc = analyze_cli([*overrides(pool_dirs), "overwrite=true"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "analysis.json").read_text())
    assert result["after"] is None and result["method"]["transform"] is None  # task arithmetic keeps them as they are
    assert "overwrite=true" in result["overrides"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["method=dare", "method.merge=nope"], "method 'dare': method option 'merge': no method config 'nope'"),
        (["analysis.figure_format=bmp"], "analysis.figure_format must be one of ('png', 'svg', 'pdf'), got 'bmp'"),
        (["model.experts.b=/nonexistent/b"], "model pool: expert 'b': checkpoint dir '/nonexistent/b' does not exist"),
        (["model.exclude=[.]"], "model.exclude=['.'] leave no floating-point tensor of the pretrained model"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(
    pool_dirs: dict[str, Path], tmp_path: Path, extra: list[str], message: str
) -> None:
    out = tmp_path / "out"
    proc = analyze_cli([*overrides(pool_dirs), *extra], out)
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert line.startswith("mergelab: error: ") and message in line, line
    assert not (out / "analysis.json").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "png"),
        (["figure_format=pdf"], "pdf"),  # the run's option, as for mergelab
        (["figure_format=pdf", "--format", "svg"], "svg"),  # --format (analysis.figure_format) wins
        (["--format=SVG"], "svg"),
    ],
)
def test_the_plot_format_comes_from_format_or_the_runs_figure_format(args: list[str], expected: str) -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("analyze", overrides=command_line(args))
    assert figure_format_of(cfg) == expected


def test_a_sweep_is_refused_before_hydra_starts(tmp_path: Path) -> None:
    proc = analyze_cli(["-m", "method=ties,dare"], tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("mergelab-analyze: error: -m: mergelab-analyze runs one analysis per command")

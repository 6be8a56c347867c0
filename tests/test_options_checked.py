"""Every option is checked before any work, in one line naming it: nothing is merged, built or written first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergelab.run import run
from tests.conftest import make_cfg, small_checkpoint_pool


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


# (overrides on the small checkpoint pool, error type, message): each names the option and the value at fault.
CHECKPOINT_CASES = [
    (["model.chunk_elems=0"], ValueError, r"model\.chunk_elems must be >= 1, got 0"),
    (["model.chunk_elems=-4096"], ValueError, r"model\.chunk_elems must be >= 1, got -4096"),
    (["model.max_shard_bytes=0"], ValueError, r"model\.max_shard_bytes must be >= 1, got 0"),
    (["model.experts=[a, b]"], ValueError, r"model\.experts must be a mapping \(name: value\), got list \['a', 'b'\]"),
    (["model.experts.e1=null"], ValueError, r"model\.experts\.e1 is null; give a value"),
    (["model.exclude=abc"], ValueError, r"model\.exclude must be a list, got str 'abc'"),
    (["model.exclude=['.*']"], ValueError, r"model\.exclude=\['\.\*'\] leave no floating-point tensor .* to merge"),
    (["model.include=[nothing_matches]"], ValueError, r"model\.include=\['nothing_matches'\] .* leave no"),
    (["tuning.precision=bogus"], ValueError, r"tuning\.precision must be one of \[.*'bf16-mixed'.*\], got 'bogus'"),
    (["trainer.precision=bogus"], ValueError, r"trainer\.precision must be one of .*, got 'bogus'"),
    (
        ["method=slerp"],
        ValueError,
        r"method 'slerp': SLERP merges the pretrained model with exactly one expert .* \['e1', 'e2'\]: keep one",
    ),
    (["method=slerp", "method.t=[{filter: mlp, value: 0.5}]"], ValueError, r"option 't': end the list with a default"),
]


@pytest.mark.parametrize(("overrides", "error", "match"), CHECKPOINT_CASES, ids=[c[0][0] for c in CHECKPOINT_CASES])
def test_checkpoint_pool_option_refused(overrides: list[str], error: type, match: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pool = small_checkpoint_pool(tmp_path / "pool")
    if any(o.startswith("model.experts=") for o in overrides):  # given in place of the pool's mapping
        pool = [o for o in pool if not o.startswith("model.experts=")]
    with pytest.raises(error, match=match):
        run(make_cfg(out, [*pool, *overrides], tiny=False))
    assert_nothing_written(out)


def test_expert_path_that_is_a_file(tmp_path: Path) -> None:
    overrides = small_checkpoint_pool(tmp_path / "pool")
    weights = tmp_path / "pool" / "e1" / "model-00001-of-00001.safetensors"
    assert weights.is_file()
    out = tmp_path / "out"
    with pytest.raises(NotADirectoryError, match=rf"expert 'e1': checkpoint '{weights}' is a file, not a model dir"):
        run(make_cfg(out, [*overrides, f"model.experts.e1='{weights}'"], tiny=False))
    assert_nothing_written(out)


def test_classifier_pool_exclude_everything_fails_before_experts_are_built(tmp_path: Path) -> None:
    """The text pool refuses the selection once the pretrained model is loaded, before any expert is fine-tuned."""
    out = tmp_path / "out"
    cache = tmp_path / "empty-cache"
    with pytest.raises(ValueError, match=r"model\.exclude=\['\.\*'\] leaves no floating-point tensor"):
        run(make_cfg(out, ["model.exclude=['.*']", f"model.cache_dir={cache}"]))
    assert not (cache / "experts").exists()  # nothing was built
    assert_nothing_written(out)


def test_lm_harness_on_a_pretrained_dir_without_tokenizer_fails_before_the_merge(tmp_path: Path) -> None:
    overrides = [o for o in small_checkpoint_pool(tmp_path / "pool") if o != "eval=none"]
    out = tmp_path / "out"
    base = json.loads('"' + overrides[1].split("=", 1)[1].strip("'") + '"')
    match = rf"eval=lm_harness scores the merged checkpoint .* dir {base}, which has none"
    with pytest.raises(ValueError, match=match):
        run(make_cfg(out, [*overrides, "eval=lm_harness", "eval.tasks=[mergelab_sentiment]"], tiny=False))
    assert_nothing_written(out)


def test_precisions_accepted_without_lightning_are_lightnings() -> None:
    """The common precisions are accepted without importing Lightning (a streaming run that never trains would pay
    ~200 MiB for the import); each must be one Lightning itself accepts, and a run merging a checkpoint pool with
    one of them never imports Lightning for the check."""
    import subprocess
    import sys

    from mergelab.training.distributed import COMMON_PRECISIONS, lightning_precisions

    assert set(COMMON_PRECISIONS) <= set(lightning_precisions())
    probe = (
        "import sys; from mergelab.training.distributed import check_precision; "
        "check_precision('trainer.precision', '32-true'); check_precision('tuning.precision', 'bf16-mixed'); "
        "print('lightning' in sys.modules)"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "False"

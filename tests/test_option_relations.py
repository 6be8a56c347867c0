"""Conditions between options (``requires``, :class:`mergelab.config_types.Requires`) and list options' entries
(``Length``, a ``Range`` per entry): declared once on the class, refused on construction and through a config
naming the option and the values, and shown in the docs. One row per declared condition: a class that declares a
new one fails :func:`test_every_declared_condition_has_a_row` until it has a row here."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from omegaconf import OmegaConf

from mergelab.config_types import Requires
from mergelab.methods import AWD, DELLA, TIES, AdaMerging, MagnitudePrunedTA, MetaGPT
from mergelab.methods.awd_fit import OptimizerConfig
from mergelab.methods.awd_objective import Objective
from mergelab.methods.declaration import options, requirements
from mergelab.methods.registry import distinct_classes
from mergelab.run import method_candidates

#: (class, the condition's options) -> (options that break it, options that keep it, a YAML that builds the class)
CONDITIONS: dict[tuple[type, tuple[str, ...]], tuple[dict[str, Any], dict[str, Any], str | None]] = {
    (TIES, ("weights", "disjoint")): ({"weights": [1.0, -1.0], "disjoint": "mean"}, {"weights": [1.0, -1.0]}, "ties"),
    (MagnitudePrunedTA, ("weights", "disjoint")): (
        {"weights": {"a": -0.5}, "disjoint": "mean"},
        {"weights": {"a": -0.5}},
        "magnitude_pruned_ta",
    ),
    (DELLA, ("epsilon", "density")): ({"density": 0.2, "epsilon": 0.2}, {"density": 0.3, "epsilon": 0.2}, "della"),
    (AWD, ("mode", "granularity")): (
        {"mode": "per_tensor", "granularity": "model"},
        {"mode": "per_tensor", "granularity": "tensor"},
        "awd",
    ),
    (AdaMerging, ("clamp",)): ({"clamp": [1.0, 0.5]}, {"clamp": [0.5, 0.5]}, "adamerging"),
}


def row_id(value: Any) -> str:
    return value.__name__ if isinstance(value, type) else "+".join(value)


def declared_conditions() -> list[tuple[type, Requires]]:
    return [(cls, r) for cls in distinct_classes() for r in requirements(cls)]


def test_every_declared_condition_has_a_row() -> None:
    declared = {(cls, r.options) for cls, r in declared_conditions()}
    assert declared == set(CONDITIONS)


@pytest.mark.parametrize(("cls", "names"), list(CONDITIONS), ids=row_id)
def test_a_broken_condition_is_refused_naming_the_option_and_values(cls: type, names: tuple[str, ...]) -> None:
    bad, good, _ = CONDITIONS[(cls, names)]
    (condition,) = [r for r in requirements(cls) if r.options == names]
    shown = ", ".join(f"{k}={bad[k]!r}" for k in names if k in bad)
    with pytest.raises(ValueError) as refused:
        cls(**bad)
    assert f"method option '{names[0]}'" in str(refused.value) and condition.doc in str(refused.value)
    assert all(f"{k}={bad[k]!r}" in str(refused.value) for k in bad), (shown, str(refused.value))
    cls(**good)  # the same options on the right side of the condition


@pytest.mark.parametrize(("cls", "names"), list(CONDITIONS), ids=row_id)
def test_a_config_breaking_a_condition_is_refused_when_built(cls: type, names: tuple[str, ...]) -> None:
    from mergelab.method_config import named_method_config

    bad, _, yaml_name = CONDITIONS[(cls, names)]
    assert yaml_name is not None
    node = named_method_config(yaml_name)
    node.pop("grid", None)
    with pytest.raises(ValueError, match=rf"method option '{names[0]}' \("):
        method_candidates(OmegaConf.create({**node, **bad}), False)


def test_della_pairs_per_expert_bands_once_the_experts_are_known() -> None:
    """A list beside a mapping pairs up only by the pool's expert names: checked then, naming the expert."""
    method = DELLA(density=[0.5, 0.9], epsilon={"a": 0.1, "b": 0.3})
    with pytest.raises(ValueError, match=r"method option 'epsilon' of expert 'b' \(epsilon=0.3, density=0.9\)"):
        method.check_experts(["a", "b"])
    with pytest.raises(ValueError, match=r"'epsilon' \(epsilon=\[0.1, 0.3\], density=\[0.5, 0.9\]\)"):
        DELLA(density=[0.5, 0.9], epsilon=[0.1, 0.3])  # two lists pair by position when built


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AdaMerging(clamp=[0.0]), r"'clamp' must be a list of 2 numbers, got \[0.0\]"),
        (lambda: AdaMerging(clamp=[0.0, float("nan")]), r"'clamp\[1\]' must be in \(-inf, inf\), got nan"),
        (lambda: AdaMerging(betas=[0.9, 1.0]), r"'betas\[1\]' must be in \[0.0, 1.0\), got 1.0"),
        (lambda: AdaMerging(betas=[0.9, 0.99, 0.5]), r"'betas' must be a list of 2 numbers"),
        (lambda: MetaGPT(curvature=[1.0, 0.0]), r"'curvature\[1\]' must be in \(0.0, inf\), got 0.0"),
        (lambda: MetaGPT(curvature=[1.0, "x"]), r"'curvature\[1\]' must be a number, got 'x'"),
    ],
)
def test_list_options_are_checked_entry_by_entry(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


#: AWD option -> the field of the dataclass the fit takes it in.
AWD_FIELDS = {"optimizer": (OptimizerConfig, "optimizer"), "granularity": (Objective, "granularity")}


def test_awd_fit_settings_are_the_methods_declarations() -> None:
    """The fit's own settings (OptimizerConfig, Objective) check the very annotations AWD's options declare: one
    declaration, two readers, so a range changed in one place changes both."""
    init = typing.get_type_hints(AWD.__init__, include_extras=True)
    shared = 0
    for config in (OptimizerConfig, Objective):
        for name, hint in typing.get_type_hints(config, include_extras=True).items():
            if name in init:
                assert hint is init[name], name
                shared += 1
    assert shared == 10  # optimizer, lr, momentum, steps, lr_relative, rise_tol, max_backoffs; granularity, norm, alpha
    with pytest.raises(ValueError, match=r"AWD option 'lr' must be in \(0.0, inf\), got 0.0"):
        OptimizerConfig(lr=0.0)
    with pytest.raises(ValueError, match=r"AWD option 'norm' must be one of"):
        Objective(norm="l3")


def test_conditions_and_list_lengths_are_in_the_docs() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    for _, condition in declared_conditions():
        assert condition.doc.replace("<", "&lt;").replace("_", "\\_") in page, condition.doc
    assert {o.name: o.allowed() for o in options(AdaMerging)}["betas"] == "2 numbers, each in [0.0, 1.0)"

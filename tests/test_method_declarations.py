"""Every ``conf/method/*.yaml`` against its class's declaration (:mod:`mergelab.methods.declaration`): its options
are documented constructor options, its reference is given, and it either round-trips through a MergeKit config to
a merge of identical bytes or says why MergeKit has no equivalent. Parametrised over the registry, so a new YAML is
covered with no other edit."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import mergelab.methods as methods
from mergelab.io.writer import write_checkpoint
from mergelab.methods.base import NOT_METHOD_OPTIONS
from mergelab.methods.declaration import MergeKitMapping, declared, mergekit_of, options
from mergelab.methods.registry import distinct_classes, mergekit_readers, method_classes, method_yamls
from mergelab.provenance.mergekit import export_merge, read_mergekit
from mergelab.run import method_candidates
from tests.conftest import make_cfg

YAMLS = sorted(method_classes())
CLASSES = distinct_classes()
NAMES = ["alpha", "beta", "gamma"]
#: Non-uniform per-expert weights, for methods that take ``weights`` (as many as the experts, none 1).
WEIGHTS = {"alpha": 0.5, "beta": 2.0, "gamma": 0.75}
#: Non-uniform per-expert densities (MergeKit's per-model density, gamma, epsilon), for methods that take them
#: (``per_expert_values``); binary fractions, so that derived coefficients read back exactly.
PER_EXPERT = {
    "k": [50.0, 25.0, 75.0],
    "p": [0.5, 0.75, 0.25],
    "density": [0.5, 0.75, 0.625],
    "gamma": [0.0625, 0.125, 0.03125],
    "epsilon": [0.125, 0.1, 0.25],
}
SHAPES = {"w": (7, 5), "b": (7,), "v": (3, 4)}


def tiny_pool() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A float32 base and three experts with shared and conflicting task-vector parts and exact zeros."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    experts = []
    for i in range(len(NAMES)):
        state = {}
        for k, v in base.items():
            tau = 0.05 * torch.randn(v.shape, generator=g) + 0.02 * (i - 1)
            tau[torch.rand(v.shape, generator=g) < 0.1] = 0.0
            state[k] = v + tau
        experts.append(state)
    return base, experts


def composed(overrides: list[str]) -> Any:
    """The method the app composes from ``overrides`` (as ``mergelab <overrides>``)."""
    cfg = make_cfg(Path("/unused"), overrides, tiny=False)
    ((_, method),) = method_candidates(OmegaConf.create(OmegaConf.to_container(cfg.method, resolve=True)), False)
    return method


def merged(method: Any, names: list[str] = NAMES) -> dict[str, torch.Tensor]:
    base, experts = tiny_pool()
    method.task_names = list(names)
    return method.merge(base, experts[: len(names)])


def yaml_options(name: str) -> dict[str, Any]:
    node = yaml.safe_load(method_yamls()[name].read_text()) or {}
    return {k: v for k, v in node.items() if k not in NOT_METHOD_OPTIONS and not k.startswith("_")}


@pytest.mark.parametrize("name", YAMLS)
def test_each_yaml_round_trips_through_mergekit_or_says_why_not(name: str, tmp_path: Path) -> None:
    cls = method_classes()[name]
    mapping = mergekit_of(cls)
    if isinstance(mapping, str):
        assert mapping.strip() and declared(cls, "mergekit") == mapping, f"{name}: declare a reason or a mapping"
        found = export_merge(cls.__new__(cls), "base", NAMES, streamed=True, pool="checkpoint pool")
        assert found.config is None and found.reason == mapping
        return
    names = NAMES[: cls.expert_count or len(NAMES)]  # SLERP: the pretrained model and one expert
    overrides = [f"method={name}", *(f"method.{k}={v}" for k, v in mapping.expressible.items())]
    if "weights" in {o.name for o in options(cls)}:
        overrides.append("method.weights={" + ", ".join(f"{k}: {WEIGHTS[k]}" for k in names) + "}")
    for key in cls.per_expert_values:
        overrides.append(
            f"method.{key}={{" + ", ".join(f"{n}: {v}" for n, v in zip(names, PER_EXPERT[key], strict=True)) + "}"
        )
    original = composed(overrides)
    dirs = [write_checkpoint(tiny_pool()[0], tmp_path / "base"), *(tmp_path / n for n in names)]
    for d in dirs[1:]:
        d.mkdir()  # the config names them; only the base's dtype is read
    original.task_names = list(names)
    experts = [str(d) for d in dirs[1:]]
    exported = export_merge(original, str(dirs[0]), experts, True, "checkpoint pool", base_dtypes=["float32"])
    assert exported.config is not None, exported.reason
    assert exported.config["merge_method"] in {r.name for r in mapping.reads}
    path = tmp_path / "mergekit_config.yml"
    path.write_text(exported.yaml())
    imported = read_mergekit(path)
    assert imported.pretrained == str(dirs[0]) and list(imported.experts) == names
    again = composed(imported.method)
    assert type(again) is type(original)
    a, b = merged(original, names), merged(again, names)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes(), (name, k)
    assert any(not torch.equal(a[k], tiny_pool()[0][k]) for k in a), "the merge moved nothing"


@pytest.mark.parametrize("name", YAMLS)
def test_every_yaml_option_is_a_documented_constructor_option(name: str) -> None:
    declared_options = {o.name: o for o in options(method_classes()[name])}
    for key in yaml_options(name):
        assert key in declared_options, f"conf/method/{name}.yaml: {key} is not an option of its _target_"
        assert declared_options[key].doc, f"{method_classes()[name].__name__}: option {key} has no Doc(...)"


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_every_method_declares_a_reference_and_documents_every_option(cls: type) -> None:
    reference = declared(cls, "reference")
    assert isinstance(reference, str) and reference.strip(), f"{cls.__name__}: declare reference = '...'"
    mapping = declared(cls, "mergekit")
    assert isinstance(mapping, MergeKitMapping) or (isinstance(mapping, str) and mapping.strip())
    assert all(o.doc for o in options(cls)), [o.name for o in options(cls) if not o.doc]


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_direct_construction_refuses_what_the_annotations_refuse(cls: type) -> None:
    """Built in Python (no config), each ranged or choice option is checked against the same declaration."""
    for option in options(cls):
        bad: list[Any] = []
        if option.choices:
            bad.append("no-such-choice")
        r = option.range
        if r is not None and r.low is not None and math.isfinite(r.low):
            bad.append(r.low if r.low_open else r.low - 1)
        if r is not None and r.high is not None and math.isfinite(r.high):
            bad.append(r.high if r.high_open else r.high + 1)
        for value in bad:
            with pytest.raises(ValueError, match=rf"method option '{option.name}' must be"):
                cls(**{option.name: value})


def test_the_package_exports_every_registered_method() -> None:
    exported = {getattr(methods, n) for n in methods.__all__}
    missing = [c.__name__ for c in CLASSES if c not in exported]
    assert not missing, f"add {missing} to mergelab/methods/__init__.py"


def test_each_mergekit_method_is_read_by_one_declaration() -> None:
    readers = mergekit_readers()
    assert {"task_arithmetic", "ties", "linear", "dare_linear", "dare_ties"} <= set(readers)
    assert {"breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce"} <= set(readers)
    for name, (schema, mapping, cls) in readers.items():
        assert schema.name == name and schema in mapping.reads and cls.__dict__["mergekit"] is mapping


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_options_carry_no_comment_of_their_own(name: str) -> None:
    """An option's doc is its class's ``Doc(...)`` (checked above and rendered into docs/methods.md): a comment
    beside the option in the YAML would be a second copy that nothing keeps true."""
    for line in method_yamls()[name].read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in yaml_options(name):
            assert "#" not in line.split(":", 1)[1], f"conf/method/{name}.yaml: {line!r}"


@pytest.mark.parametrize(
    ("method", "why"),
    [
        (methods.Breadcrumbs(prune="global"), "Breadcrumbs with prune=global"),
        (methods.DELLA(rescale="probability"), "rescale=probability divides each survivor"),
        (methods.SCE(scaling=0.5), "SCE with scaling=0.5"),
    ],
)
def test_option_combinations_mergekit_cannot_express_say_why(method: Any, why: str) -> None:
    found = export_merge(method, "base", NAMES, streamed=True, pool="checkpoint pool")
    assert found.config is None and why in (found.reason or "")


def mergekit_file(tmp_path: Path, body: str) -> Path:
    """A MergeKit config with a real base checkpoint ({base}) and expert dirs ({a}, {b})."""
    base = write_checkpoint(tiny_pool()[0], tmp_path / "base")
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
    path = tmp_path / "in.yml"
    path.write_text(body.format(base=base, a=tmp_path / "a", b=tmp_path / "b"))
    return path


MODELS = (
    "  - model: {a}\n    parameters: {{weight: 1.0{extra}}}\n  - model: {b}\n    parameters: {{weight: 2.0{extra}}}\n"
)


@pytest.mark.parametrize(
    ("head", "extra", "want"),
    [  # MergeKit's defaults: della normalizes and rescales (L1), della_linear rescales; breadcrumbs neither
        (
            "merge_method: della_linear",
            ", density: 0.5, epsilon: 0.1",
            ["method=della_linear", "method.density=0.5", "method.epsilon=0.1", "method.normalize=false"],
        ),
        ("merge_method: della", ", density: 0.5", ["method=della", "method.epsilon=0.15", "method.normalize=true"]),
        (
            "merge_method: breadcrumbs_ties\nparameters: {{lambda: 0.5}}",
            ", density: 0.8",
            ["method=breadcrumbs_ties", "method.density=0.8", "method.gamma=0.01", "method.scaling=0.5"],
        ),
    ],
)
def test_mergekit_defaults_map_onto_mergelab_options(tmp_path: Path, head: str, extra: str, want: list[str]) -> None:
    body = head + "\nbase_model: {base}\nmodels:\n" + MODELS.replace("{extra}", extra.replace("{", "{{"))
    found = read_mergekit(mergekit_file(tmp_path, body)).method
    assert set(want) <= set(found), found
    assert "method.weights={a: 1.0, b: 2.0}" in found
    if "della" in head:
        assert "method.rescale=l1" in found


@pytest.mark.parametrize(
    ("body", "at_fault"),
    [
        (
            "merge_method: breadcrumbs\nbase_model: {base}\nparameters: {{rescale: true}}\nmodels:\n"
            + MODELS.replace("{extra}", ""),
            "parameters.rescale: true",
        ),
        (
            "merge_method: della\nbase_model: {base}\nmodels:\n"
            "  - model: {a}\n    parameters: {{weight: 1, density: 0.5}}\n"
            "  - model: {b}\n    parameters: {{weight: 1, density: 1.5}}\n",
            "models[].parameters.density: 1.5 is not in (0, 1]",
        ),
        (
            "merge_method: sce\nbase_model: {base}\nparameters: {{select_topk: 1.5}}\nmodels:\n"
            "  - model: {a}\n  - model: {b}\n",
            "parameters.select_topk: 1.5 is not in (0, 1]",
        ),
        (
            "merge_method: sce\nbase_model: {base}\nparameters: {{lambda: 2}}\nmodels:\n  - model: {a}\n",
            "parameters.lambda",
        ),
        ("merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n", "two or more models"),
        (
            "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n",
            "models[0].parameters.weight: not a per-model parameter of model_stock",
        ),
    ],
)
def test_new_mergekit_methods_refuse_what_they_cannot_read(tmp_path: Path, body: str, at_fault: str) -> None:
    path = mergekit_file(tmp_path, body)
    with pytest.raises(ValueError) as err:
        read_mergekit(path)
    assert str(err.value).startswith(f"mergekit config {path}: ") and at_fault in str(err.value), str(err.value)

"""MergeKit merge configs: written beside a mergelab merge where MergeKit defines the same merge
(:func:`export_merge`), and read back into the equivalent mergelab run (``mergelab mergekit=path.yml``,
:func:`mergekit_overrides`).

What is relied on of MergeKit (its task-arithmetic family works per tensor): each model's task vector is sparsified
(``ties``: the top ``density`` share of that tensor's magnitudes is kept; ``dare_*``: each entry is kept with
probability ``density``, and ``rescale`` divides the survivors by it), multiplied by the model's ``weight``; with
sign consensus (``ties``, ``dare_ties``) only the entries whose sign is that of the weighted sum are kept; the kept
entries are summed, with ``normalize`` divided by the summed weights of the kept entries, scaled by ``lambda`` and
added to ``base_model``. ``linear`` is the weighted mean (``normalize``) or sum of the models listed.

Translations (both ways; k in %, p = 1 - density):

=========================================  ====================================================================
mergelab                                   MergeKit
=========================================  ====================================================================
task_arithmetic(scaling)                   task_arithmetic, weight = scaling, normalize: false
ties(k, per_tensor, disjoint=sum, s)       ties, density = k/100, weight = s, normalize: false
ties(k, per_tensor, disjoint=mean, s)      ties, density = k/100, weight = 1, normalize: true, lambda = s
weight_averaging                           linear, normalize: true, experts weight 1 (the base listed, weight 0)
dare(p) into task_arithmetic(s)            dare_linear, density, weight = s/density, rescale: false
dare(p) into ties(k=100, sum|mean, s)      dare_ties, density, rescale: false, as ties
=========================================  ====================================================================

DARE's 1/(1-p) is folded into the weights (``rescale: false``), so MergeKit versions that rescale survivors to the
task vector's norm instead give the same merge. Reading, ``rescale: true`` is DARE's 1/density and ``normalize:
true`` on task arithmetic divides by the summed weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: The file written in a merged dir when MergeKit defines the same merge.
CONFIG_FILE = "mergekit_config.yml"

#: The config key of ``mergelab mergekit=path.yml``.
KEY = "mergekit"

#: MergeKit merge methods mergelab reads, and the parameters each takes (global / per model).
GLOBAL_PARAMETERS = {
    "task_arithmetic": ("normalize", "int8_mask", "lambda"),
    "ties": ("normalize", "int8_mask", "lambda", "rescale"),
    "dare_ties": ("normalize", "int8_mask", "lambda", "rescale"),
    "dare_linear": ("normalize", "int8_mask", "lambda", "rescale"),
    "linear": ("normalize",),
}
MODEL_PARAMETERS = {
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "dare_linear": ("weight", "density"),
    "linear": ("weight",),
}
#: MergeKit's defaults for ``normalize`` and ``rescale`` per method.
DEFAULTS = {
    "task_arithmetic": {"normalize": False, "rescale": False},
    "ties": {"normalize": True, "rescale": False},
    "dare_ties": {"normalize": False, "rescale": True},
    "dare_linear": {"normalize": False, "rescale": True},
    "linear": {"normalize": True, "rescale": False},
}

#: Why a top-level MergeKit key is refused (any other unknown key is refused as unknown).
REFUSED_KEYS = {
    "slices": "layer slices are not imported (mergelab merges whole checkpoints; list them under models)",
    "tokenizer_source": "not imported (mergelab keeps the base model's tokenizer and vocabulary)",
    "tokenizer": "not imported (mergelab keeps the base model's tokenizer and vocabulary)",
    "chat_template": "not imported (mergelab copies the base model's tokenizer files as they are)",
    "modules": "per-module definitions are not imported (mergelab merges one model)",
}
ALLOWED_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")

#: Why a mergelab method has no MergeKit equivalent, by class name (any other: no MergeKit method computes it).
NO_EQUIVALENT = {
    "MetaGPT": "MetaGPT computes each task's coefficient from the task vectors' norms; MergeKit has no such method "
    "(its lambdas, under coefficients, as per-model task_arithmetic weights would give this merge's numbers, not "
    "the method)",
    "AWD": "AWD subtracts a learned redundant vector from every task vector; MergeKit has no such method",
    "TSVM": "TSV-M rebuilds each matrix from the tasks' orthogonalised singular vectors; MergeKit has no such method",
    "IsoC": "Iso-C flattens the spectrum of each summed task matrix; MergeKit has no such method",
    "IsoCTS": "Iso-CTS flattens the spectrum of a common and per-task subspaces; MergeKit has no such method",
    "Consensus": "consensus merging keeps the weights where enough tasks' TALL masks agree; MergeKit has no such mask",
    "MagnitudePrunedTA": "magnitude-pruned task arithmetic is TIES without sign election; MergeKit's magnitude pruning "
    "(ties) always elects signs",
    "FisherMerging": "Fisher merging weighs parameters by their Fisher information on task data; MergeKit uses no data",
    "RegMean": "RegMean solves per-layer regressions on task activations; MergeKit merges without data",
    "AdaMerging": "AdaMerging learns its coefficients on task data; MergeKit merges without data",
    **{
        cls: f"MergeKit's {mk} computes this merge, but mergelab does not write or read that config yet"
        for cls, mk in (
            ("Breadcrumbs", "breadcrumbs / breadcrumbs_ties"),
            ("DELLA", "della / della_linear"),
            ("ModelStock", "model_stock"),
            ("SCE", "sce"),
        )
    },
}

#: Where MergeKit's implementation of a translated method may still differ from mergelab's in the last bits.
TIES_NOTES = [
    "top-k per tensor: MergeKit keeps int(density x n) entries (ties at the threshold broken by order), mergelab "
    "ceil(k% x n) and every entry tied with the k-th largest magnitude",
    "a sign sum of exactly 0 elects + in MergeKit, the tensor's majority sign in mergelab",
]
LAMBDA_NOTE = "lambda (a global scale of the merged task vector) needs a MergeKit version that has it"

# Hub ids: "name" or "owner/name".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# ----------------------------------------------------------------------------------------------- out


@dataclass
class Export:
    """A merge in MergeKit's terms: ``config`` (None when MergeKit has no equivalent; ``reason`` says why) and
    ``notes`` on where MergeKit's implementation may still differ in the last bits."""

    config: dict[str, Any] | None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)

    def yaml(self) -> str:
        """The config as MergeKit YAML (for ``mergekit-yaml`` or ``mergelab mergekit=``)."""
        assert self.config is not None
        head = "# Written by mergelab: this merge as a MergeKit config (mergelab_recipe.json has the whole record).\n"
        return head + yaml.safe_dump(self.config, sort_keys=False)


class NotExpressible(ValueError):
    """A mergelab merge that MergeKit does not define the same way (the message says why)."""


def _ref(path: str) -> str:
    """How a config names a checkpoint: a local one by its absolute path (MergeKit resolves against its own working
    dir), a hub id as is."""
    p = Path(path).expanduser()
    return os.path.abspath(p) if p.exists() else path


def _translate_out(method: Any, n_experts: int) -> tuple[str, Any, dict[str, Any], list[str]]:
    """(merge_method, per-model parameters (one mapping for every model, or a list of one per expert), global
    parameters, notes) of a mergelab method, or NotExpressible."""
    from mergelab.methods.base import expert_weights
    from mergelab.methods.dare import DARE
    from mergelab.methods.task_arithmetic import TaskArithmetic
    from mergelab.methods.ties import TIES
    from mergelab.methods.weight_averaging import WeightAveraging

    kind = type(method)  # exact classes: a subclass (MagnitudePrunedTA is a TIES) may merge differently
    if kind is TaskArithmetic:  # per-model weight lambda * w_t
        weights = [{"weight": c} for c in method.coefficients(n_experts)]
        return "task_arithmetic", _same_or_each(weights), {"normalize": False}, []
    if kind is WeightAveraging:  # MergeKit's linear normalises the weights as mergelab does
        names = method.expert_names(n_experts)
        return (
            "linear",
            _same_or_each([{"weight": w} for w in expert_weights(method.weights, names)]),
            {"normalize": True},
            [],
        )
    if kind is TIES:
        if method.prune != "per_tensor":
            raise NotExpressible(
                "TIES with prune=global ranks magnitudes over the whole model; MergeKit's ties trims each tensor on "
                "its own (method.prune=per_tensor is expressible)"
            )
        per, glob, notes = _ties_weights(method.disjoint, method.scaling)
        return "ties", {"density": method.k / 100.0, **per}, glob, [*TIES_NOTES, *notes]
    if kind is DARE:
        d = 1.0 - method.p
        inner = method.inner
        masks = (
            f"DARE's masks are random: MergeKit draws its own; `mergelab mergekit=mergekit_config.yml "
            f"seed={method.seed}` draws these (method.seed {method.seed})"
        )
        if type(inner) in (TaskArithmetic, WeightAveraging):
            inner.task_names = inner.task_names or method.task_names  # as the merge passes them on (begin)
            each = [{"density": d, "weight": c / d} for c in inner.coefficients(n_experts)]
            return "dare_linear", _same_or_each(each), _dare_global(), [masks]
        if type(inner) is TIES:
            if inner.prune != "per_tensor":  # its exact sign ties take the model's majority, MergeKit's the tensor's
                raise NotExpressible(
                    "DARE into TIES with prune=global elects the majority sign of exact ties over the whole model; "
                    "MergeKit's dare_ties works tensor by tensor (method.merge.prune=per_tensor is expressible)"
                )
            if inner.k != 100.0:
                raise NotExpressible(
                    f"DARE into TIES with k={inner.k:g}: MergeKit's dare_ties elects signs without trimming by "
                    "magnitude (method.merge.k=100 is expressible)"
                )
            per, glob, notes = _ties_weights(inner.disjoint, inner.scaling / d)
            return "dare_ties", {"density": d, **per}, {**glob, "rescale": False}, [masks, TIES_NOTES[1], *notes]
        raise NotExpressible(
            f"DARE into {type(inner).__name__}: MergeKit's DARE merges the dropped vectors by task arithmetic "
            "(dare_linear) or sign election without trimming (dare_ties) only"
        )
    name = kind.__name__
    raise NotExpressible(NO_EQUIVALENT.get(name, f"{name}: no MergeKit merge method computes it"))


def _same_or_each(per: list[dict[str, Any]]) -> Any:
    """One mapping when every expert has the same parameters (the config written before per-expert weights), else
    the list, one per expert."""
    return per[0] if all(p == per[0] for p in per) else per


def _ties_weights(disjoint: str, scaling: float) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Per-model and global parameters of TIES's disjoint merge scaled by ``scaling``: a sum is the weights' sum
    (``normalize: false``); a mean is ``normalize: true``, which cancels the weights, scaled by ``lambda``."""
    if disjoint == "sum":
        return {"weight": scaling}, {"normalize": False}, []
    if scaling == 1.0:
        return {"weight": 1.0}, {"normalize": True}, []
    return {"weight": 1.0}, {"normalize": True, "lambda": scaling}, [LAMBDA_NOTE]


def _dare_global() -> dict[str, Any]:
    return {"normalize": False, "rescale": False}


def export_merge(
    method: Any,
    pretrained: str,
    experts: Sequence[str],
    streamed: bool,
    pool: str,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    vocab_extended: bool = False,
    base_dtypes: Sequence[str] = (),
    gguf_file: str | None = None,
) -> Export:
    """The MergeKit config of a merge of ``experts`` (paths or hub ids, in task order) into ``pretrained`` by
    ``method``, or why there is none.

    ``streamed``: the merged dir is the pretrained checkpoint's layout with merged tensors (a checkpoint pool, or a
    causal-LM pool's whole LM); ``pool`` names the pool otherwise. ``include``/``exclude``: the pool's tensor
    filters; ``vocab_extended``: experts' extra vocabulary rows were merged in; ``base_dtypes``: the pretrained
    checkpoint's floating-point dtypes; ``gguf_file``: the pretrained model is that GGUF file in ``pretrained``.
    """
    try:
        merge_method, per, glob, notes = _translate_out(method, len(experts))
    except NotExpressible as e:
        return Export(None, str(e))
    if gguf_file:
        return Export(
            None,
            f"the pretrained model is the GGUF file {gguf_file} in {pretrained} (model.gguf_file), and MergeKit reads "
            "safetensors or PyTorch checkpoints, not GGUF (mergelab merged its weights dequantised into a "
            "safetensors copy in mergelab's cache)",
        )
    if not streamed:
        return Export(
            None,
            f"{pool} builds its merged model in memory in its own layout (e.g. a backbone and per-task heads), not as "
            "the pretrained checkpoint with merged tensors that MergeKit writes; checkpoint pools (model=checkpoints) "
            "get a MergeKit config",
        )
    if include or exclude:
        return Export(
            None,
            f"model.include {list(include)} / model.exclude {list(exclude)} keep tensors pretrained by regex; "
            "MergeKit's per-tensor filters match name substrings",
        )
    if vocab_extended:
        return Export(
            None,
            "experts' extra vocabulary rows were merged in (model.vocab=extend); MergeKit reconciles vocabularies "
            "through tokenizer settings that mergelab does not map",
        )
    from mergelab.io.files import is_adapter_dir  # torch comes with it: not at import (the CLI starts without)

    adapters = [e for e in experts if Path(e).expanduser().is_dir() and is_adapter_dir(Path(e).expanduser())]
    if adapters:  # a config naming the adapter dir as a model would not load; MergeKit's base+LoRA is not mapped
        return Export(
            None,
            f"expert {adapters[0]} is a PEFT adapter; MergeKit names one as <base>+<adapter>, which mergelab does not "
            "write or read",
        )
    base = _ref(pretrained)
    each = per if isinstance(per, list) else [per] * len(experts)
    models = [{"model": _ref(e), "parameters": dict(p)} for e, p in zip(experts, each, strict=True)]
    if merge_method == "linear":  # listed with weight 0: the base supplies the config, not a share of the average
        models.insert(0, {"model": base, "parameters": {"weight": 0.0}})
    config: dict[str, Any] = {"merge_method": merge_method, "base_model": base, "models": models, "parameters": glob}
    config["dtype"] = "float32"  # mergelab computes in float32 ...
    if len(base_dtypes) == 1:
        config["out_dtype"] = base_dtypes[0]  # ... and writes the base's dtype
    else:
        notes.append(f"the base checkpoint's tensors have dtypes {list(base_dtypes)}; MergeKit writes one dtype")
    return Export(config, None, notes)


# ----------------------------------------------------------------------------------------------- in


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping key given twice (PyYAML would keep the last one silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
    if repeated:
        raise yaml.constructor.ConstructorError(None, None, f"key(s) {repeated} given twice", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


@dataclass
class Import:
    """A MergeKit config as a mergelab run: the pretrained model, the experts (name -> path or hub id) and the
    method overrides."""

    pretrained: str
    experts: dict[str, str]
    method: list[str]


class _Reader:
    """Reads one MergeKit config; every refusal is a one-line ValueError naming the file and the key at fault."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> ValueError:
        return ValueError(f"mergekit config {self.path}: {key}: {problem}")

    def load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except OSError as e:
            raise ValueError(f"mergekit config {self.path}: cannot read it ({e.strerror or e})") from None
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as e:
            raise ValueError(f"mergekit config {self.path}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict):
            raise ValueError(f"mergekit config {self.path}: not a mapping of MergeKit keys")
        for key in data:
            if key in REFUSED_KEYS:
                raise self.fail(str(key), REFUSED_KEYS[key])
            if key not in ALLOWED_KEYS:
                raise self.fail(str(key), f"unknown key (mergelab reads {', '.join(ALLOWED_KEYS)})")
        return data

    def scalar(self, key: str, value: Any, kind: str) -> Any:
        """A parameter's single value: a number (``kind='number'``) or a boolean (``'bool'``, 0/1 accepted)."""
        if isinstance(value, list | dict):
            raise self.fail(
                key,
                f"{value!r}: per-tensor filters and layer gradients are not imported (mergelab uses "
                "one value for every tensor)",
            )
        if kind == "bool":
            if isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
                return bool(value)
            raise self.fail(key, f"{value!r} is not true or false")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"{value!r} is not a number")
        return float(value)

    def model_ref(self, key: str, value: Any) -> str:
        """A ``model:`` entry as mergelab's pool takes it: a local path (made absolute) or a hub id."""
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"{value!r}: a local dir or hub id (structured model references are not imported)")
        p = Path(value).expanduser()
        if p.exists():
            return os.path.abspath(p)
        if "+" in value:
            raise self.fail(key, f"{value!r}: LoRA references (model+lora) are not imported")
        if "@" in value:
            raise self.fail(key, f"{value!r}: hub revisions (@) are not imported")
        if not _HUB_ID.fullmatch(value):
            raise self.fail(key, f"{value!r}: no such dir, and not a hub id")
        return value

    def read(self) -> Import:
        data = self.load()
        method = data.get("merge_method")
        if method not in GLOBAL_PARAMETERS:
            raise self.fail(
                "merge_method",
                f"{method!r} has no mergelab equivalent (mergelab imports {', '.join(GLOBAL_PARAMETERS)})",
            )
        params = data.get("parameters") or {}
        if not isinstance(params, dict):
            raise self.fail("parameters", f"{params!r} is not a mapping")
        allowed = (*GLOBAL_PARAMETERS[method], *MODEL_PARAMETERS[method])
        for k in params:
            if k not in allowed:
                raise self.fail(f"parameters.{k}", f"not a parameter of {method} that mergelab maps ({allowed})")
        flags = {
            k: self.scalar(f"parameters.{k}", params[k], "bool")
            for k in ("normalize", "rescale", "int8_mask")
            if k in params
        }
        normalize = flags.get("normalize", DEFAULTS[method]["normalize"])
        rescale = flags.get("rescale", DEFAULTS[method]["rescale"])
        lam = self.scalar("parameters.lambda", params["lambda"], "number") if "lambda" in params else 1.0

        base = self.model_ref("base_model", data["base_model"]) if data.get("base_model") is not None else None
        if base is None and method != "linear":
            raise self.fail("base_model", f"missing: {method} adds task vectors to the base model")
        weights, densities, experts = self.models(data.get("models"), method, base, params)

        if method == "linear":
            spec = self.linear(base, weights, experts, normalize)
            self.check_dtypes(data, spec.pretrained)
            return spec
        if len({*densities}) > 1:
            raise self.fail("models[].parameters.density", f"{densities} differ: mergelab uses one density")
        d = densities[0] if densities else 1.0
        per_expert = len({*weights}) > 1 or min(weights) < 0
        if per_expert and method in ("ties", "dare_ties"):
            raise self.fail(
                "models[].parameters.weight",
                f"{weights} differ: mergelab's {method.replace('dare_', '')} takes one coefficient for every task "
                "vector (per-expert weights: task_arithmetic, linear, dare_linear)",
            )
        # Per-expert weights: the coefficient of a weight of 1, each expert's weight under method.weights.
        w = 1.0 if per_expert else weights[0]
        if per_expert and normalize and sum(weights) == 0:
            raise self.fail("models[].parameters.weight", f"{weights} sum to 0: normalize divides by their sum")
        if w < 0:
            raise self.fail("models[].parameters.weight", f"{w:g} < 0: mergelab's coefficients are non-negative")
        if not 0.0 < d <= 1.0:
            raise self.fail("models[].parameters.density", f"{d:g} is not in (0, 1]")
        if method == "ties" and rescale:
            raise self.fail("parameters.rescale", "true: mergelab's TIES does not rescale the trimmed vectors")
        if lam < 0:
            raise self.fail("parameters.lambda", f"{lam:g} < 0: mergelab's coefficients are non-negative")
        # The merged vector's scale. normalize divides by the weights kept: n x w for task arithmetic, per entry the
        # agreeing tasks' for sign election (a disjoint mean). Without rescale, DARE's survivors keep their size:
        # mergelab's survivors (rescaled by 1/density) times density.
        keep = d if method.startswith("dare_") and not rescale else 1.0
        if w == 0:
            raw = 0.0  # nothing is added (MergeKit counts a zero divisor as 1)
        elif normalize:
            divisor = (
                sum(weights) if per_expert else len(experts) if method in ("task_arithmetic", "dare_linear") else 1
            )
            raw = lam * keep / divisor
        else:
            raw = w * lam * keep
        scaling = raw if raw == w else _decimal(raw)  # derived: rounded as a decimal, see _decimal
        disjoint = "mean" if normalize else "sum"
        if per_expert:  # the weights by expert name, as MergeKit lists them
            mapping = "{" + ", ".join(f"{n}: {v!r}" for n, v in zip(experts, weights, strict=True)) + "}"
        if method == "task_arithmetic":
            overrides = ["method=task_arithmetic", f"method.scaling={scaling!r}"]
            overrides += [f"method.weights={mapping}"] if per_expert else []
        elif method == "ties":
            overrides = [
                "method=ties",
                f"method.k={_decimal(100 * d)!r}",
                "method.prune=per_tensor",
                f"method.disjoint={disjoint}",
                f"method.scaling={scaling!r}",
            ]
        else:
            overrides = ["method=dare", f"method.p={_decimal(1.0 - d)!r}"]
            if method == "dare_linear":
                overrides += ["method@method.merge=task_arithmetic", f"method.merge.scaling={scaling!r}"]
                overrides += [f"method.merge.weights={mapping}"] if per_expert else []
            else:
                overrides += [
                    "method@method.merge=ties",
                    "method.merge.k=100.0",
                    "method.merge.prune=per_tensor",
                    f"method.merge.disjoint={disjoint}",
                    f"method.merge.scaling={scaling!r}",
                ]
        assert base is not None
        self.check_dtypes(data, base)
        return Import(base, experts, overrides)

    def models(
        self, models: Any, method: str, base: str | None, params: Mapping[str, Any]
    ) -> tuple[list[float], list[float], dict[str, str]]:
        """Each expert's weight and density (the base's entry left out of task-vector methods) and the experts."""
        if not isinstance(models, list) or not models:
            raise self.fail("models", "missing or empty: list the models, each as {model: ..., parameters: ...}")
        weights: list[float] = []
        densities: list[float] = []
        experts: dict[str, str] = {}
        seen: set[str] = set()
        for i, entry in enumerate(models):
            where = f"models[{i}]"
            if not isinstance(entry, dict) or "model" not in entry:
                raise self.fail(where, f"{entry!r} is not a mapping with model:")
            for k in entry:
                if k not in ("model", "parameters"):
                    raise self.fail(f"{where}.{k}", "unknown key (mergelab reads model and parameters)")
            ref = self.model_ref(f"{where}.model", entry["model"])
            if ref in seen:
                raise self.fail(f"{where}.model", f"{ref} is listed twice")
            seen.add(ref)
            own = entry.get("parameters") or {}
            if not isinstance(own, dict):
                raise self.fail(f"{where}.parameters", f"{own!r} is not a mapping")
            if ref == base and method != "linear":
                if own:  # MergeKit takes no task vector from the base: its parameters would be ignored
                    raise self.fail(f"{where}.parameters", f"unused by {method} for the base model; remove them")
                continue
            for k in own:
                if k not in MODEL_PARAMETERS[method]:
                    raise self.fail(
                        f"{where}.parameters.{k}",
                        f"not a per-model parameter of {method} that mergelab maps ({MODEL_PARAMETERS[method]})",
                    )
            values = {**{k: v for k, v in params.items() if k in MODEL_PARAMETERS[method]}, **own}
            if "weight" not in values:
                raise self.fail(f"{where}.parameters.weight", f"missing (MergeKit's {method} requires it)")
            weights.append(self.scalar(f"{where}.parameters.weight", values["weight"], "number"))
            if "density" in MODEL_PARAMETERS[method]:
                densities.append(self.scalar(f"{where}.parameters.density", values.get("density", 1.0), "number"))
            experts[_expert_name(ref, experts)] = ref
        if method != "linear" and not experts:
            raise self.fail("models", "no model besides the base model")
        return weights, densities, experts

    def linear(self, base: str | None, weights: list[float], experts: dict[str, str], normalize: bool) -> Import:
        """A weighted mean with equal weights is weight averaging; models of weight 0 take no part in it."""
        if not normalize:
            raise self.fail("parameters.normalize", "false sums the models; mergelab's linear is weight averaging")
        if base is not None and base not in experts.values():
            raise self.fail(
                "base_model",
                "not listed under models: MergeKit would add it to the average without a weight (list it with "
                "weight 0 to keep it out of the average)",
            )
        kept = {n: p for (n, p), w in zip(experts.items(), weights, strict=True) if w != 0}
        used = [w for w in weights if w != 0]
        if not used:
            raise self.fail("models[].parameters.weight", "every weight is 0")
        if min(used) < 0:
            raise self.fail(
                "models[].parameters.weight",
                f"{weights}: a weighted mean with negative weights is not an average (task negation: task_arithmetic)",
            )
        # The pretrained model only sets theta_0 of theta_0 + sum(w_t tau_t) / sum(w_t): the experts' mean either way.
        pretrained = base if base is not None else next(iter(experts.values()))
        overrides = ["method=weight_averaging"]
        if len(set(used)) > 1:  # a weighted mean: the weights by expert name
            overrides.append(
                "method.weights={" + ", ".join(f"{n}: {w!r}" for n, w in zip(kept, used, strict=True)) + "}"
            )
        return Import(pretrained, kept, overrides)

    def check_dtypes(self, data: Mapping[str, Any], base: str) -> None:
        """``dtype`` must be mergelab's float32 compute dtype; the output dtype (``out_dtype``, else ``dtype``) must
        be the base checkpoint's, which mergelab writes."""
        dtype = data.get("dtype")
        if dtype is not None and dtype != "float32":
            raise self.fail("dtype", f"{dtype!r}: mergelab computes merges in float32 (set float32 or remove it)")
        out_key = "out_dtype" if data.get("out_dtype") is not None else "dtype"
        out = data.get(out_key)
        if out is None:
            return
        from mergelab.provenance.identity import checkpoint_identity

        found = checkpoint_identity(base)
        if found["hub"]:
            raise self.fail(
                out_key,
                f"{out!r}: mergelab writes the base model's dtype and cannot check a hub "
                "model's before downloading it; remove it",
            )
        if found["float_dtypes"] != [out]:
            raise self.fail(out_key, f"{out!r}: mergelab writes the base model's dtype ({found['float_dtypes']})")


def _decimal(x: float) -> float:
    """``x`` to 12 significant digits: a coefficient derived from decimal YAML values (0.7 -> p = 0.3, not
    0.30000000000000004), so that a config mergelab wrote reads back to the very same options."""
    return float(f"{x:.12g}")


def _expert_name(ref: str, taken: Mapping[str, str]) -> str:
    """An expert name (a config key) from its path's or hub id's last part, made unique."""
    stem = re.sub(r"\W", "_", ref.rstrip("/").rsplit("/", 1)[-1]) or "expert"
    stem = stem if stem[0].isalpha() else f"m_{stem}"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    return name


def read_mergekit(path: str | Path) -> Import:
    """The mergelab equivalent of the MergeKit config at ``path``; a one-line ValueError naming the file and the key
    or value it cannot translate exactly (never a key skipped)."""
    return _Reader(Path(path)).read()


def quote(value: str) -> str:
    """``value`` as a single-quoted string in Hydra's override grammar, where a backslash is literal unless backslashes
    precede a quote (the string's end included): those are doubled, and a quote inside is escaped."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"


def mergekit_overrides(path: str | Path) -> list[str]:
    """The overrides of the mergelab run equivalent to the MergeKit config at ``path``: a checkpoint pool of its
    base and models (``model.vocab=base``: as MergeKit, extra vocabulary rows are dropped), the method, a
    merge-only run (``eval=none``) and ``mergekit=<path>``, which records the source."""
    source = os.path.abspath(Path(path).expanduser())
    spec = read_mergekit(source)
    experts = "{" + ",".join(f"{n}:{quote(p)}" for n, p in spec.experts.items()) + "}"
    return [
        "model=checkpoints",
        f"model.pretrained={quote(spec.pretrained)}",
        f"model.experts={experts}",
        "model.vocab=base",
        *spec.method,
        "eval=none",
        f"{KEY}={quote(source)}",
    ]


#: Keys ``mergelab mergekit=...`` sets from the file (any override of them conflicts), and the model options that
#: do not change the merge (chunk size, shard size, trust_remote_code), which may be given beside it.
DEFINED_BY_FILE = ("model", "method", "tune", "experiment", "table")
FREE_MODEL_KEYS = ("model.chunk_elems", "model.max_shard_bytes", "model.trust_remote_code")


def _override_key(arg: str) -> str | None:
    """The key of a command-line override (``+k=v``, ``~k``, ``group@pkg=v``), None for a flag."""
    if arg.startswith("-"):
        return None
    return arg.lstrip("+~").split("=", 1)[0].strip()


def expand_command_line(args: Sequence[str]) -> list[str]:
    """``args`` with ``mergekit=<file>`` replaced by :func:`mergekit_overrides`; unchanged without it.

    Done before Hydra composes the config, so the run is an ordinary one and ``cfg.overrides`` spells it out.
    An ``eval=`` given beside it replaces ``eval=none`` (e.g. ``eval=lm_harness`` to score the merge); overrides
    of what the file defines (model, method, tune, experiment presets) are refused.
    """
    found = [i for i, a in enumerate(args) if _override_key(a) == KEY and "=" in a]
    if not found:
        return list(args)
    if len(found) > 1:
        raise ValueError(f"{KEY}= is given {len(found)} times; give one MergeKit config")
    i = found[0]
    value = args[i].split("=", 1)[1].strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    elif "," in value:
        raise ValueError(f"{KEY}={value}: one MergeKit config per run (sweeps over files are not supported)")
    if value in ("", "null"):
        return list(args)
    others = [a for j, a in enumerate(args) if j != i]
    for a in others:
        key = _override_key(a)
        if key is None or key in FREE_MODEL_KEYS:
            continue
        head = re.split(r"[.@]", key, maxsplit=1)[0]
        if head in DEFINED_BY_FILE:
            raise ValueError(
                f"{a!r} conflicts with {KEY}={value}: the MergeKit config defines the model pool and the method "
                "(edit the file instead)"
            )
    generated = mergekit_overrides(value)
    if any(_override_key(a) == "eval" for a in others):
        generated.remove("eval=none")
    return [*args[:i], *generated, *args[i + 1 :]]

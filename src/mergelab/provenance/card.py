"""The model card (``README.md``) of a merged dir: Hugging Face Hub metadata, then the merge in a few tables."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from mergelab.reports.tables import markdown_table, subset_phrase

#: Reference rows shown beside the merged model's scores when the run has them.
REFERENCE_ROWS = ("pretrained", "experts")


def _cell(value: Any) -> str:
    """A value in a markdown table cell (pipes escaped, floats short)."""
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _pretrained_line(pretrained: Mapping[str, Any]) -> str:
    """Where the pretrained model came from, in the card's words: its Hub id and how that is known, the local path
    read (a GGUF file named), or why no Hub id is known (and which unchecked ids its files name)."""
    hub_id = pretrained.get("hub_id")
    gguf = pretrained.get("gguf_file")
    local = pretrained.get("path")
    read = f"the GGUF file `{gguf}` in `{local or pretrained.get('id')}`" if gguf else f"`{local}`" if local else ""
    if gguf:
        read += ", dequantised by mergelab into a safetensors copy in its cache"
    if hub_id:
        line = f"Pretrained model: [`{hub_id}`](https://huggingface.co/{hub_id})"
        if read and (local or gguf):
            line += f", read from {read}"
        return line + f". Hub id from {pretrained['hub_id_from']}."
    line = (
        f"Pretrained model: {read or '`' + str(pretrained.get('id')) + '`'}. No Hugging Face Hub id is known for it "
        "(it was not given as one, it is not in the Hugging Face cache or a package mergelab knows, and no Hub id a "
        "file names has its weights in the local cache), so the metadata names no `base_model`."
    )
    for hint in pretrained.get("unverified") or []:
        why = (
            "the local Hugging Face cache's copy of it has other weights"
            if hint.get("cache") == "different"
            else "the local Hugging Face cache holds no copy of it to compare weights with"
        )
        named_by = hint["named_by"]
        line += f" {named_by[0].upper()}{named_by[1:]} names `{hint['id']}`, not taken as its Hub id: {why}."
        if "_name_or_path" in named_by:
            line += " (`_name_or_path` is the model a checkpoint was saved from: itself, or the one it was tuned from.)"
    return line


def _subset_words(scores: Mapping[str, Any]) -> str:
    """``, on a subset: ...`` when the scores are on a subset of each task's examples (see the recipe's
    ``scores.subset``), else empty."""
    subset = scores.get("subset")
    if not subset:
        return ""
    return f", on a subset: {subset_phrase(subset['value'])} ({subset['key']}={subset['value']}), not the whole split"


def declared_reference(target: str) -> tuple[str, list[str]]:
    """The reference the method class ``target`` declares (:mod:`mergelab.methods.declaration`) and the Hub tags
    it gives (``arxiv:<id>`` for each arXiv id it names, which links the paper on the Hub); empty when the class
    does not resolve (e.g. a recipe of an older mergelab)."""
    try:
        from mergelab.config_types import target_class
        from mergelab.methods.declaration import declared

        reference = str(declared(target_class(target), "reference") or "")
    except (ImportError, AttributeError, ValueError):
        return "", []
    return reference, [f"arxiv:{i}" for i in re.findall(r"arXiv (\d{4}\.\d{4,5})", reference)]


def model_card(recipe: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """The card of a merged dir, from its recipe (see :mod:`mergelab.provenance.recipe`) and the run's table rows.

    The YAML header is the Hub's model metadata: ``base_model`` (with ``base_model_relation: merge``) only when the
    pretrained model's Hub id is known (see :func:`~mergelab.provenance.identity.hub_identity`; a local path is not
    valid there, so the text names it), tags ``mergelab``, ``merge``, the method and its paper's ``arxiv:<id>`` (from
    the method's declared reference), and no ``model-index`` (no score of a run claims a Hub dataset's split). Then
    the pretrained model, the method, its reference and its options, the experts with their content hashes, the
    coefficients the method computed, the scores (% as in mergelab's tables; a subset of each task's examples said
    so) when the run scored the merge, and the command that reproduces the run.
    """
    method = recipe["method"]
    name = method["name"]
    reference, paper_tags = declared_reference(str(method["target"]))
    pretrained = recipe["pretrained"]
    hub_id = pretrained.get("hub_id")
    base = hub_id or pretrained.get("path", pretrained.get("id"))
    meta: dict[str, Any] = {"base_model": hub_id, "base_model_relation": "merge"} if hub_id else {}
    meta |= {"tags": ["mergelab", "merge", name, *paper_tags], "library_name": "transformers"}
    out = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
    out += [
        f"# {name}: a merge of {len(recipe['experts'])} experts of `{base}`",
        "",
        f"Merged with mergelab {recipe['versions'].get('mergelab') or ''} by **{name}** (`{method['target']}`).",
        "",
        _pretrained_line(pretrained),
        "",
    ]
    out += _method_section(recipe, reference)
    out += _experts_section(recipe)
    out += _scores_section(recipe, rows, tasks)
    out += _reproduce_section(recipe)
    return "\n".join(out) + "\n"


def _method_section(recipe: Mapping[str, Any], reference: str) -> list[str]:
    """The method: its reference, options and the grid point a tuned run chose."""
    method = recipe["method"]
    out = ["## Method", ""]
    out += [f"Reference: {reference}.", ""] if reference else []
    out.append(_table(["option", "value"], list(method["options"].items())) if method["options"] else "No options.\n")
    if method.get("grid_point"):
        split = (recipe.get("scores") or {}).get("tune", {}).get("split")
        point = ", ".join(f"{k}={v}" for k, v in method["grid_point"].items())
        out += [f"Chosen on the {split or 'tune'} split from the method's grid: {point}.", ""]
    return out


def _experts_section(recipe: Mapping[str, Any]) -> list[str]:
    """The experts with their content hashes, and the coefficients the method computed."""
    rows = [
        [t, f"`{e.get('given') or e.get('path') or e.get('id')}`", e["sha256"][:16] if "sha256" in e else "hub"]
        for t, e in recipe["experts"].items()
    ]
    out = ["## Experts", "", _table(["task", "checkpoint", "content sha256"], rows)]
    coefficients = recipe.get("coefficients") or {}
    out += ["## Coefficients", ""]
    out.append(
        _table(["coefficient", "value"], list(coefficients.items()))
        if coefficients
        else "The method computes none: its options above are its coefficients.\n"
    )
    return out


def _scores_section(
    recipe: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]
) -> list[str]:
    """The scores of the merge beside the reference rows, or that it was not scored."""
    scores = recipe.get("scores")
    out = ["## Scores", ""]
    if not scores:
        return [*out, "Not scored (a merge-only run).\n"]
    shown = {k: rows[k] for k in (*REFERENCE_ROWS, recipe["method"]["name"]) if k in rows}
    return [
        *out,
        f"{scores['suite']}, {scores['split']} split{_subset_words(scores)}: accuracy (%).",
        "",
        markdown_table(shown, tasks),
    ]


def _reproduce_section(recipe: Mapping[str, Any]) -> list[str]:
    """How to run the merge again (mergelab, and MergeKit where it has the same merge), and the files beside it."""
    mk = recipe["mergekit"]
    out = ["## Reproduce", ""]
    if recipe["command"] is not None:
        out += ["```bash", recipe["command"], "```", ""]
    else:  # run(cfg) from Python: no command line to show
        out += ["Not run by the `mergelab` command: `config` in `mergelab_recipe.json` is the whole run.", ""]
    if mk.get("file"):
        out += [f"Or with MergeKit: `mergekit-yaml {mk['file']} <out dir>` (or `mergelab mergekit={mk['file']}`).", ""]
    out += [
        "## Files",
        "",
        "- `mergelab_recipe.json`: the resolved config, the method, the experts' content hashes, "
        "the package versions and the scores.",
    ]
    if mk.get("file"):
        notes = "".join(f"\n  - {n}" for n in mk.get("notes") or [])
        differ = " Where the implementations differ:" if notes else ""
        out.append(f"- `{mk['file']}`: this merge as a MergeKit config.{differ}{notes}")
    else:
        out.append(f"- No MergeKit config: {mk['reason']}.")
    return out


def _shell_word(arg: str) -> str:
    """``arg`` quoted for a POSIX shell, in double quotes when it holds single quotes (Hydra's quoted values) and
    nothing a shell expands there, which reads better than shlex's ``'"'"'``."""
    if "'" in arg and not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)


def reproduce_command(overrides: Sequence[str], skip: Sequence[str] = ()) -> str:
    """``mergelab <overrides>`` as a shell command, leaving out the overrides of the keys ``skip``."""
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in skip]
    return " ".join(["mergelab", *(_shell_word(o) for o in kept)])

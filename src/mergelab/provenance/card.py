"""The model card (``README.md``) of a merged dir: Hugging Face Hub metadata, then the merge in a few tables."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from mergelab.reports.tables import markdown_table

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


def model_card(recipe: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """The card of a merged dir, from its recipe (see :mod:`mergelab.provenance.recipe`) and the run's table rows.

    The YAML header is the Hub's model metadata (``base_model`` the pretrained model as given,
    ``base_model_relation: merge``, tags ``mergelab``, ``merge`` and the method); then the method and its options,
    the experts with their content hashes, the coefficients the method computed, the scores (% as in mergelab's
    tables) when the run scored the merge, and the command that reproduces the run.
    """
    method = recipe["method"]
    name = method["name"]
    pretrained = recipe["pretrained"]
    base = pretrained.get("path", pretrained.get("id"))
    meta = {
        "base_model": base,
        "base_model_relation": "merge",
        "tags": ["mergelab", "merge", name],
        "library_name": "transformers",
    }
    experts = recipe["experts"]
    out = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
    out += [
        f"# {name}: a merge of {len(experts)} experts of `{base}`",
        "",
        f"Merged with mergelab {recipe['versions'].get('mergelab') or ''} by **{name}** (`{method['target']}`).",
        "",
        "## Method",
        "",
        _table(["option", "value"], list(method["options"].items())) if method["options"] else "No options.\n",
    ]
    if method.get("grid_point"):
        split = (recipe.get("scores") or {}).get("tune", {}).get("split")
        point = ", ".join(f"{k}={v}" for k, v in method["grid_point"].items())
        out += [f"Chosen on the {split or 'tune'} split from the method's grid: {point}.", ""]
    out += ["## Experts", ""]
    out.append(
        _table(
            ["task", "checkpoint", "content sha256"],
            [
                [t, f"`{e.get('given') or e.get('path') or e.get('id')}`", e["sha256"][:16] if "sha256" in e else "hub"]
                for t, e in experts.items()
            ],
        )
    )
    coefficients = recipe.get("coefficients") or {}
    out += ["## Coefficients", ""]
    out.append(
        _table(["coefficient", "value"], list(coefficients.items()))
        if coefficients
        else "The method computes none: its options above are its coefficients.\n"
    )
    scores = recipe.get("scores")
    out += ["## Scores", ""]
    if scores:
        shown = {k: rows[k] for k in (*REFERENCE_ROWS, name) if k in rows}
        out += [f"{scores['suite']}, {scores['split']} split: accuracy (%).", "", markdown_table(shown, tasks)]
    else:
        out.append("Not scored (a merge-only run).\n")
    mk = recipe["mergekit"]
    out += ["## Reproduce", ""]
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
    return "\n".join(out) + "\n"


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

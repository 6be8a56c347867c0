"""Tensor-at-a-time safetensors reading and sharded writing, in memory bounded by a few tensors.

Reading uses positioned reads (thread-safe, no shared file position) rather than memory maps, so only the
tensors (or row blocks) asked for are resident. Ranges the page cache already holds are copied from it; the
others are read with ``O_DIRECT`` straight into the caller's page-aligned buffer, which costs next to no CPU
(a buffered read of uncached data costs about as much CPU as the merge arithmetic) and leaves no cold pages
behind. Writing fills page-aligned staging buffers in layout order that a background thread writes out,
with ``O_DIRECT`` where the filesystem allows, so computing the next block overlaps writing the last one.
The files are the standard safetensors format (an 8-byte header length, a JSON header, the raw data)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import mmap
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch
from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"


SINGLE_FILE = "model.safetensors"


# PyTorch pickle checkpoints (transformers' older default): one file, or shards named by an index.
BIN_FILE = "pytorch_model.bin"


BIN_INDEX_FILE = "pytorch_model.bin.index.json"


# A PEFT adapter dir: its config (rank, alpha, targets) and its weights, safetensors preferred as PEFT does.
ADAPTER_CONFIG = "adapter_config.json"


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


# The weight files a hub download fetches when a repo has no safetensors weights (a dir of .bin files).
BIN_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin")


# Copied from the pretrained model dir beside merged weights, so transformers loads the result as is.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


TOKENIZER_FILES = tuple(f for f in SIDE_FILES if f not in ("config.json", "generation_config.json"))


DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointReader(Protocol):
    """Name -> tensor access to one checkpoint, reading only the tensors or row blocks asked for.

    What the streaming engine and the checkpoint pool read (:func:`mergelab.io.reader.open_checkpoint` opens one):
    safetensors (:class:`~mergelab.io.reader.LazyCheckpoint`), PyTorch pickles
    (:class:`~mergelab.io.reader.BinCheckpoint`) and PEFT adapters over a base
    (:class:`~mergelab.io.adapters.AdapterCheckpoint`). Several threads may read at once.
    """

    name: str  # how errors name the checkpoint
    dir: Path  # its dir (side files such as the tokenizer are copied from it)

    def __contains__(self, name: object) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, name: str) -> Tensor: ...

    def keys(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def block_nbytes(self, name: str, start: int | None = None, stop: int | None = None) -> int: ...

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor: ...

    def read_rows_into(self, name: str, start: int | None, stop: int | None, buf: Tensor) -> Tensor: ...

    def get(self, name: str) -> Tensor: ...

    def close(self) -> None: ...


def looks_local(path: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (absolute, ./, ~, deeper) is a local path."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).exists()


def resolve_model_dir(path_or_id: str) -> Path:
    """A local dir as is; a hub id downloaded (safetensors, configs and tokenizer only) into the HF cache.

    A repo without safetensors weights is fetched again with its ``.bin`` weights (:data:`BIN_PATTERNS`): only
    then, since many repos carry both and the pickles would double the download.
    """
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():  # a weights file, say: the pool needs its dir (config.json, tokenizer, shards)
        raise NotADirectoryError(
            f"checkpoint '{path_or_id}' is a file, not a model dir; give the dir that holds config.json and the weights"
        )
    if looks_local(path_or_id):
        raise FileNotFoundError(f"checkpoint dir '{path_or_id}' does not exist")
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json", *SIDE_FILES]
    try:
        out = Path(snapshot_download(path_or_id, allow_patterns=patterns))
        if not any((out / f).is_file() for f in (SINGLE_FILE, INDEX_FILE, ADAPTER_WEIGHTS[0])):
            out = Path(snapshot_download(path_or_id, allow_patterns=[*patterns, *BIN_PATTERNS]))
        return out
    except Exception as e:  # offline, unknown repo, gated: say which entry failed
        raise OSError(f"cannot fetch '{path_or_id}' from the hub: {type(e).__name__}: {e}") from e


#: What :func:`checkpoint_format` accepts, as errors list it.
ACCEPTED_FORMATS = (
    f"{SINGLE_FILE} or {INDEX_FILE} + shards, {BIN_FILE} or {BIN_INDEX_FILE} + shards (a full checkpoint), or "
    f"{ADAPTER_CONFIG} + {' or '.join(ADAPTER_WEIGHTS)} (a PEFT adapter)"
)


def is_adapter_dir(model_dir: Path) -> bool:
    """Whether a local dir holds any file of a PEFT adapter (its config or its weights)."""
    return any((model_dir / f).is_file() for f in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS))


def checkpoint_format(model_dir: Path, name: str | None = None) -> str:
    """What a model dir holds: ``"safetensors"``, ``"bin"`` (PyTorch pickles) or ``"adapter"`` (a PEFT adapter).

    Safetensors win over ``.bin`` when a dir has both (as in transformers). Any adapter file (its config or its
    weights) makes the dir an adapter, so a half-saved one gets the adapter's own error rather than "no weights".
    A dir holding both a full checkpoint and an adapter is refused: which one is the expert would be a guess (and
    transformers would load it as the adapter). Errors are one line naming ``name`` (the model) and the dir.
    """
    who = f"{name}: " if name else ""
    if (model_dir / INDEX_FILE).is_file() or (model_dir / SINGLE_FILE).is_file():
        full = "safetensors"
    elif (model_dir / BIN_INDEX_FILE).is_file() or (model_dir / BIN_FILE).is_file():
        full = "bin"
    else:
        full = ""
    adapter = is_adapter_dir(model_dir)
    if full and adapter:
        raise ValueError(
            f"{who}{model_dir} holds both a full checkpoint ({full}) and a PEFT adapter ({ADAPTER_CONFIG} or "
            f"{' or '.join(ADAPTER_WEIGHTS)}); keep one of them in the dir"
        )
    if adapter:
        return "adapter"
    if not full:
        raise FileNotFoundError(f"{who}no model weights in {model_dir}: expected {ACCEPTED_FORMATS}")
    return full


# The safetensors library's own limit on the header length (its HeaderTooLarge).
MAX_HEADER_BYTES = 100_000_000


# Every dtype the safetensors format defines (mergelab reads those of DTYPES): an unknown name is a corrupt file,
# a known one mergelab does not read is a file it cannot merge.
SAFETENSORS_DTYPES = (
    *("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"),
    *("F4", "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"),
)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a name given twice (plain ``json`` keeps the last one silently)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"'{k}' appears twice")
        out[k] = v
    return out


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _is_index(value: Any) -> bool:
    """A JSON integer a safetensors reader accepts as a size or offset (u64; not a bool, not 2.0)."""
    return type(value) is int and 0 <= value < 2**64


def read_header(path: Path, name: str | None = None) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (without ``__metadata__``) and the offset where its data starts.

    The header is checked as the safetensors library checks it, so a file it would refuse is never read from the
    wrong bytes: a sane header length within the file; UTF-8 JSON holding an object; ``__metadata__``, if any,
    mapping strings to strings; per tensor a dtype mergelab reads, a shape of non-negative integers and
    ``data_offsets`` ``[begin, end]`` spanning exactly shape x itemsize bytes; all tensors' data contiguous from 0,
    without gaps or overlaps, ending exactly at the end of the file. Done once per file, when it is opened.
    Raises a one-line ValueError naming ``name`` (the model, when given), the file and the tensor at fault.
    """
    who = f"{name}: " if name else ""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = _header_length(f, size, path, who)
        blob = f.read(n)
    header = _header_object(blob, path, who)
    spans = [(*_tensor_span(info, f"{who}tensor '{key}' in {path}"), key) for key, info in header.items()]
    _check_data_layout(spans, size - 8 - n, path, who)
    return header, 8 + n


def _header_length(f: BinaryIO, size: int, path: Path, who: str) -> int:
    """Read the 8-byte header length at the start of ``f`` (a file of ``size`` bytes) and check that the header fits
    the file and the limit."""
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError(f"{who}{path} is not a safetensors file: {size} bytes, too short for the header length")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"{who}{path} is not a safetensors file: header length {n} (the limit is 100 MB)")
    if 8 + n > size:
        raise ValueError(
            f"{who}{path} is not a safetensors file or is truncated: header length {n} runs past its {size} bytes"
        )
    return n


def _header_object(blob: bytes, path: Path, who: str) -> dict[str, Any]:
    """The header's bytes parsed as a JSON object of tensor entries, its ``__metadata__`` checked and removed."""
    try:
        header = json.loads(blob.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise ValueError(f"{who}{path}: the safetensors header is not valid UTF-8 (byte {8 + e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{who}{path}: the safetensors header is not valid JSON ({e.msg} at character {e.pos})"
        ) from None
    except ValueError as e:  # a duplicate name
        raise ValueError(f"{who}{path}: the safetensors header is ambiguous: {e}") from None
    except RecursionError:
        raise ValueError(f"{who}{path}: the safetensors header is JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError(f"{who}{path}: the safetensors header is {_json_kind(header)}, not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict):
            raise ValueError(f"{who}{path}: __metadata__ is {_json_kind(meta)}, not an object of strings")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise ValueError(f"{who}{path}: __metadata__ '{k}' is {_json_kind(v)}, not a string")
    return header


def _tensor_span(info: Any, where: str) -> tuple[int, int]:
    """The ``[begin, end)`` data offsets of one tensor's header entry, after checking its dtype, its shape and that
    the span holds exactly shape x itemsize bytes (``where`` names the tensor and the file in errors)."""
    if not isinstance(info, dict):
        raise ValueError(f"{where}: {_json_kind(info)}, not an object with dtype, shape and data_offsets")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        if "dtype" not in info:
            raise ValueError(f"{where}: no dtype")
        if dtype in SAFETENSORS_DTYPES:
            raise ValueError(f"{where}: unsupported dtype {dtype} (mergelab reads {', '.join(DTYPES)})")
        raise ValueError(f"{where}: unknown dtype {dtype!r}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = info.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets):
        raise ValueError(f"{where}: data_offsets {offsets!r} is not [begin, end] of non-negative integers")
    begin, end = offsets
    if begin > end:
        raise ValueError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    nbytes = math.prod(shape) * dtype_size(DTYPES[dtype])
    if end - begin != nbytes:
        raise ValueError(
            f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes, shape {shape} of {dtype} needs {nbytes}"
        )
    return begin, end


def _check_data_layout(spans: list[tuple[int, int, str]], data_bytes: int, path: Path, who: str) -> None:
    """Check that the tensors' ``(begin, end, name)`` spans tile the ``data_bytes`` after the header exactly: back to
    back from 0, no gap, no overlap, nothing left over (anything else means some tensor would be read from another's
    bytes)."""
    pos, prev = 0, ""
    for begin, end, key in sorted(spans):
        after = f"tensor '{prev}'" if prev else "the start of the data"
        if begin < pos:
            raise ValueError(
                f"{who}tensor '{key}' in {path}: data_offsets [{begin}, {end}] overlap {after} (ending at {pos})"
            )
        if begin > pos:
            raise ValueError(
                f"{who}tensor '{key}' in {path}: data_offsets [{begin}, {end}] leave a gap of {begin - pos} "
                f"bytes after {after} (ending at {pos}); tensors must be contiguous"
            )
        pos, prev = end, key
    if pos > data_bytes:
        raise ValueError(
            f"{who}tensor '{prev}' is truncated in {path}: its data ends at byte {pos} of the data, the file "
            f"holds {data_bytes}"
        )
    if pos < data_bytes:
        raise ValueError(
            f"{who}{path}: {data_bytes - pos} bytes after the last tensor's data are not described by the header "
            "(not a valid safetensors file)"
        )


# O_DIRECT wants file offsets, lengths and buffer addresses aligned to the device's logical block size;
# a page is a multiple of it on every Linux system.
ALIGN = max(mmap.PAGESIZE, 4096)


O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def open_direct(path: Path, flags: int) -> int | None:
    """A second descriptor of ``path`` with ``O_DIRECT`` added to ``flags``, or None where the platform or the
    filesystem (e.g. tmpfs) has no ``O_DIRECT``: the caller then goes through the page cache."""
    if not O_DIRECT:
        return None
    try:
        return os.open(path, flags | O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def aligned_empty(nbytes: int) -> Tensor:
    """A page-aligned uint8 buffer of ``nbytes`` (anonymous memory, zero-filled, touched lazily).

    Large ones ask for transparent huge pages: fewer TLB misses when streaming through them, and O_DIRECT
    pins one huge page where it would pin hundreds of small ones.
    """
    mm = mmap.mmap(-1, max(int(nbytes), 1))
    if nbytes >= 2 << 20 and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # THP disabled: small pages then
            mm.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mm, dtype=torch.uint8)


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return dtype.itemsize


def _pread_into(fd: int, buf: Tensor, offset: int) -> int:
    """Read up to ``buf.numel()`` bytes at ``offset`` into the uint8 tensor ``buf``; bytes read (short at EOF)."""
    view = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _pwrite_all(fd: int, buf: Tensor, offset: int) -> None:
    view = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


class _CacheStat:
    """Whether a file range is resident in the page cache, via Linux's ``cachestat`` syscall (6.5+).

    Unavailable elsewhere (``resident`` then returns None and reads stay buffered, as before).
    """

    NR = 451  # the same number in the generic and x86-64 syscall tables

    class _Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class _Stat(ctypes.Structure):
        _fields_ = [(f, ctypes.c_uint64) for f in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]

    def __init__(self) -> None:
        self._syscall: Any = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                self._syscall = libc.syscall
                self._syscall.restype = ctypes.c_long
            except (OSError, AttributeError):
                self._syscall = None

    def resident(self, fd: int, offset: int, nbytes: int) -> bool | None:
        """True if every page of the range is cached, False if some is not, None if this cannot be asked."""
        if self._syscall is None or nbytes <= 0:
            return None
        rng, st = self._Range(offset, nbytes), self._Stat()
        args = (ctypes.c_long(self.NR), ctypes.c_int(fd), ctypes.byref(rng), ctypes.byref(st), ctypes.c_uint(0))
        if self._syscall(*args) != 0:
            if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
                self._syscall = None  # old kernel or filtered syscall: never ask again
            return None
        pages = (offset + nbytes - 1) // mmap.PAGESIZE - offset // mmap.PAGESIZE + 1
        return st.cache >= pages


_CACHESTAT = _CacheStat()

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
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"


SINGLE_FILE = "model.safetensors"


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


def looks_local(path: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (absolute, ./, ~, deeper) is a local path."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).exists()


def resolve_model_dir(path_or_id: str) -> Path:
    """A local dir as is; a hub id downloaded (safetensors, configs and tokenizer only) into the HF cache."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if looks_local(path_or_id):
        raise FileNotFoundError(f"checkpoint dir '{path_or_id}' does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_id, allow_patterns=["*.safetensors", "*.json", *SIDE_FILES]))
    except Exception as e:  # offline, unknown repo, gated: say which entry failed
        raise OSError(f"cannot fetch '{path_or_id}' from the hub: {type(e).__name__}: {e}") from e


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (truncated)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


# O_DIRECT wants file offsets, lengths and buffer addresses aligned to the device's logical block size;
# a page is a multiple of it on every Linux system.
ALIGN = max(mmap.PAGESIZE, 4096)


O_DIRECT: int = getattr(os, "O_DIRECT", 0)


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

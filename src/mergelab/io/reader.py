"""Lazy checkpoint reading: name -> tensor access to a (possibly sharded) checkpoint, hub id or dir, reading only the
tensors or row blocks asked for, by several threads at once.

:class:`LazyCheckpoint` reads safetensors with positioned reads (from the page cache where it holds the data, else
with ``O_DIRECT`` into page-aligned buffers); :class:`BinCheckpoint` reads PyTorch pickles (``pytorch_model.bin``
and its shards) with ``torch.load(weights_only=True)``, one shard in memory at a time; :func:`open_checkpoint`
picks the reader a dir needs, a PEFT adapter being read over its base (:mod:`mergelab.io.adapters`)."""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import pickle
import threading
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mergelab.io.adapters import AdaptedState, AdapterCheckpoint, LoraAdapter, apply_adapter, read_adapter_config
from mergelab.io.files import (
    _CACHESTAT,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ALIGN,
    BIN_FILE,
    BIN_INDEX_FILE,
    DTYPE_NAMES,
    DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointReader,
    _pread_into,
    checkpoint_format,
    dtype_size,
    open_direct,
    read_header,
    resolve_model_dir,
    round_up,
)


class _InputFile:
    """One input file read with positioned reads; thread-safe.

    ``direct``: None reads from the page cache what it holds and the rest with O_DIRECT; True always reads with
    O_DIRECT where the alignment allows; False never does.
    """

    def __init__(self, path: Path, direct: bool | None) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        if hasattr(os, "posix_fadvise"):  # larger readahead for buffered reads of uncached data
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self.direct = direct
        self.direct_refused = False  # set when the filesystem turns out to refuse O_DIRECT reads
        self.dfd = open_direct(path, os.O_RDONLY) if direct is not False else None

    def _use_direct(self, offset: int, nbytes: int) -> bool:
        if self.dfd is None or self.direct_refused:
            return False
        if self.direct:
            return True
        return _CACHESTAT.resident(self.fd, offset, nbytes) is False

    def read(self, offset: int, nbytes: int, buf: Tensor, itemsize: int) -> Tensor:
        """The ``nbytes`` at ``offset`` as a uint8 view into the page-aligned ``buf``.

        ``buf`` must hold ``nbytes + 2 * ALIGN`` bytes. The view starts at ``offset % ALIGN`` for an O_DIRECT read
        (which reads whole aligned blocks around the range) and at 0 otherwise.
        """
        lead = offset % ALIGN
        start, stop = offset - lead, round_up(offset + nbytes)
        if lead % itemsize == 0 and buf.numel() >= stop - start and self._use_direct(offset, nbytes):
            try:
                got = _pread_into(self.dfd, buf[: stop - start], start)  # type: ignore[arg-type]
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct_refused = True  # the filesystem refuses O_DIRECT after all: buffered from now on
            else:
                if got < lead + nbytes:
                    raise EOFError
                return buf[lead : lead + nbytes]
        if _pread_into(self.fd, buf[:nbytes], offset) != nbytes:
            raise EOFError
        return buf[:nbytes]

    def close(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd is not None:
                os.close(fd)
        self.dfd = None


class _Entry(NamedTuple):
    """Where one tensor is: its file, the byte offset of its data (safetensors only), dtype and shape."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class _Checkpoint:
    """What every checkpoint reader shares: the tensor table, the checks of a sharded index against its shards,
    and mapping-style access. A subclass reads one file's tensor table in :meth:`_read_shard`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dir = Path()
        self.entries: dict[str, _Entry] = {}

    def _open(self, path_or_id: str | Path, single: str, index_file: str) -> None:
        """Read a dir's (or hub id's) single file or sharded index, or one given weight file."""
        p = Path(path_or_id).expanduser()
        if p.is_file():  # one weight file (an adapter's)
            self.dir = p.parent
            self._read_shard(p)
            return
        self.dir = resolve_model_dir(str(path_or_id))
        index = self.dir / index_file
        if index.is_file():
            self._read_sharded(index)
        elif (self.dir / single).is_file():
            self._read_shard(self.dir / single)
        else:
            raise FileNotFoundError(f"{self.name}: no {index_file} or {single} in {self.dir}")

    def _read_shard(self, path: Path, weight_map: dict[str, str] | None = None, index: Path | None = None) -> None:
        raise NotImplementedError

    def _add(
        self, key: str, entry: _Entry, weight_map: dict[str, str] | None = None, index: Path | None = None
    ) -> None:
        """Add one tensor of a shard. Within a sharded checkpoint (``index`` and its ``weight_map`` given), it must be
        mapped to that shard (the dir joined with the name the map gives) and be in no other shard."""
        if weight_map is not None:
            if key in self.entries:
                raise ValueError(
                    f"{self.name}: tensor '{key}' is in two shards, {self.entries[key].path} and {entry.path}"
                )
            if key not in weight_map or self.dir / weight_map[key] != entry.path:
                mapped = f"maps it to {weight_map[key]}" if key in weight_map else "does not list it"
                raise ValueError(f"{self.name}: tensor '{key}' is in shard {entry.path}, but {index} {mapped}")
        self.entries[key] = entry

    def _read_sharded(self, index: Path) -> None:
        """Add the tensors of every shard an index names, checking the index and the shards agree.

        Each tensor of ``weight_map`` must be in the shard it names, and each tensor of a shard must be mapped to
        that shard: otherwise the index and the shards are of different checkpoints (or one was cut short).
        """
        try:
            data = json.loads(index.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.name}: {index} is not valid UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{self.name}: {index} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
            ) from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{self.name}: {index} has no 'weight_map' object (tensor name -> shard file)")
        for key, fname in weight_map.items():
            if not isinstance(fname, str) or not fname or Path(fname).is_absolute() or ".." in Path(fname).parts:
                raise ValueError(f"{self.name}: {index} maps tensor '{key}' to {fname!r}, not a file in {self.dir}")
        for fname in sorted(set(weight_map.values())):
            path = self.dir / fname
            if not path.is_file():
                missing = next(k for k, f in weight_map.items() if f == fname)
                raise FileNotFoundError(
                    f"{self.name}: shard {path} listed in {index} (for tensor '{missing}') is missing"
                )
            self._read_shard(path, weight_map, index)
        for key, fname in weight_map.items():
            if key not in self.entries:
                raise ValueError(
                    f"{self.name}: {index} maps tensor '{key}' to {self.dir / fname}, which does not hold it"
                )

    def keys(self) -> list[str]:
        """Tensor names."""
        return list(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> Tensor:
        """The whole tensor, read from disk (so a checkpoint reads like a state dict)."""
        return self.get_rows(name)

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        raise NotImplementedError

    def get(self, name: str) -> Tensor:
        return self.get_rows(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def _rows(self, name: str, start: int | None, stop: int | None) -> tuple[_Entry, int, int, int]:
        """The entry of ``name``, rows ``start:stop`` clipped to the tensor, and the elements per row."""
        if name not in self.entries:
            raise KeyError(f"{self.name}: no tensor '{name}'")
        entry = self.entries[name]
        rows = entry.shape[0] if entry.shape else 1
        start = 0 if start is None else start
        stop = rows if stop is None else min(stop, rows)
        return entry, start, stop, math.prod(entry.shape[1:]) if entry.shape else 1

    def block_nbytes(self, name: str, start: int | None = None, stop: int | None = None) -> int:
        """Bytes of rows ``start:stop`` of a tensor on disk."""
        entry, start, stop, row_elems = self._rows(name, start, stop)
        return (stop - start) * row_elems * dtype_size(entry.dtype)


class LazyCheckpoint(_Checkpoint):
    """Name -> tensor access to a (possibly sharded) safetensors checkpoint, reading only what is asked.

    ``path_or_id``: a hub id, a dir (``model.safetensors`` or an index and its shards) or one safetensors file.
    Reads are positioned, so several threads may read at once. ``direct`` picks how uncached data is read
    (see :class:`_InputFile`; the default reads what the page cache holds from it and the rest with O_DIRECT).
    """

    def __init__(self, path_or_id: str | Path, name: str | None = None, direct: bool | None = None) -> None:
        super().__init__(name or str(path_or_id))
        self.direct = direct
        self._files: dict[Path, _InputFile] = {}
        self._lock = threading.Lock()
        self._open(path_or_id, SINGLE_FILE, INDEX_FILE)

    def _read_shard(self, path: Path, weight_map: dict[str, str] | None = None, index: Path | None = None) -> None:
        """Add the tensors of one safetensors file, its header checked whole (once, here)."""
        header, data_start = read_header(path, self.name)
        for key, info in header.items():
            begin, _ = info["data_offsets"]
            self._add(
                key, _Entry(path, data_start + begin, DTYPES[info["dtype"]], tuple(info["shape"])), weight_map, index
            )

    def _file(self, path: Path) -> _InputFile:
        with self._lock:
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = _InputFile(path, self.direct)
            return f

    def _span(self, name: str, start: int | None, stop: int | None) -> tuple[Path, int, int, torch.dtype, tuple]:
        """File, byte offset and byte count of rows ``start:stop``, the dtype and the block's shape."""
        entry, start, stop, row_elems = self._rows(name, start, stop)
        itemsize = dtype_size(entry.dtype)
        block = (stop - start, *entry.shape[1:]) if entry.shape else ()
        offset = entry.offset + start * row_elems * itemsize
        return entry.path, offset, (stop - start) * row_elems * itemsize, entry.dtype, block

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` of a tensor (the whole tensor when both are None), read from disk."""
        path, offset, nbytes, dtype, block = self._span(name, start, stop)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes and _pread_into(self._file(path).fd, buf, offset) != nbytes:
            raise ValueError(f"{self.name}: tensor '{name}' is truncated in {path}")
        return buf.view(dtype).reshape(block)

    def read_rows_into(self, name: str, start: int | None, stop: int | None, buf: Tensor) -> Tensor:
        """Rows ``start:stop`` read into the page-aligned uint8 ``buf`` (``block_nbytes + 2 * ALIGN`` bytes).

        The result is a view of ``buf``, valid until ``buf`` is reused.
        """
        path, offset, nbytes, dtype, block = self._span(name, start, stop)
        if nbytes == 0:
            return torch.empty(block, dtype=dtype)
        try:
            raw = self._file(path).read(offset, nbytes, buf, dtype_size(dtype))
        except EOFError:
            raise ValueError(f"{self.name}: tensor '{name}' is truncated in {path}") from None
        return raw.view(dtype).reshape(block)

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


def _refusal(e: BaseException) -> str:
    """The line of torch's weights-only refusal that says what was refused (its message is a page long)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else type(e).__name__)
    return why.removeprefix("WeightsUnpickler error: ").split(". ")[0].rstrip(".")


def load_bin(path: Path, name: str | None = None) -> dict[str, Tensor]:
    """The tensors of one PyTorch pickle checkpoint file, read with ``torch.load(weights_only=True)``.

    ``weights_only`` refuses any pickled object other than tensors and plain containers before running anything,
    so a ``.bin`` that would execute code when loaded is refused, naming the file. Files in torch's zip format
    (``torch.save``'s default since 1.6) are memory-mapped: their tensors are read from the file when used and
    held by the page cache; an older (legacy) file is read whole. The file must hold a flat dict of dense tensors
    of the dtypes mergelab merges. Errors are one line naming ``name`` (the model) and the file.
    """
    who = f"{name}: " if name else ""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{who}{path} is refused: it holds something other than tensors ({_refusal(e)}); it was not run"
        ) from None
    except Exception as e:  # truncated zip, bad magic number, ...: torch raises several types
        raise ValueError(
            f"{who}{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {_refusal(e)})"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{who}{path} holds {type(obj).__name__}, not a state dict (tensor name -> tensor)")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(f"{who}{path}: entry {key!r} is {type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.dtype not in DTYPE_NAMES:
            raise ValueError(
                f"{who}tensor '{key}' in {path}: unsupported {value.dtype} {value.layout} tensor (mergelab reads dense "
                f"{', '.join(DTYPES)})"
            )
    return obj


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    A legacy shard is read into heap memory, and glibc keeps the pages of freed large blocks for reuse: measured,
    a merge of three legacy ``.bin`` checkpoints then held 716 MiB where one shard each (239 MiB) was alive.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


class BinCheckpoint(_Checkpoint):
    """Name -> tensor access to a PyTorch pickle checkpoint: ``pytorch_model.bin``, or the shards its
    ``pytorch_model.bin.index.json`` names, or one ``.bin`` file; every file read by :func:`load_bin`.

    Memory: **at most one shard is loaded at a time** (per checkpoint). Opening reads each shard once, in turn, for
    its tensor names, dtypes and shapes; a read loads the shard holding the tensor, dropping the previous one first,
    and copies the rows asked for out of it. Zip-format shards are memory-mapped, so what stays resident is the part
    of one shard read so far (file pages the kernel can reclaim); a legacy-format shard is held whole (and its heap
    pages handed back when it is dropped). The streaming engine reads tensors in the pretrained checkpoint's order,
    so shards saved in that order are each loaded once per pass; reads hold a lock, so several threads share the
    one shard.
    """

    def __init__(self, path_or_id: str | Path, name: str | None = None) -> None:
        super().__init__(name or str(path_or_id))
        self._lock = threading.Lock()
        self._loaded: tuple[Path, dict[str, Tensor]] | None = None
        self._open(path_or_id, BIN_FILE, BIN_INDEX_FILE)

    def _read_shard(self, path: Path, weight_map: dict[str, str] | None = None, index: Path | None = None) -> None:
        """Add the tensors of one ``.bin`` file (loaded as the current shard: only its pickle is read if mapped)."""
        with self._lock:
            tensors = self._shard(path)
        for key, t in tensors.items():
            self._add(key, _Entry(path, 0, t.dtype, tuple(t.shape)), weight_map, index)

    def _shard(self, path: Path) -> dict[str, Tensor]:
        """The tensors of shard ``path``, loaded unless it is the current one (call with the lock held)."""
        if self._loaded is None or self._loaded[0] != path:
            legacy = self._loaded is not None and not zipfile.is_zipfile(self._loaded[0])
            self._loaded = None  # drop the previous shard before loading the next: one in memory at a time
            if legacy:
                _trim_heap()
            self._loaded = (path, load_bin(path, self.name))
        return self._loaded[1]

    def _block(self, name: str, start: int | None, stop: int | None) -> Tensor:
        """A view of rows ``start:stop`` in the current shard (call with the lock held)."""
        entry, start, stop, _ = self._rows(name, start, stop)
        t = self._shard(entry.path)[name]
        return t[start:stop] if entry.shape else t

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` of a tensor (the whole tensor when both are None), copied out of its shard."""
        with self._lock:
            return self._block(name, start, stop).clone(memory_format=torch.contiguous_format)

    def read_rows_into(self, name: str, start: int | None, stop: int | None, buf: Tensor) -> Tensor:
        """Rows ``start:stop`` copied into the uint8 ``buf`` (at least ``block_nbytes`` bytes); a view of ``buf``."""
        with self._lock:
            block = self._block(name, start, stop)
            out = buf[: block.numel() * block.element_size()].view(block.dtype).view(block.shape)
            return out.copy_(block)

    def close(self) -> None:
        with self._lock:
            self._loaded = None


def open_adapter(path_or_id: str | Path, name: str | None = None) -> LoraAdapter:
    """The PEFT LoRA adapter in a dir (or hub id): its config checked and its weights opened lazily.

    The weights are ``adapter_model.safetensors``, else ``adapter_model.bin`` (read with ``weights_only``). A dir
    missing either file gets a one-line error saying it is a PEFT adapter and what is missing.
    """
    where = name or str(path_or_id)
    adapter_dir = resolve_model_dir(str(path_or_id))
    weights = next((adapter_dir / f for f in ADAPTER_WEIGHTS if (adapter_dir / f).is_file()), None)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        held = f"holds {weights.name} but " if weights else ""
        raise FileNotFoundError(
            f"{where}: {adapter_dir} is a PEFT adapter that {held}has no {ADAPTER_CONFIG} (its rank, alpha and "
            "target modules); save the adapter with PEFT's save_pretrained"
        )
    config = read_adapter_config(adapter_dir / ADAPTER_CONFIG, where)
    if weights is None:
        raise FileNotFoundError(
            f"{where}: {adapter_dir} is a PEFT adapter ({ADAPTER_CONFIG}) without its weights: no "
            f"{' or '.join(ADAPTER_WEIGHTS)}"
        )
    reader: CheckpointReader = (
        LazyCheckpoint(weights, name=where) if weights.suffix == ".safetensors" else BinCheckpoint(weights, name=where)
    )
    try:
        return LoraAdapter(adapter_dir, where, config, reader)
    except BaseException:
        reader.close()
        raise


def open_checkpoint(
    path_or_id: str | Path,
    name: str | None = None,
    base: CheckpointReader | None = None,
    direct: bool | None = None,
    pretrained: str | None = None,
) -> CheckpointReader:
    """The reader a checkpoint dir (or hub id) needs, by what it holds (:func:`~mergelab.io.files.checkpoint_format`).

    Safetensors: :class:`LazyCheckpoint` (``direct`` as there); PyTorch pickles: :class:`BinCheckpoint`; a PEFT
    adapter: an :class:`~mergelab.io.adapters.AdapterCheckpoint` over ``base``, the pretrained model's reader (an
    adapter is only a difference to it; the caller keeps and closes ``base``), ``pretrained`` naming that model
    for the warning when the adapter names another base.
    """
    label = name or str(path_or_id)
    model_dir = resolve_model_dir(str(path_or_id))
    kind = checkpoint_format(model_dir, label)
    if kind == "adapter":
        if base is None:
            raise ValueError(
                f"{label}: {model_dir} is a PEFT adapter, not a full model: it needs a pretrained model to apply to"
            )
        adapter = open_adapter(model_dir, label)
        try:
            return AdapterCheckpoint(base, adapter, pretrained)
        except BaseException:
            adapter.close()
            raise
    if kind == "bin":
        return BinCheckpoint(model_dir, label)
    return LazyCheckpoint(model_dir, label, direct)


def adapter_expert(
    path: str | Path,
    state: Mapping[str, Tensor],
    name: str,
    pretrained: str | None = None,
    ignore: Sequence[str] = (),
) -> AdaptedState:
    """An in-memory expert: the PEFT adapter in ``path`` applied to the pretrained ``state``
    (:func:`~mergelab.io.adapters.apply_adapter`); its file is closed afterwards. Errors name ``name``."""
    adapter = open_adapter(path, name)
    try:
        return apply_adapter(state, adapter, pretrained, ignore)
    finally:
        adapter.close()

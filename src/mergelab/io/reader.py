"""Lazy safetensors reading: :class:`LazyCheckpoint` gives name -> tensor access to a (possibly sharded) checkpoint,
hub id or dir, reading only the tensors or row blocks asked for, with positioned reads that several threads may
issue at once (from the page cache where it holds the data, else with ``O_DIRECT`` into page-aligned buffers)."""

from __future__ import annotations

import errno
import json
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from mergelab.io.files import (
    _CACHESTAT,
    ALIGN,
    DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    _pread_into,
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


class LazyCheckpoint:
    """Name -> tensor access to a (possibly sharded) safetensors checkpoint, reading only what is asked.

    Reads are positioned, so several threads may read at once. ``direct`` picks how uncached data is read
    (see :class:`_InputFile`; the default reads what the page cache holds from it and the rest with O_DIRECT).
    """

    def __init__(self, path_or_id: str | Path, name: str | None = None, direct: bool | None = None) -> None:
        self.name = name or str(path_or_id)
        self.dir = resolve_model_dir(str(path_or_id))
        self.direct = direct
        index = self.dir / INDEX_FILE
        self.entries: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...]]] = {}
        if index.is_file():
            self._read_sharded(index)
        elif (self.dir / SINGLE_FILE).is_file():
            self._read_shard(self.dir / SINGLE_FILE)
        else:
            raise FileNotFoundError(f"{self.name}: no {INDEX_FILE} or {SINGLE_FILE} in {self.dir}")
        self._files: dict[Path, _InputFile] = {}
        self._lock = threading.Lock()

    def _read_shard(self, path: Path, weight_map: dict[str, str] | None = None, index: Path | None = None) -> None:
        """Add the tensors of one safetensors file, its header checked whole (once, here).

        Within a sharded checkpoint (``index`` and its ``weight_map`` given), each of its tensors must be mapped to
        it (``path`` is the dir joined with the name the map gives) and be in no other shard.
        """
        header, data_start = read_header(path, self.name)
        for key, info in header.items():
            if weight_map is not None:
                if key in self.entries:
                    raise ValueError(f"{self.name}: tensor '{key}' is in two shards, {self.entries[key][0]} and {path}")
                if key not in weight_map or self.dir / weight_map[key] != path:
                    mapped = f"maps it to {weight_map[key]}" if key in weight_map else "does not list it"
                    raise ValueError(f"{self.name}: tensor '{key}' is in shard {path}, but {index} {mapped}")
            begin, _ = info["data_offsets"]
            self.entries[key] = (path, data_start + begin, DTYPES[info["dtype"]], tuple(info["shape"]))

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

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][3]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][2]

    def _file(self, path: Path) -> _InputFile:
        with self._lock:
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = _InputFile(path, self.direct)
            return f

    def _span(self, name: str, start: int | None, stop: int | None) -> tuple[Path, int, int, torch.dtype, tuple]:
        """File, byte offset and byte count of rows ``start:stop``, the dtype and the block's shape."""
        if name not in self.entries:
            raise KeyError(f"{self.name}: no tensor '{name}'")
        path, offset, dtype, shape = self.entries[name]
        rows = shape[0] if shape else 1
        start = 0 if start is None else start
        stop = rows if stop is None else min(stop, rows)
        row_elems = math.prod(shape[1:]) if shape else 1
        itemsize = dtype_size(dtype)
        block = (stop - start, *shape[1:]) if shape else ()
        return path, offset + start * row_elems * itemsize, (stop - start) * row_elems * itemsize, dtype, block

    def block_nbytes(self, name: str, start: int | None = None, stop: int | None = None) -> int:
        """Bytes of rows ``start:stop`` of a tensor on disk."""
        return self._span(name, start, stop)[2]

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

    def get(self, name: str) -> Tensor:
        return self.get_rows(name)

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

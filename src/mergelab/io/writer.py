"""Sharded safetensors writing: :class:`ShardedWriter` writes a checkpoint of known layout as
``model-0000i-of-0000N.safetensors`` shards plus the index, converting blocks into page-aligned staging buffers that
a background thread writes out (``O_DIRECT`` where allowed), into a temporary dir renamed into place at the end;
:func:`write_checkpoint` does the same for in-memory tensors."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import queue
import shutil
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergelab.io.atomic import make_temp_dir, named_os_error, unmark_temp_dir
from mergelab.io.files import (
    ALIGN,
    DTYPE_NAMES,
    DTYPES,
    INDEX_FILE,
    O_DIRECT,
    SIDE_FILES,
    _pread_into,
    _pwrite_all,
    aligned_empty,
    dtype_size,
    open_direct,
    round_up,
)

Layout = Sequence[tuple[str, tuple[int, ...], torch.dtype]]


class _BackgroundWriter:
    """Writes filled staging buffers in submission order on one thread, and hands the buffers back.

    An error stops all further writing and is raised by the next :meth:`check` (every call here checks); an
    ``OSError`` (a full disk, say) is re-made to name the file being written.
    """

    def __init__(self, n_buffers: int, buffer_bytes: int) -> None:
        self.buffer_bytes = buffer_bytes
        self._free: queue.Queue[Tensor] = queue.Queue()
        for _ in range(n_buffers):
            self._free.put(aligned_empty(buffer_bytes))
        self._jobs: queue.Queue[tuple | None] = queue.Queue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mergelab-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            kind, name, *args = job
            try:
                if kind == "write":
                    fd, dfd, buf, nbytes, offset = args
                    if self.error is None:
                        self._write(fd, dfd, buf[:nbytes], offset)
                else:  # "close": every earlier write to these fds is done
                    for fd in args:
                        if fd is not None:
                            os.close(fd)
            except OSError as e:  # handed to the producing thread by check(), naming the file
                if self.error is None:
                    self.error = named_os_error(e, name)
                    self.error.__cause__ = e
            except BaseException as e:
                if self.error is None:
                    self.error = e
            finally:
                if kind == "write":
                    self._free.put(args[2])

    @staticmethod
    def _write(fd: int, dfd: int | None, data: Tensor, offset: int) -> None:
        """Whole aligned blocks with O_DIRECT when possible, the rest (a shard's last bytes) through the cache."""
        aligned = data.numel() - data.numel() % ALIGN if dfd is not None and offset % ALIGN == 0 else 0
        if aligned:
            try:
                _pwrite_all(dfd, data[:aligned], offset)  # type: ignore[arg-type]
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                aligned = 0  # the filesystem refuses O_DIRECT here: write it all buffered
        if aligned < data.numel():
            _pwrite_all(fd, data[aligned:], offset + aligned)

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        if not self._thread.is_alive():
            raise RuntimeError("the background writer thread has stopped")

    def buffer(self) -> Tensor:
        """A free staging buffer (waits while all are being written)."""
        while True:
            self.check()
            try:
                return self._free.get(timeout=0.2)
            except queue.Empty:
                continue

    def give_back(self, buf: Tensor) -> None:
        """Return a staging buffer that was not submitted."""
        self._free.put(buf)

    def write(self, name: str | Path, fd: int, dfd: int | None, buf: Tensor, nbytes: int, offset: int) -> None:
        """Queue ``buf[:nbytes]`` for writing at ``offset`` of the file ``name`` (as errors name it)."""
        self.check()
        self._jobs.put(("write", name, fd, dfd, buf, nbytes, offset))

    def close_fds(self, name: str | Path, *fds: int | None) -> None:
        """Queue closing the fds of file ``name`` after the writes queued before."""
        self._jobs.put(("close", name, *fds))

    def finish(self) -> None:
        """Wait for every submitted job; raise the first error."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Drop what is not yet written and stop (after an error elsewhere)."""
        if self.error is None:
            self.error = RuntimeError("writer aborted")
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


class ShardedWriter:
    """Write a checkpoint of known layout as ``model-0000i-of-0000N.safetensors`` shards plus the index.

    The layout (every tensor's name, shape and dtype, in write order) fixes the shards and their headers
    up front, so each shard is one sequential byte stream: blocks are converted to the tensor's dtype straight
    into page-aligned staging buffers that a background thread writes (``direct``: with O_DIRECT where the
    filesystem allows; None means yes), and memory holds a few buffers whatever the model's size. Everything
    lands in a temporary dir beside ``out_dir`` that :meth:`close` renames into place; an existing ``out_dir`` is
    refused unless ``overwrite``. An error while writing is raised by the next :meth:`add_blocks` or :meth:`close`;
    an ``OSError`` (full disk, no permission, read-only filesystem) names the output file it was writing.

    The temporary dir is ``.tmp-<name>-<pid>`` with a marker file (see :func:`~mergelab.io.atomic.make_temp_dir`):
    one that a killed earlier run left for the same ``out_dir`` is removed here once its process is gone.
    Files get the user's normal mode (``0666 & ~umask``).
    """

    STAGING_BYTES = 8 << 20
    STAGING_BUFFERS = 4

    def __init__(
        self,
        out_dir: str | Path,
        layout: Layout,
        max_shard_bytes: int = 2**30,
        overwrite: bool = False,
        direct: bool | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"output dir {self.out_dir} already exists; set overwrite to replace it")
        self.overwrite = overwrite
        self.direct = direct is not False and bool(O_DIRECT)
        self._plan_shards(layout, max_shard_bytes)  # before anything is created: a bad layout leaves nothing
        self.tmp = make_temp_dir(self.out_dir)
        self._next = 0  # index into self._order of the next tensor to write
        self._shard = -1
        self._fds: tuple[int, int | None] | None = None
        try:
            self._io = _BackgroundWriter(self.STAGING_BUFFERS, self.STAGING_BYTES)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self._patches: list[tuple[str, Tensor, Tensor]] = []
        self._buf: Tensor | None = None  # staging buffer being filled
        self._fill = 0  # bytes in it
        self._pos = 0  # file offset of its first byte (a multiple of ALIGN)

    def _plan_shards(self, layout: Layout, max_shard_bytes: int) -> None:
        shards: list[dict[str, Any]] = []
        size = 0
        for name, shape, dtype in layout:
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"cannot write tensor '{name}' of dtype {dtype}")
            nbytes = math.prod(shape) * dtype_size(dtype)
            if not shards or (shards[-1] and size + nbytes > max_shard_bytes):
                shards.append({})
                size = 0
            shards[-1][name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [size, size + nbytes],
            }
            size += nbytes
        n = len(shards)
        self._files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._headers = shards
        self._order = [(i, name) for i, shard in enumerate(shards) for name in shard]
        self.total_bytes = sum(h["data_offsets"][1] - h["data_offsets"][0] for s in shards for h in s.values())

    # ---- the staging stream of the current shard

    def _reserve(self, nbytes: int) -> Tensor:
        """``nbytes`` contiguous bytes at the stream position (at most STAGING_BYTES - ALIGN)."""
        if self._buf is None or self._fill + nbytes > self._buf.numel():
            self._flush(final=False)
        assert self._buf is not None
        return self._buf[self._fill : self._fill + nbytes]

    def _flush(self, final: bool) -> None:
        """Hand the filled part of the staging buffer to the writer thread.

        Mid-shard only whole aligned blocks go (O_DIRECT needs them); the unaligned tail moves to the next buffer.
        """
        if self._buf is not None and self._fds is not None:
            fd, dfd = self._fds
            out = self._fill if final else self._fill - self._fill % ALIGN
            tail = self._buf[out : self._fill].clone()
            if out:
                self._io.write(self._final_path(self._shard), fd, dfd, self._buf, out, self._pos)
            else:
                self._io.give_back(self._buf)  # nothing to write: the buffer is free again
            self._pos += out
            self._fill = tail.numel()
            self._buf = None
            if final:
                return
            self._buf = self._io.buffer()
            if self._fill:
                self._buf[: self._fill].copy_(tail)
        elif not final:
            self._buf, self._fill = self._io.buffer(), 0

    def _put_bytes(self, data: bytes) -> None:
        src = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        step = self.STAGING_BYTES - ALIGN
        for i in range(0, src.numel(), step):
            piece = src[i : i + step]
            self._reserve(piece.numel()).copy_(piece)
            self._fill += piece.numel()

    def _header_bytes(self, i: int) -> bytes:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._headers[i]}, separators=(",", ":")).encode()
        return header + b" " * (-len(header) % 8)  # data aligned to 8 bytes, as the reference writer does

    def _final_path(self, i: int) -> Path:
        """Where shard ``i`` ends up: how errors name it (its temporary path means nothing to the user)."""
        return self.out_dir / self._files[i]

    def _open_shard(self, i: int) -> None:
        self._close_shard()
        header = self._header_bytes(i)
        path = self.tmp / self._files[i]
        cloexec = getattr(os, "O_CLOEXEC", 0)
        data_bytes = max((h["data_offsets"][1] for h in self._headers[i].values()), default=0)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | cloexec, 0o666)  # the umask applies
        except OSError as e:
            raise named_os_error(e, self._final_path(i)) from e
        try:
            os.ftruncate(fd, 8 + len(header) + data_bytes)  # sized up front: each write lands in place
        except OSError as e:
            os.close(fd)
            raise named_os_error(e, self._final_path(i)) from e
        dfd = open_direct(path, os.O_WRONLY) if self.direct else None
        self._fds = (fd, dfd)
        self._shard, self._pos, self._fill = i, 0, 0
        self._put_bytes(struct.pack("<Q", len(header)) + header)

    def _close_shard(self) -> None:
        if self._fds is not None:
            self._flush(final=True)
            self._io.close_fds(self._final_path(self._shard), *self._fds)
            self._fds = None

    # ---- public API

    def add(self, name: str, tensor: Tensor) -> None:
        """Write the next tensor of the layout."""
        self.add_blocks(name, [tensor])

    def add_blocks(self, name: str, blocks: Iterable[Tensor]) -> None:
        """Write the next tensor of the layout, given as consecutive row blocks (never all in memory).

        Each block is converted to the tensor's dtype as it is copied into the staging buffer, so it may be
        reused by the caller as soon as the next block is asked for.
        """
        if self._next >= len(self._order) or self._order[self._next][1] != name:
            expected = self._order[self._next][1] if self._next < len(self._order) else "nothing"
            raise ValueError(f"writer expected tensor '{expected}' next, got '{name}'")
        shard, _ = self._order[self._next]
        if shard != self._shard:
            self._open_shard(shard)
        info = self._headers[shard][name]
        dtype = DTYPES[info["dtype"]]
        itemsize = dtype_size(dtype)
        step = (self.STAGING_BYTES - ALIGN) // itemsize
        written = 0
        for block in blocks:
            flat = block.detach().cpu().reshape(-1)
            for i in range(0, flat.numel(), step):
                piece = flat[i : i + step]
                nbytes = piece.numel() * itemsize
                dst = self._reserve(nbytes)
                if self._fill % itemsize == 0:
                    dst.view(dtype).copy_(piece)  # the dtype conversion writes straight into staging
                else:  # an odd offset (mixed dtypes): convert, then copy bytes
                    dst.copy_(piece.to(dtype).contiguous().view(torch.uint8))
                self._fill += nbytes
                written += nbytes
        begin, end = info["data_offsets"]
        if written != end - begin:
            raise ValueError(
                f"tensor '{name}': wrote {written} bytes for shape {info['shape']} ({end - begin} expected)"
            )
        self._next += 1

    def patch(self, name: str, index: Tensor, values: Tensor) -> None:
        """Replace elements (flat ``index``) of an already written tensor with ``values``; applied by :meth:`close`."""
        if not any(n == name for _, n in self._order[: self._next]):
            raise ValueError(f"cannot patch tensor '{name}': it is not written yet")
        self._patches.append((name, index.reshape(-1).to(torch.int64), values.detach().reshape(-1).cpu()))

    def _apply_patches(self) -> None:
        """Read-modify-write each patched span once the streamed bytes are all on disk.

        With O_DIRECT where possible: the output is not in the page cache (it was written around it), and a
        buffered read-modify-write would read every patched page back through it.
        """
        shard_of = {name: i for i, name in self._order}
        by_shard: dict[int, list[tuple[str, Tensor, Tensor]]] = {}
        for patch in self._patches:
            by_shard.setdefault(shard_of[patch[0]], []).append(patch)
        buf = torch.empty(0, dtype=torch.uint8)
        for i, patches in by_shard.items():
            try:
                buf = self._patch_shard(i, patches, buf)
            except OSError as e:
                raise named_os_error(e, self._final_path(i)) from e
        self._patches = []

    def _patch_shard(self, i: int, patches: list[tuple[str, Tensor, Tensor]], buf: Tensor) -> Tensor:
        """Apply ``patches`` to shard ``i`` (see :meth:`_apply_patches`); returns the (maybe grown) buffer."""
        cloexec = getattr(os, "O_CLOEXEC", 0)
        path = self.tmp / self._files[i]
        fd = os.open(path, os.O_RDWR | cloexec)
        dfd = open_direct(path, os.O_RDWR) if self.direct else None
        try:
            size = os.fstat(fd).st_size
            for name, index, values in patches:
                if index.numel() == 0:
                    continue
                info = self._headers[i][name]
                dtype = DTYPES[info["dtype"]]
                itemsize = dtype_size(dtype)
                first, last = int(index.min()), int(index.max())
                offset = 8 + len(self._header_bytes(i)) + info["data_offsets"][0] + first * itemsize
                nbytes = (last - first + 1) * itemsize
                start, stop = offset - offset % ALIGN, round_up(offset + nbytes)
                use_fd, lead = fd, 0
                if dfd is not None and stop <= size and (offset - start) % itemsize == 0:
                    use_fd, lead = dfd, offset - start
                else:
                    start, stop = offset, offset + nbytes
                if buf.numel() < stop - start:
                    buf = aligned_empty(stop - start)
                span = buf[: stop - start]
                if _pread_into(use_fd, span, start) != span.numel():
                    raise ValueError(f"tensor '{name}': patch beyond the end of {self._files[i]}")
                span[lead : lead + nbytes].view(dtype)[index - first] = values.to(dtype)
                _pwrite_all(use_fd, span, start)
        finally:
            for f in (fd, dfd):
                if f is not None:
                    os.close(f)
        return buf

    def copy_side_files(self, src_dir: Path, names: tuple[str, ...] = SIDE_FILES) -> None:
        """Copy config and tokenizer files from ``src_dir``.

        Contents only (``copyfile``, not ``copy2``): the copies get the user's normal mode, not the source's (a
        read-only source, as in some caches, would make the result read-only and :meth:`update_config` fail).
        """
        for name in names:
            if (src_dir / name).is_file():
                try:
                    shutil.copyfile(src_dir / name, self.tmp / name)
                except OSError as e:
                    raise named_os_error(e, self.out_dir / name, f"copying {src_dir / name} to") from e

    def update_config(self, changes: Mapping[str, Any]) -> None:
        """Edit the copied config.json (e.g. a new vocabulary size)."""
        path = self.tmp / "config.json"
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg.update(changes)
            self._write_text(path, json.dumps(cfg, indent=2))

    def _write_text(self, path: Path, text: str) -> None:
        """Write a small file of the temporary dir, an error naming its final path."""
        try:
            path.write_text(text)
        except OSError as e:
            raise named_os_error(e, self.out_dir / path.name) from e

    def close(self) -> Path:
        """Check every tensor was written, wait for the writes, write the index and move the dir into place.

        Any error leaves nothing: the temporary dir is removed (as by :meth:`abort`) and ``out_dir`` untouched.
        """
        if self._next != len(self._order):
            raise ValueError(f"writer closed before tensor '{self._order[self._next][1]}' was written")
        try:
            self._close_shard()
            self._io.finish()
            self._apply_patches()
            weight_map = {name: self._files[i] for i, name in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            self._write_text(self.tmp / INDEX_FILE, json.dumps(index, indent=2))
            if self.out_dir.exists():
                if not self.overwrite:
                    raise FileExistsError(
                        f"output dir {self.out_dir} appeared while merging; set overwrite to replace it"
                    )
                shutil.rmtree(self.out_dir)
            unmark_temp_dir(self.tmp)
            try:
                self.tmp.rename(self.out_dir)
            except OSError as e:
                raise named_os_error(e, self.out_dir, "moving the finished checkpoint into place at") from e
        except BaseException:
            self.abort()
            raise
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far."""
        self._io.stop()
        if self._fds is not None:
            for fd in self._fds:
                if fd is not None:
                    with contextlib.suppress(OSError):  # the error being handled is the one to report
                        os.close(fd)
            self._fds = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_checkpoint(
    tensors: Mapping[str, torch.Tensor], out_dir: str | Path, max_shard_bytes: int = 2**30, overwrite: bool = False
) -> Path:
    """Write in-memory tensors as a sharded safetensors checkpoint."""
    layout = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedWriter(out_dir, layout, max_shard_bytes, overwrite)
    try:
        for k, v in tensors.items():
            writer.add(k, v)
        return writer.close()
    except BaseException:
        writer.abort()
        raise

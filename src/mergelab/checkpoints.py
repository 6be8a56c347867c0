"""Tensor-at-a-time safetensors reading and sharded writing, in memory bounded by a few tensors.

Reading uses plain positioned reads rather than memory maps, so only the tensors (or row blocks) asked for
are resident; writing streams each tensor's bytes straight to disk and adds the header when a shard closes.
The files are the standard safetensors format (an 8-byte header length, a JSON header, the raw data).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

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


def resolve_model_dir(path_or_id: str) -> Path:
    """A local dir as is; a hub id downloaded (safetensors, configs and tokenizer only) into the HF cache."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") > 1:
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


class LazyCheckpoint:
    """Name -> tensor access to a (possibly sharded) safetensors checkpoint, reading only what is asked."""

    def __init__(self, path_or_id: str | Path, name: str | None = None) -> None:
        self.name = name or str(path_or_id)
        self.dir = resolve_model_dir(str(path_or_id))
        index = self.dir / INDEX_FILE
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.dir / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise FileNotFoundError(f"{self.name}: no {INDEX_FILE} or {SINGLE_FILE} in {self.dir}")
        self.entries: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...]]] = {}
        for fname in files:
            path = self.dir / fname
            if not path.is_file():
                raise FileNotFoundError(f"{self.name}: shard {path} listed in {INDEX_FILE} is missing")
            header, data_start = read_header(path)
            for key, info in header.items():
                if info["dtype"] not in DTYPES:
                    raise ValueError(f"{self.name}: tensor '{key}' has unsupported dtype {info['dtype']}")
                begin, _ = info["data_offsets"]
                self.entries[key] = (path, data_start + begin, DTYPES[info["dtype"]], tuple(info["shape"]))
        self._files: dict[Path, BinaryIO] = {}

    def keys(self) -> list[str]:
        """Tensor names."""
        return list(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][3]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][2]

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (the whole tensor when both are None), read from disk."""
        if name not in self.entries:
            raise KeyError(f"{self.name}: no tensor '{name}'")
        path, offset, dtype, shape = self.entries[name]
        rows = shape[0] if shape else 1
        start = 0 if start is None else start
        stop = rows if stop is None else min(stop, rows)
        row_elems = math.prod(shape[1:]) if shape else 1
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = (stop - start) * row_elems * itemsize
        buf = torch.empty(nbytes, dtype=torch.uint8)
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")  # noqa: SIM115 - kept open for later reads, closed in close()
        f.seek(offset + start * row_elems * itemsize)
        if nbytes and f.readinto(buf.numpy()) != nbytes:
            raise ValueError(f"{self.name}: tensor '{name}' is truncated in {path}")
        out = buf.view(dtype)
        return out.reshape((stop - start, *shape[1:]) if shape else ())

    def get(self, name: str) -> torch.Tensor:
        return self.get_rows(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def config(self) -> dict[str, Any]:
        """The HF config.json as a dict ({} when absent)."""
        cfg = self.dir / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else {}


class ShardedWriter:
    """Write tensors to ``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_bytes`` plus the index.

    Tensor bytes go straight to a data file; when a shard is full its header is written and the data appended,
    so memory holds one tensor at a time. Everything lands in a temporary dir beside ``out_dir`` that
    :meth:`close` renames into place; an existing ``out_dir`` is refused unless ``overwrite``.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2**30, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"output dir {self.out_dir} already exists; set overwrite to replace it")
        self.overwrite = overwrite
        self.tmp = self.out_dir.parent / f".tmp-{self.out_dir.name}-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.max_shard_bytes = max_shard_bytes
        self._header: dict[str, Any] = {}
        self._data: BinaryIO | None = None
        self._size = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (a full shard is closed first)."""
        self.add_blocks(name, tuple(tensor.shape), tensor.dtype, [tensor])

    def add_blocks(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, blocks: Iterable[torch.Tensor]) -> None:
        """Append one tensor given as consecutive row blocks, written as they come (never all in memory)."""
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"cannot write tensor '{name}' of dtype {dtype}")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self._header and self._size + nbytes > self.max_shard_bytes:
            self._finish_shard()
        if self._data is None:
            self._data = open(self.tmp / "pending.data", "wb")  # noqa: SIM115 - closed in _finish_shard
        self._header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [self._size, 0]}
        written = 0
        for block in blocks:
            t = block.detach().to(dtype).contiguous().cpu().reshape(-1)
            self._data.write(t.view(torch.uint8).numpy())
            written += t.numel() * t.element_size()
        if written != nbytes:
            raise ValueError(f"tensor '{name}': wrote {written} bytes for shape {shape} ({nbytes} expected)")
        self._size += nbytes
        self._header[name]["data_offsets"][1] = self._size
        self.total_bytes += nbytes

    def _finish_shard(self) -> None:
        assert self._data is not None
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # data aligned to 8 bytes, as the reference writer does
        path = self.tmp / f"shard-{len(self._shards):05d}.safetensors"
        with open(path, "wb") as out, open(self.tmp / "pending.data", "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 16 << 20)
        (self.tmp / "pending.data").unlink()
        self._shards.append(list(self._header))
        self._header, self._data, self._size = {}, None, 0

    def copy_side_files(self, src_dir: Path, names: tuple[str, ...] = SIDE_FILES) -> None:
        """Copy config and tokenizer files from ``src_dir``."""
        for name in names:
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, self.tmp / name)

    def update_config(self, changes: Mapping[str, Any]) -> None:
        """Edit the copied config.json (e.g. a new vocabulary size)."""
        path = self.tmp / "config.json"
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg.update(changes)
            path.write_text(json.dumps(cfg, indent=2))

    def close(self) -> Path:
        """Name the shards, write the index and move the finished dir into place."""
        if self._header or not self._shards:
            if self._data is None:
                self._data = open(self.tmp / "pending.data", "wb")  # noqa: SIM115
            self._finish_shard()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.tmp / f"shard-{i:05d}.safetensors").rename(self.tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if self.out_dir.exists():
            if not self.overwrite:
                raise FileExistsError(f"output dir {self.out_dir} appeared while merging; result left in {self.tmp}")
            shutil.rmtree(self.out_dir)
        self.tmp.rename(self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._data is not None:
            self._data.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

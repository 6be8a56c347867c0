"""Strict checkpoint handling: malformed safetensors headers and indexes are refused (as the safetensors library
refuses them), checkpoint pools refuse experts of another architecture, abandoned temporaries of killed runs are
removed (and live ones kept), results get the user's file mode, and write errors name the path and leave nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab.io.atomic import (
    HOST_TAG,
    TMP_MARKER,
    atomic_dir,
    atomic_save_figure,
    atomic_write_json,
    atomic_write_text,
)
from mergelab.io.files import INDEX_FILE
from mergelab.io.reader import LazyCheckpoint
from mergelab.io.writer import ShardedWriter, write_checkpoint
from mergelab.methods import TaskArithmetic
from mergelab.pools.checkpoint import CheckpointPool
from mergelab.training.experts import RECORD, cached_build, spec_key

# ----------------------------------------------------------------------------------- crafted safetensors files


def craft(path: Path, header: Any, data: bytes = b"", raw: bytes | None = None, length: int | None = None) -> Path:
    """A safetensors-like file: 8-byte length, ``header`` as JSON (or ``raw`` bytes), then ``data``."""
    blob = raw if raw is not None else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if length == -1:  # not even the length field
        path.write_bytes(b"\x05\x00\x00")
    else:
        path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def f32(n: int, begin: int) -> dict[str, Any]:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}


D16 = bytes(range(16))
OK = {"a": f32(2, 0), "b": f32(2, 8)}

# name -> (header, data, raw header bytes, length field, the message, whether safetensors refuses it too)
BAD_FILES: dict[str, tuple[Any, bytes, bytes | None, int | None, str, bool]] = {
    "shorter than the length field": (None, b"", b"", -1, "3 bytes, too short for the header length", True),
    "empty header": (None, b"", b"", None, "not valid JSON", True),
    "header length past the file": ({}, b"", None, 50, "header length 50 runs past", True),
    "header length absurd": ({}, b"", None, 2**40, "header length 1099511627776", True),
    "header not UTF-8": (None, b"", b'{"\xff": 1}', None, "not valid UTF-8", True),
    "header not JSON": (None, b"", b'{"a": ', None, "not valid JSON", True),
    "header an array": ([], b"", None, None, "is an array, not a JSON object", True),
    "metadata not strings": ({"__metadata__": {"format": 1}, **OK}, D16, None, None, "__metadata__ 'format'", True),
    "metadata a list": ({"__metadata__": ["pt"], **OK}, D16, None, None, "__metadata__ is an array", True),
    "entry not an object": ({"a": [1, 2]}, b"", None, None, "tensor 'a' in .*: an array, not an object", True),
    "no dtype": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, D16[:8], None, None, "tensor 'a' .*no dtype", True),
    "unknown dtype": ({"a": {**f32(2, 0), "dtype": "X32"}}, D16[:8], None, None, "unknown dtype 'X32'", True),
    "negative dim": ({"a": {**f32(2, 0), "shape": [-2]}}, D16[:8], None, None, r"shape \[-2\] is not", True),
    "float dim": ({"a": {**f32(2, 0), "shape": [2.0]}}, D16[:8], None, None, r"shape \[2.0\] is not", True),
    "bool dim": ({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"x", None, None, "shape", True),
    "three offsets": ({"a": {**f32(2, 0), "data_offsets": [0, 8, 8]}}, D16[:8], None, None, "data_offsets", True),
    "offsets reversed": ({"a": {**f32(0, 0), "data_offsets": [8, 0]}}, D16[:8], None, None, "end before", True),
    "span not shape x itemsize": ({"a": {**f32(3, 0), "data_offsets": [0, 8]}}, D16[:8], None, None, "needs 12", True),
    "overlap": ({"a": f32(2, 0), "b": f32(2, 4)}, D16[:12], None, None, "tensor 'b' .*overlap tensor 'a'", True),
    "gap": ({"a": f32(1, 0), "b": f32(2, 8)}, D16, None, None, "tensor 'b' .*gap of 4 bytes after tensor 'a'", True),
    "not from 0": ({"a": f32(2, 8)}, D16, None, None, "gap of 8 bytes after the start of the data", True),
    "past the file": ({"a": f32(4, 0)}, D16[:8], None, None, "tensor 'a' is truncated in", True),
    "bytes after the data": ({"a": f32(2, 0)}, D16, None, None, "8 bytes after the last tensor", True),
    "one name twice": (None, D16, json.dumps(OK).replace('"b"', '"a"').encode(), None, "'a' appears twice", True),
    # A dtype of the format that mergelab does not merge: the library reads it, mergelab refuses it by name.
    "unsupported dtype": ({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"xy", None, None,
                          "unsupported dtype F8_E4M3", False),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_safetensors_are_refused_naming_model_file_and_tensor(case: str, tmp_path: Path) -> None:
    header, data, raw, length, match, library_refuses = BAD_FILES[case]
    path = craft(tmp_path / "bad" / "model.safetensors", header, data, raw, length)
    with pytest.raises(ValueError, match=match) as err:
        LazyCheckpoint(tmp_path / "bad", name="expert_x")
    msg = str(err.value)
    assert msg.startswith("expert_x: ") and str(path) in msg and "\n" not in msg
    if library_refuses:  # the same files the reference implementation refuses
        with pytest.raises(Exception, match=r"(?i)header|metadata|offset|shape"):
            load_file(path)


def test_unusual_but_valid_files_read_as_the_library_reads_them(tmp_path: Path) -> None:
    """Entries out of offset order, zero-size tensors sharing an offset, a space-padded header, metadata."""
    header = {
        "__metadata__": {"format": "pt"},
        "late": {"dtype": "I16", "shape": [2, 2], "data_offsets": [8, 16]},
        "empty0": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
        "early": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "empty1": {"dtype": "BF16", "shape": [0], "data_offsets": [16, 16]},
    }
    raw = json.dumps(header).encode() + b"      "
    path = craft(tmp_path / "ok" / "model.safetensors", None, bytes(range(16)), raw)
    want = load_file(path)
    ck = LazyCheckpoint(tmp_path / "ok")
    assert sorted(ck.keys()) == sorted(want)
    for k, v in want.items():
        assert ck[k].dtype == v.dtype and torch.equal(ck[k], v), k
    ck.close()


def test_headers_are_checked_once_per_file_not_per_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.io import reader

    root = sharded(tmp_path / "ck")
    calls: list[Path] = []
    real = reader.read_header
    monkeypatch.setattr(reader, "read_header", lambda path, name=None: calls.append(path) or real(path, name))
    ck = LazyCheckpoint(root)
    for _ in range(3):
        for k in ck:
            ck.get_rows(k, 0, 1)
    assert sorted(p.name for p in calls) == ["s1.safetensors", "s2.safetensors"]
    ck.close()


# ------------------------------------------------------------------------------------------- sharded indexes


def sharded(root: Path) -> Path:
    """A valid two-shard checkpoint of tensors a, b (shard 1) and c (shard 2)."""
    root.mkdir(parents=True)
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, root / "s1.safetensors")
    save_file({"c": torch.arange(4.0)}, root / "s2.safetensors")
    index = {"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}}
    (root / INDEX_FILE).write_text(json.dumps(index))
    return root


def edit_index(root: Path, edit: Any) -> None:
    index = json.loads((root / INDEX_FILE).read_text())
    edit(index["weight_map"])
    (root / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("invalid JSON", ValueError, r"model.safetensors.index.json is not valid JSON"),
        ("no weight_map", ValueError, r"model.safetensors.index.json has no 'weight_map'"),
        ("missing shard", FileNotFoundError, r"shard .*s3.safetensors listed in .*index.json .*'c'.* is missing"),
        ("tensor not in its shard", ValueError, r"maps tensor 'zz' to .*s2.safetensors, which does not hold it"),
        ("tensor mapped elsewhere", ValueError, r"tensor 'b' is in shard .*s1.safetensors, but .* maps it to s2"),
        ("tensor not listed", ValueError, r"tensor 'b' is in shard .*s1.safetensors, but .* does not list it"),
        ("shard outside the dir", ValueError, r"maps tensor 'c' to '../s2.safetensors', not a file in"),
    ],
)
def test_inconsistent_index_is_refused_naming_the_file(
    case: str, error: type[Exception], match: str, tmp_path: Path
) -> None:
    root = sharded(tmp_path / "ck")
    assert LazyCheckpoint(root).keys()  # valid before the edit
    if case == "invalid JSON":
        (root / INDEX_FILE).write_text('{"weight_map": {"a": "s1.safetensors",')
    elif case == "no weight_map":
        (root / INDEX_FILE).write_text('{"metadata": {}}')
    elif case == "missing shard":
        edit_index(root, lambda m: m.update(c="s3.safetensors"))
    elif case == "tensor not in its shard":
        edit_index(root, lambda m: m.update(zz="s2.safetensors"))
    elif case == "tensor mapped elsewhere":
        edit_index(root, lambda m: m.update(b="s2.safetensors"))
    elif case == "tensor not listed":
        edit_index(root, lambda m: m.pop("b"))
    elif case == "shard outside the dir":
        edit_index(root, lambda m: m.update(c="../s2.safetensors"))
    with pytest.raises(error, match=match) as err:
        LazyCheckpoint(root, name="expert_y")
    assert str(err.value).startswith("expert_y: ") and str(root) in str(err.value)


def test_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    root = sharded(tmp_path / "ck")
    save_file({"c": torch.arange(4.0), "a": torch.ones(2)}, root / "s2.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'a' is in two shards, .*s1.safetensors and .*s2.safetensors"):
        LazyCheckpoint(root, name="e")


def test_corrupt_shard_in_a_sharded_checkpoint_names_the_shard(tmp_path: Path) -> None:
    root = sharded(tmp_path / "ck")
    shard = root / "s2.safetensors"
    shard.write_bytes(shard.read_bytes() + b"junk")  # bytes the header does not cover
    with pytest.raises(ValueError, match=rf"^e: {shard}: 4 bytes after the last tensor"):
        LazyCheckpoint(root, name="e")


# ------------------------------------------------------------------------------------- checkpoint pools


def model_dir(
    path: Path,
    model_type: str | None = "llama",
    arch: str | None = "LlamaForCausalLM",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    config: bool = True,
) -> str:
    """A tiny "model dir": config.json (model_type, architectures) and two tensors."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file(
        {"w": torch.randn(3, 4, generator=g).to(dtype), "steps": torch.tensor([seed], dtype=torch.int64)},
        path / "model.safetensors",
    )
    if config:
        cfg: dict[str, Any] = {"hidden_size": 4}
        if model_type is not None:
            cfg["model_type"] = model_type
        if arch is not None:
            cfg["architectures"] = [arch]
        (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def assert_pool_refused(
    tmp_path: Path, experts: dict[str, str], error: type[Exception], match: str, base: str | None = None
) -> None:
    """Refused by setup and, for a pool used without setup, by write_merged; nothing written."""
    if base is None:
        base = str(tmp_path / "base")
        if not Path(base).exists():
            model_dir(Path(base))
    with pytest.raises(error, match=match):
        CheckpointPool(base, experts).setup(None, {})
    out = tmp_path / "out" / "merged_model"
    with pytest.raises(error, match=match):
        CheckpointPool(base, experts).write_merged(TaskArithmetic(0.5), out)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"model_type": "mistral", "arch": "MistralForCausalLM"},
            r"expert 'mis' \(.*/mis\): architecture \(model_type\) 'mistral' differs from the pretrained model's "
            r"'llama' \(.*/base\)",
        ),
        (
            {"arch": "LlamaForSequenceClassification"},
            r"expert 'mis' .*\(architectures\) \['LlamaForSequenceClassification'\] differs .*\['LlamaForCausalLM'\]",
        ),
        ({"model_type": None}, r"expert 'mis' .*\(model_type\) None differs from the pretrained model's 'llama'"),
    ],
)
def test_expert_of_another_architecture_is_refused(kwargs: dict[str, Any], match: str, tmp_path: Path) -> None:
    experts = {"ok": model_dir(tmp_path / "ok", seed=1), "mis": model_dir(tmp_path / "mis", seed=2, **kwargs)}
    assert_pool_refused(tmp_path, experts, ValueError, match)


def test_configs_that_are_missing_or_unreadable_are_refused(tmp_path: Path) -> None:
    good = {"ok": model_dir(tmp_path / "ok", seed=1)}
    no_cfg = model_dir(tmp_path / "bare_base", config=False)
    assert_pool_refused(
        tmp_path, good, FileNotFoundError, r"pretrained model dir '.*bare_base' has no config.json", no_cfg
    )
    bare = {**good, "bare": model_dir(tmp_path / "bare", seed=2, config=False)}
    assert_pool_refused(tmp_path, bare, FileNotFoundError, r"expert 'bare' \(.*/bare\) has no config.json")
    broken = model_dir(tmp_path / "broken", seed=3)
    (Path(broken) / "config.json").write_text("{'model_type': llama")
    assert_pool_refused(tmp_path, {**good, "b": broken}, ValueError, r"expert 'b' .*/broken/config.json is not valid")


def test_shared_tensor_of_another_shape_or_dtype_kind_names_expert_and_tensor(tmp_path: Path) -> None:
    base = model_dir(tmp_path / "base")
    wide = model_dir(tmp_path / "wide", seed=1)
    save_file({"w": torch.zeros(3, 5), "steps": torch.tensor([1])}, Path(wide) / "model.safetensors")
    assert_pool_refused(
        tmp_path, {"wide": wide}, ValueError, r"expert 'wide' \(.*wide\): tensor 'w' has shape \(3, 5\)", base
    )
    quant = model_dir(tmp_path / "quant", seed=2)
    save_file({"w": torch.zeros(3, 4, dtype=torch.int8), "steps": torch.tensor([2])}, Path(quant) / "model.safetensors")
    match = r"expert 'quant' \(.*/quant\): tensor 'w' has dtype I8, the pretrained model's has F32"
    assert_pool_refused(tmp_path, {"quant": quant}, ValueError, match, base)


def test_float_widths_may_differ_and_the_result_is_the_pretrained_dtype(tmp_path: Path) -> None:
    base = model_dir(tmp_path / "base", dtype=torch.bfloat16)
    experts = {"e0": model_dir(tmp_path / "e0", seed=1), "e1": model_dir(tmp_path / "e1", seed=2, dtype=torch.float16)}
    pool = CheckpointPool(base, experts)
    pool.setup(None, {})
    out = pool.write_merged(TaskArithmetic(0.5), tmp_path / "merged")
    got = LazyCheckpoint(out)
    b, e0, e1 = (load_file(Path(p) / "model.safetensors")["w"].float() for p in (base, *experts.values()))
    assert got.dtype("w") == torch.bfloat16
    torch.testing.assert_close(got["w"].float(), (b + 0.5 * (e0 - b + e1 - b)).bfloat16().float())
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


# ------------------------------------------------------------------------------------ abandoned temporaries


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of another process that is alive for the whole test."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc.pid
    proc.stdin.close()  # type: ignore[union-attr]
    proc.wait()


def temp_dir(parent: Path, name: str, pid: int, marker: str | None = "same host", files: tuple[str, ...] = ()) -> Path:
    """A temporary dir as a run of process ``pid`` writing ``parent/name`` leaves it (marker as mergelab writes)."""
    d = parent / f".tmp-{name}-{pid}"
    d.mkdir(parents=True)
    if marker is not None:
        host = socket.gethostname() if marker == "same host" else "some-other-host"
        (d / TMP_MARKER).write_text(json.dumps({"pid": pid, "host": host}))
    for f in files:
        (d / f).write_bytes(b"partial")
    return d


def test_stale_temporaries_are_removed_and_live_or_foreign_ones_kept(
    tmp_path: Path, dead_pid: int, live_pid: int
) -> None:
    shard = ("model-00001-of-00002.safetensors",)
    stale = temp_dir(tmp_path, "merged_model", dead_pid, files=shard)
    live = temp_dir(tmp_path / "b", "merged_model", live_pid, files=shard)
    other_host = temp_dir(tmp_path / "c", "merged_model", dead_pid, marker="other host", files=shard)
    legacy = temp_dir(tmp_path / "d", "merged_model", dead_pid, marker=None, files=(*shard, "config.json"))
    unrelated = temp_dir(tmp_path / "e", "merged_model", dead_pid, marker=None, files=("notes.md",))
    other_name = temp_dir(tmp_path, "merged_model2", dead_pid, files=shard)
    (tmp_path / ".tmp-merged_model-x").mkdir()  # not a pid: not a temporary of mergelab's
    write_checkpoint({"w": torch.ones(3)}, tmp_path / "merged_model")
    for parent in (tmp_path / "b", tmp_path / "c", tmp_path / "d", tmp_path / "e"):
        write_checkpoint({"w": torch.ones(3)}, parent / "merged_model")
    assert not stale.exists() and not legacy.exists()  # dead process, mergelab's (marker / model files only)
    assert live.is_dir() and (live / shard[0]).is_file()  # a live process's: never touched
    assert other_host.is_dir()  # another machine's pid: cannot be checked from here
    assert unrelated.is_dir() and (unrelated / "notes.md").is_file()  # no marker, not a model dir's files
    assert other_name.is_dir()  # another output's temporary
    assert (tmp_path / ".tmp-merged_model-x").is_dir()
    assert not (tmp_path / "merged_model" / TMP_MARKER).exists()  # the marker is no part of the result


def test_killed_merge_leaves_a_temporary_the_next_write_removes(tmp_path: Path, live_pid: int) -> None:
    """``kill -9`` mid-write (the process kills itself after a first tensor: no timing involved)."""
    out = tmp_path / "merged_model"
    script = (
        "import os, signal, torch\n"
        "from mergelab.io.writer import ShardedWriter\n"
        f"w = ShardedWriter({str(out)!r}, [('a', (64,), torch.float32), ('b', (64,), torch.float32)], 256)\n"
        "w.add('a', torch.ones(64))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -9, stderr.decode()[-2000:]
    left = tmp_path / f".tmp-merged_model-{proc.pid}"
    assert left.is_dir() and (left / TMP_MARKER).is_file() and not out.exists()
    live = temp_dir(tmp_path, "merged_model", live_pid)
    write_checkpoint({"a": torch.ones(64), "b": torch.zeros(64)}, out, max_shard_bytes=256)
    assert not left.exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name])


def test_other_writers_clean_their_own_stale_temporaries(tmp_path: Path, dead_pid: int, live_pid: int) -> None:
    def build(tmp: Path) -> dict[str, int]:
        (tmp / "w.bin").write_text("w")
        return {"n": 1}

    # Expert builds.
    final_name = f"expert-{spec_key({'a': 1})}"
    stale, live = temp_dir(tmp_path, final_name, dead_pid), temp_dir(tmp_path, final_name, live_pid)
    final = cached_build(tmp_path, "expert", {"a": 1}, build)
    assert final.name == final_name and (final / RECORD).is_file() and not (final / TMP_MARKER).exists()
    assert not stale.exists() and live.is_dir()
    # Dirs written through atomic_dir (the in-memory pools' merged models).
    stale, live = temp_dir(tmp_path, "m", dead_pid), temp_dir(tmp_path, "m", live_pid)
    with atomic_dir(tmp_path / "m") as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json"]
    assert not stale.exists() and live.is_dir()
    # Single files written atomically: a killed writer's temporary file (not another machine's, not a live one's).
    stale_file = tmp_path / f".metrics.tmp-{dead_pid}-{HOST_TAG}-0123abcd.json"
    live_file = tmp_path / f".metrics.tmp-{live_pid}-{HOST_TAG}-0123abcd.json"
    other_host = tmp_path / f".metrics.tmp-{dead_pid}-{'0' * 8 if HOST_TAG != '0' * 8 else '1' * 8}-0123abcd.json"
    for f in (stale_file, live_file, other_host):
        f.write_text("{")
    atomic_write_json(tmp_path / "metrics.json", {"x": 1})
    assert not stale_file.exists() and live_file.is_file() and other_host.is_file()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"x": 1}


# ----------------------------------------------------------------------------------------------- file modes


@pytest.fixture
def umask() -> Iterator[Any]:
    """Set a umask for the test (restored afterwards)."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize(("mask", "want"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_results_get_the_users_file_mode(mask: int, want: int, umask: Any, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    umask(mask)
    atomic_write_text(tmp_path / "results.md", "| a |\n")
    atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    fig = plt.figure()
    atomic_save_figure(fig, tmp_path / "plot.png")
    plt.close(fig)
    src = Path(model_dir(tmp_path / "src"))
    (src / "config.json").chmod(0o400)  # a read-only source: the copy gets the user's mode, not the source's
    writer = ShardedWriter(tmp_path / "ck", [("w", (3,), torch.float32), ("v", (2,), torch.float16)], 12)
    writer.add("w", torch.ones(3))
    writer.add("v", torch.ones(2))
    writer.copy_side_files(src)
    writer.update_config({"vocab_size": 3})
    writer.close()
    files = [tmp_path / n for n in ("results.md", "metrics.json", "plot.png")]
    files += sorted((tmp_path / "ck").iterdir())
    assert len(files) == 3 + 4  # two shards, the index, config.json
    assert {f.name: oct(mode(f)) for f in files} == {f.name: oct(want) for f in files}
    assert oct(mode(tmp_path / "ck")) == oct(0o777 & ~mask)


# --------------------------------------------------------------------------------------------- write errors


def raise_errno(code: int) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    return fail


def assert_named(err: pytest.ExceptionInfo[OSError], code: int, path: Path) -> None:
    assert err.value.errno == code
    assert str(path) in str(err.value) and os.strerror(code) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_atomic_file_write_errors_name_the_path_and_leave_nothing(
    code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "metrics.json"
    target.write_text('{"old": 1}')
    for fn in ("write", "replace", "open"):  # writing the data, renaming into place, creating the temporary
        with monkeypatch.context() as m:
            m.setattr(os, fn, raise_errno(code))
            with pytest.raises(OSError) as err:
                atomic_write_json(target, {"new": 2})
        assert_named(err, code, target)
        assert json.loads(target.read_text()) == {"old": 1}  # the previous result is intact
        assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary left
    with monkeypatch.context() as m:
        m.setattr(os, "write", raise_errno(code))
        with pytest.raises(OSError) as err:
            atomic_write_text(tmp_path / "new.md", "text")
    assert_named(err, code, tmp_path / "new.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize(
    ("fn", "code"), [("pwritev", errno.ENOSPC), ("pwritev", errno.EIO), ("ftruncate", errno.EFBIG)]
)
def test_checkpoint_write_errors_name_the_file_and_leave_nothing(
    fn: str, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "merged_model"
    tensors = {"a": torch.ones(64), "b": torch.zeros(64)}
    monkeypatch.setattr(os, fn, raise_errno(code))  # the background writer thread's writes too
    with pytest.raises(OSError) as err:
        write_checkpoint(tensors, out, max_shard_bytes=256)
    assert_named(err, code, out / "model-00001-of-00002.safetensors")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary
    monkeypatch.undo()
    write_checkpoint(tensors, out, max_shard_bytes=256)  # and nothing blocks the next try
    assert torch.equal(LazyCheckpoint(out)["a"], tensors["a"])


def test_unwritable_output_dir_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ro" / "merged_model"
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if self.name.startswith(".tmp-"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(OSError) as err:
        write_checkpoint({"a": torch.ones(2)}, out)
    assert_named(err, errno.EROFS, out)
    assert not out.exists()


def test_failed_side_file_copy_and_index_write_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = Path(model_dir(tmp_path / "src"))
    out = tmp_path / "out" / "merged_model"
    for target in ("copy", "index"):
        writer = ShardedWriter(out, [("w", (3,), torch.float32)])
        writer.add("w", torch.ones(3))
        with monkeypatch.context() as m:
            if target == "copy":
                m.setattr(shutil, "copyfile", raise_errno(errno.ENOSPC))
                with pytest.raises(OSError) as err:
                    writer.copy_side_files(src)
                writer.abort()
                assert_named(err, errno.ENOSPC, out / "config.json")
            else:
                m.setattr(Path, "write_text", raise_errno(errno.ENOSPC))
                with pytest.raises(OSError) as err:
                    writer.close()
                assert_named(err, errno.ENOSPC, out / INDEX_FILE)
        assert list((tmp_path / "out").iterdir()) == []

"""Writing results: atomically, and never over an existing result unless asked.

Every file is written under a temporary name beside its final path and renamed into place, and every dir is
built as ``.tmp-<name>-<pid>`` beside it and renamed when complete, so a final path is never half-written. Files
get the user's normal mode (``0666 & ~umask``, as any newly created file), not ``tempfile.mkstemp``'s 0600.
A process killed mid-write (``kill -9``) leaves its temporary behind; the next write to the same final path removes
the temporaries it can prove are abandoned: those named after that path whose process is gone (see
:func:`remove_stale_temporaries`). A failed write raises an ``OSError`` (of the subclass of its errno) naming the
final path, and leaves neither the temporary nor a partial final file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

RESULT_FILES = ("metrics.json", "results.md", "results.csv", "config.yaml", "merged_model")


#: Written inside every temporary dir when it is created (pid and host of its writer), removed just before the
#: dir is renamed into place: it tells a later run that the dir is one of mergelab's, and whose.
TMP_MARKER = ".mergelab-tmp"


# A temporary dir made before markers existed is recognised by its content instead: only files of the kinds
# mergelab puts in a model dir (weights, JSON configs and records, tokenizer files, partial atomic files).
_MODEL_DIR_FILE = re.compile(r".*\.(safetensors|json|txt|model|jinja|bin)|\..*\.tmp-\d+-[0-9a-f-]+.*")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (True when that cannot be told: never delete on a guess)."""
    if not 0 < pid < 2**31:  # 0 and negatives address process groups in kill(2); larger ones are no pid
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def named_os_error(e: OSError, path: str | Path, action: str = "writing") -> OSError:
    """``e`` re-made to name ``path``: same errno (so the same subclass, e.g. PermissionError), one line.

    ``str`` of the result reads ``[Errno 28] No space left on device (writing): '/out/metrics.json'``.
    """
    if e.errno is None:  # not from the OS (no errno to keep): the message is all there is
        return OSError(f"{action} {path}: {e}")
    strerror = e.strerror or os.strerror(e.errno)
    return OSError(e.errno, f"{strerror} ({action})", str(path))


#: This machine, in temporary file names: on a shared filesystem another machine's pid means nothing here.
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_file_pattern(path: Path) -> re.Pattern[str]:
    """Names of :func:`_create_temp_file`'s temporaries for ``path``: groups are the writer's pid and host tag."""
    return re.compile(rf"\.{re.escape(path.stem)}\.tmp-(\d+)-([0-9a-f]{{8}})-[0-9a-f]{{8}}{re.escape(path.suffix)}")


def _create_temp_file(path: Path) -> tuple[int, Path]:
    """A new, exclusively created file beside ``path`` (same suffix, so tools that infer the format from it work).

    Created by ``os.open`` with mode 0o666, so the kernel applies the umask as for any new file (``mkstemp``
    makes 0600, which the rename would carry to the result).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}-{HOST_TAG}-{secrets.token_hex(4)}{path.suffix}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}: every name tried exists")


def _stale_dir(tmp: Path, pid: int) -> bool:
    """Whether the temporary dir ``tmp`` of process ``pid`` is abandoned and mergelab's own."""
    if tmp.is_symlink() or not tmp.is_dir() or pid == os.getpid() or pid_alive(pid):
        return False
    try:
        marker = json.loads((tmp / TMP_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict):
        # A dir on a shared filesystem may be another machine's, where this pid means another process.
        return marker.get("pid") == pid and marker.get("host") == socket.gethostname()
    try:  # no marker: an older mergelab's temporary only if it holds nothing but model-dir files
        return all(p.is_file() and not p.is_symlink() and _MODEL_DIR_FILE.fullmatch(p.name) for p in tmp.iterdir())
    except OSError:
        return False


def remove_stale_temporaries(final: str | Path) -> list[Path]:
    """Remove the temporaries of ``final`` that earlier, now dead, processes left (e.g. killed with ``kill -9``).

    Only entries beside ``final`` named as mergelab names its temporaries for it (``.tmp-<name>-<pid>`` dirs,
    ``.<stem>.tmp-<pid>-<host tag>-<hex><suffix>`` files) whose pid is not a live process of this machine, and,
    for dirs, that hold the marker written for that pid on this host (or, made before markers, nothing but
    model-dir files). Another live process's temporary is never touched. Returns what was removed.
    """
    final = Path(final)
    dir_name = re.compile(rf"\.tmp-{re.escape(final.name)}-(\d+)")
    file_name = _temp_file_pattern(final)
    removed = []
    try:
        siblings = list(final.parent.iterdir())
    except OSError:  # no parent yet (nothing to clean) or unreadable: leave it to the write to report
        return removed
    for p in siblings:
        if m := dir_name.fullmatch(p.name):
            if _stale_dir(p, int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        elif m := file_name.fullmatch(p.name):
            pid, host = int(m.group(1)), m.group(2)
            if host == HOST_TAG and pid != os.getpid() and not pid_alive(pid) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def make_temp_dir(final: str | Path) -> Path:
    """A fresh ``.tmp-<name>-<pid>`` dir beside ``final`` holding :data:`TMP_MARKER`, after removing stale ones.

    Finish it with :func:`move_dir_into_place` (or remove the marker with :func:`unmark_temp_dir` before renaming
    it yourself); remove it with ``shutil.rmtree`` on failure.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)  # this pid's own leftover (pids repeat, e.g. in containers)
        tmp.mkdir()
        (tmp / TMP_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    except OSError as e:
        raise named_os_error(e, final, "creating a temporary dir for") from e
    return tmp


def unmark_temp_dir(tmp: str | Path) -> None:
    """Remove the marker of a temporary dir, just before it is renamed into place (it is no part of the result)."""
    (Path(tmp) / TMP_MARKER).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place.

    Raises an ``OSError`` naming ``path`` when it cannot be written (full disk, no permission, read-only
    filesystem); ``path`` is then as it was and no temporary is left.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = _create_temp_file(path)
        try:
            data = memoryview(text.encode("utf-8"))
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise named_os_error(e, path) from e
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) as None: JSON has no NaN, and a bare ``NaN`` in a results
    file is neither valid JSON nor a score."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON version of :func:`atomic_write_text` (non-finite numbers written as null, see :func:`json_safe`);
    other numbers (numpy, tensors' ``.item()``) as floats."""
    text = json.dumps(json_safe(obj), indent=2, sort_keys=False, default=lambda v: json_safe(float(v)), allow_nan=False)
    atomic_write_text(path, text + "\n")


#: The formats a figure is written in (the config's ``figure_format``): png for a look, svg or pdf for a paper.
FIGURE_FORMATS = ("png", "svg", "pdf")

#: The format of figures saved under a path without a suffix (see :func:`figure_format`).
_FIGURE_FORMAT: ContextVar[str] = ContextVar("figure_format", default="png")


@contextmanager
def figure_format(fmt: str | None) -> Iterator[str]:
    """Inside the block, :func:`atomic_save_figure` writes a figure given without a suffix as ``<path>.<fmt>``
    (None: png). A block rather than an argument: merge methods save their plots through ``save_artifacts(dir)``.

    Raises a ValueError naming ``figure_format`` for a format not in :data:`FIGURE_FORMATS`.
    """
    fmt = "png" if fmt is None else str(fmt).lower()
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"figure_format must be one of {FIGURE_FORMATS}, got {fmt!r}")
    token = _FIGURE_FORMAT.set(fmt)
    try:
        yield fmt
    finally:
        _FIGURE_FORMAT.reset(token)


def atomic_save_figure(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure through a temporary file (errors as :func:`atomic_write_text`); returns its path.

    The suffix of ``path`` is the format; a path without one gets the :func:`figure_format` in force (png by
    default). Text stays text in an svg and TrueType in a pdf, so a paper's figure can be edited and searched.
    """
    import matplotlib

    path = Path(path)
    if not path.suffix:
        path = path.with_name(f"{path.name}.{_FIGURE_FORMAT.get()}")
    tmp: Path | None = None
    try:
        remove_stale_temporaries(path)
        fd, tmp = _create_temp_file(path)
        os.close(fd)  # savefig reopens it by name (truncating, so the mode set at creation stays)
        with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise named_os_error(e, path) from e
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def move_dir_into_place(tmp: Path, final: Path) -> None:
    """Rename a completed temporary dir to ``final`` (which must not exist)."""
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(f"{final} already exists")
    unmark_temp_dir(tmp)
    try:
        tmp.rename(final)
    except OSError as e:
        raise named_os_error(e, final, "moving the finished result into place at") from e


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """A fresh temporary dir beside ``final`` to write into; moved into place when the block completes, removed if
    it raises, so ``final`` is never half-written (and must not exist: see :func:`move_dir_into_place`).

    The dir is :func:`make_temp_dir`'s: named after this process, so concurrent runs do not share it, and
    removable by a later run if this one is killed.
    """
    final = Path(final)
    tmp = make_temp_dir(final)
    try:
        yield tmp
        move_dir_into_place(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = naming(e, final)
        if error is e:
            raise
        raise error from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_into_place(
    build: Callable[[Path], Path], final: str | Path, finish: Callable[[Path], None] | None = None
) -> Path:
    """A dir made by ``build(path) -> dir`` (e.g. a pool's own atomic writer) and completed by ``finish(dir)`` (files
    added to it), then moved to ``final`` (which must not exist); returns ``final``.

    Both steps work inside a temporary dir beside ``final`` (:func:`make_temp_dir`), so ``final`` is never seen
    without what ``finish`` adds, a failure leaves nothing behind, and a killed process's leftovers are removed as
    any temporary's.
    """
    final = Path(final)
    stage = make_temp_dir(final)
    try:
        built = build(stage / final.name)
        if finish is not None:
            finish(built)
        move_dir_into_place(built, final)
    except Exception as e:
        error = naming(e, final)
        if error is e:
            raise
        raise error from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final


def naming(e: Exception, final: Path) -> Exception:
    """``e`` to re-raise from writing ``final``: an OS error that names no path (e.g. a full disk under a library's
    writer) re-made to name ``final``; any other error as it is."""
    os_error = unnamed_os_error(e)
    return e if os_error is None else named_os_error(os_error, final)


# How libraries that are not Python's own I/O report an OS error: safetensors' "(os error 28)", Rust's "code: 28".
_FOREIGN_ERRNO = re.compile(r"\(os error (\d+)\)|\bcode: (\d+)\b")


def unnamed_os_error(e: BaseException) -> OSError | None:
    """The OS error inside ``e`` when it names no path (None otherwise): an ``OSError`` without a filename, or a
    library's own exception carrying an errno in its text (safetensors, torch's serialization)."""
    if isinstance(e, OSError):
        return e if e.filename is None and e.errno is not None else None
    m = _FOREIGN_ERRNO.search(str(e))
    if m is None:
        return None
    errno = int(m.group(1) or m.group(2))
    return OSError(errno, os.strerror(errno))


def guard_output_dir(out_dir: str | Path, overwrite: bool, names: Iterable[str] = RESULT_FILES) -> None:
    """Refuse to run when ``out_dir`` already holds a result, unless ``overwrite`` is set."""
    out = Path(out_dir)
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"output dir {out} already holds {existing}; choose another hydra.run.dir or set overwrite=true"
        )

"""One live run per output dir: a lock file naming its owner, taken before the run reads or writes anything there.

A second run into the same dir is refused at once, naming the live one (pid, host, start time). A lock left by a
run that died (``kill -9``, a crash of the machine) is recognised by its pid being gone on this host; the dead run's
leftovers (its candidate merges) are removed and the lock taken over. A lock of another host cannot be checked from
here: it is refused, saying which file to remove if that run is known to be dead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mergelab.errors import RunDirInUse
from mergelab.io.atomic import named_os_error, pid_alive

#: The lock file inside a run dir while a run works there.
LOCK_FILE = ".mergelab-lock"


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_owner(lock: Path) -> dict[str, Any] | None:
    """The lock's owner record; None when it is unreadable (a run that died while writing it cannot exist: the
    record is written beside the lock and linked into place whole)."""
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _try_create(lock: Path) -> bool:
    """Create ``lock`` holding this process's record, atomically (whole or not at all); False if it exists."""
    tmp = lock.with_name(f"{lock.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_owner()))
    try:
        os.link(tmp, lock)  # fails if the lock exists: exactly one process creates it
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive create, then the record
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())
        return True
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def run_dir_lock(out_dir: str | Path, where: str, leftovers: Sequence[str] = ()) -> Iterator[None]:
    """Hold ``out_dir``'s lock for the block; ``where`` is the config key that chose the dir (named when refused).

    ``leftovers``: entries of ``out_dir`` that only a live run uses (e.g. its candidate merges), removed when the
    lock of a dead run is taken over.
    """
    out = Path(out_dir)
    lock = out / LOCK_FILE
    created = not out.exists()  # removed again at the end if the run wrote nothing there (a refused config)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a dead owner's lock removed, then taken (another process may take it first)
            if _try_create(lock):
                break
            owner = _read_owner(lock)
            if owner is None and lock.exists():
                raise RunDirInUse(
                    f"output dir {out} is locked ({lock} is unreadable); if no run is using it, remove {lock}, or "
                    f"choose another {where}"
                )
            if owner is not None:
                pid, host = owner.get("pid"), owner.get("host")
                alive_here = host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid()
                if host != socket.gethostname() or (alive_here and pid_alive(pid)):
                    raise RunDirInUse(
                        f"output dir {out} is in use by a live run (pid {pid} on {host}, started "
                        f"{owner.get('started')}); wait for it to finish or choose another {where}"
                        + ("" if host == socket.gethostname() else f" (if that run is dead, remove {lock})")
                    )
                for name in leftovers:  # the dead run's: nobody else may use them
                    path = out / name
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
                lock.unlink(missing_ok=True)
        else:
            raise RunDirInUse(f"output dir {out}: could not take its lock {lock}; choose another {where}")
    except OSError as e:
        if isinstance(e, RunDirInUse):
            raise
        raise named_os_error(e, lock, "locking the run dir") from e
    try:
        yield
    finally:
        owner = _read_owner(lock)
        if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            lock.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):  # not empty: the run's results
                    out.rmdir()

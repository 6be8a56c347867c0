"""A result that cannot be written (full disk, file-size limit) fails naming the result's path, whichever library
wrote it, and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Run under a file-size limit (the kernel refuses writes past it, as a full disk does): each case writes the
# result ``final`` with another writer and prints the one-line error it got.
SCRIPT = """
import resource, signal, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from mergelab.io.atomic import atomic_dir, build_into_place

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
final, case = Path(sys.argv[1]), sys.argv[2]
big = {"w": torch.zeros(100_000)}

def with_safetensors(d):
    d.mkdir()
    save_file(big, str(d / "model.safetensors"))
    return d

def with_open(d):
    d.mkdir()
    (d / "config.json").write_text("x" * 200_000)
    return d

writer = {"safetensors": with_safetensors, "open": with_open}[case]
try:
    if sys.argv[3] == "build_into_place":
        build_into_place(writer, final)
    else:
        with atomic_dir(final) as tmp:
            writer(tmp / "inner")
except Exception as e:
    print(str(e))
"""


@pytest.mark.parametrize("how", ["build_into_place", "atomic_dir"])
@pytest.mark.parametrize("case", ["safetensors", "open"])
def test_failed_write_names_the_result(case: str, how: str, tmp_path: Path) -> None:
    final = tmp_path / "merged_model"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(final), case, how], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == f"[Errno 27] File too large (writing): '{final}'", out
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary

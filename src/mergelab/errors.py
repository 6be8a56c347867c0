"""mergelab's own failures: the console prints their message as is (one line), never prefixed with a type name."""

from __future__ import annotations


class MergelabError(Exception):
    """A failure mergelab has described itself: its message says what went wrong and what to do."""


class TableRowsFailed(MergelabError, RuntimeError):
    """Some rows of a table raised; the others were scored and written (their errors are in ``failed_rows``)."""


class RunDirInUse(MergelabError, FileExistsError):
    """Another live run holds the output dir (its lock names the process)."""

"""A job's identity: the command-line overrides that define its result (light: the CLI and the sweep summary use it)."""

from __future__ import annotations

#: Overrides that say how to run, not what: a job resumed with them is the same job.
RUN_CONTROL_KEYS = ("resume", "overwrite")


def override_key(override: str) -> str:
    """The key an override sets (``+a.b=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def job_overrides(overrides: list[str]) -> list[str]:
    """The overrides that define a job's result (without :data:`RUN_CONTROL_KEYS`), in the order given."""
    return [o for o in overrides if override_key(o) not in RUN_CONTROL_KEYS]


def same_job(a: list[str], b: list[str]) -> bool:
    """Whether two override lists define the same job: the same overrides, in any order (Hydra refuses one key given
    twice, so the order of distinct keys cannot change the config)."""
    return sorted(job_overrides(a)) == sorted(job_overrides(b))

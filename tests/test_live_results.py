"""A table shows its rows as they finish: files rewritten after every row, one console line per row with the run's
progress, each row (and each expert's fine-tuning curve) sent to the loggers as it comes; and the training batches
that make expert fine-tuning fast."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

from mergelab.reports.live import LiveTable, clock
from mergelab.run import run
from mergelab.text.suite import LengthGroupedBatches
from tests.conftest import embedded_table_rows, make_cfg

# Two cheap rows of the embedded table: enough to see a row appear before the next one is scored.
TWO_ROWS = [*embedded_table_rows("weight_averaging", "task_arithmetic"), "tune=false"]


def test_a_table_writes_each_row_as_it_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, list[str], list[str]]] = []  # at every write: results.md's title, its rows, the CSV's rows
    original = LiveTable.write

    def snapshot(self: LiveTable, final: bool = False) -> None:
        original(self, final)
        lines = (self.out_dir / "results.md").read_text().splitlines()
        rows = [line.split("|")[1].strip() for line in lines if line.startswith("| ") and "Method" not in line]
        with (self.out_dir / "results.csv").open() as f:
            csv_rows = [r[0] for r in list(csv.reader(f))[1:]]
        seen.append((lines[0], rows, csv_rows))
        # Each write is whole: the chart is there with the table, and no run has finished yet (no metrics.json).
        assert (self.out_dir / "results.png").is_file()
        assert final or not (self.out_dir / "metrics.json").exists()

    monkeypatch.setattr(LiveTable, "write", snapshot)
    out = tmp_path / "table"
    with caplog.at_level(logging.INFO, logger="mergelab.reports.live"):
        run(make_cfg(out, [*TWO_ROWS, "plot=true", "logger=csv"]))

    titles = [title for title, _, _ in seen]
    assert [rows for _, rows, _ in seen] == [
        ["pretrained"],
        ["pretrained", "experts"],
        ["pretrained", "experts", "weight_averaging"],
        ["pretrained", "experts", "weight_averaging", "task_arithmetic"],
        ["pretrained", "experts", "weight_averaging", "task_arithmetic"],  # the final write
    ]
    assert [rows for _, _, rows in seen] == [rows for _, rows, _ in seen]
    assert "0 of 2 methods done" in titles[0] and "1 of 2 methods done" in titles[2]
    assert "methods done" not in titles[-1]  # the finished table's title is the plain one
    # One console line per finished row: its average, its time, the run's progress and what is left.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("row ")]
    assert len(lines) == 2
    assert lines[0].startswith("row 1/2 weight_averaging: avg acc ") and "elapsed" in lines[0] and "ETA" in lines[0]
    assert lines[1].startswith("row 2/2 task_arithmetic: avg acc ") and lines[1].endswith("done")
    # The CSV logger got every row's scores (flushed row by row) and the run's end.
    (metrics_csv,) = (out / "csv").rglob("metrics.csv")
    text = metrics_csv.read_text()
    for key in ("test/pretrained/avg_acc", "test/weight_averaging/avg_acc", "test/task_arithmetic/avg_acc"):
        assert key in text, key
    assert "timings/setup_s" in text


def test_a_row_is_logged_before_the_next_row_is_scored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loggers see a row when it finishes, not at the end of the run."""
    from mergelab.reports import loggers

    logged: list[str] = []
    original = loggers.log_row

    def recording(lgs, split, name, row, step):  # type: ignore[no-untyped-def]
        logged.append(name)
        original(lgs, split, name, row, step)

    monkeypatch.setattr(loggers, "log_row", recording)
    scored: list[tuple[str, list[str]]] = []  # (what was scored, rows logged by then)
    from mergelab.suites import scoring

    original_scoring = scoring.scoring

    def tracking(what: str, split: str):  # type: ignore[no-untyped-def]
        scored.append((what, list(logged)))
        return original_scoring(what, split)

    monkeypatch.setattr(scoring, "scoring", tracking)
    run(make_cfg(tmp_path / "t", [*TWO_ROWS, "logger=csv"]))
    assert logged == ["pretrained", "experts", "weight_averaging", "task_arithmetic"]
    ta = next(logged_then for what, logged_then in scored if what.startswith("task_arithmetic"))
    assert ta == ["pretrained", "experts", "weight_averaging"]  # weight averaging was logged before TA was scored


def test_experts_log_their_training_curves_as_they_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fine-tunes its experts sends each one's loss curve to the run's loggers (every 5 steps: 6 here)."""
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))  # a fresh cache: the experts are built here
    out = tmp_path / "run"
    run(make_cfg(out, ["logger=csv", "eval.tasks=[tweet_sentiment]", "model.finetune.max_train_examples=192"]))
    (metrics_csv,) = (out / "csv").rglob("metrics.csv")
    with metrics_csv.open() as f:
        records = list(csv.DictReader(f))
    curve = [
        float(r["experts/tweet_sentiment/train_loss"]) for r in records if r.get("experts/tweet_sentiment/train_loss")
    ]
    assert len(curve) >= 1 and all(v > 0 for v in curve)
    assert any(r.get("test/task_arithmetic/avg_acc") for r in records)  # the same logger then got the rows


@pytest.mark.parametrize(("n", "size", "group"), [(100, 8, 4), (37, 5, 16), (3, 8, 2)])
def test_length_grouped_batches_see_every_example_once_an_epoch(n: int, size: int, group: int) -> None:
    lengths = torch.randint(1, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    sampler = LengthGroupedBatches(lengths, size, seed=0, group=group)
    epochs = [list(sampler), list(sampler)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert len(batches) == len(sampler) == -(-n // size)
        assert all(1 <= len(b) <= size for b in batches)
    if n > size:
        assert epochs[0] != epochs[1]  # each epoch its own order
    assert list(LengthGroupedBatches(lengths, size, seed=0, group=group)) == epochs[0]  # seeded


def test_length_grouped_batches_pad_less_than_random_ones() -> None:
    """Within a window the batches hold examples of close length: far fewer padded tokens than random batches."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 64, (3000,), generator=g).tolist()

    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    grouped = list(LengthGroupedBatches(lengths, 32, seed=0))
    order = torch.randperm(3000, generator=g).tolist()
    random = [order[i : i + 32] for i in range(0, 3000, 32)]
    assert padded(grouped) < 0.7 * padded(random)
    assert padded(grouped) >= sum(lengths)
    # Still shuffled: the batches' lengths are not in sorted order, and consecutive batches come from all over.
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


@pytest.mark.parametrize(("seconds", "text"), [(4.4, "4 s"), (65, "1 min 05 s"), (3725, "1 h 02 min")])
def test_durations_read_as_a_person_would(seconds: float, text: str) -> None:
    assert clock(seconds) == text

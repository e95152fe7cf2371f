"""Parallel text from the data directory (see its README), used in both directions. A corpus in
`train/` is either a TSV `A-B.tsv[.gz]` whose header names the two languages (`en  de  source`), or
a pair of line-aligned plain-text files `A-B.A[.gz]` and `A-B.B[.gz]` (line n of one translates
line n of the other, as in WMT releases)."""

from __future__ import annotations

import csv
import gzip
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


class DataError(ValueError):
    """A data file that cannot be used as it is; the message names the file (and line)."""


def data_root(path: str | Path | None = None) -> Path:
    """`path`, else $LANDERMT_DATA, else ../shared/data beside the checkout."""
    root = Path(path or os.environ.get("LANDERMT_DATA", DEFAULT_DATA))
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist "
                                "(give it with --data or data.root, or set $LANDERMT_DATA)")
    return root


@dataclass(frozen=True)
class ParallelCorpus:
    first: str  # language of column 1 (en)
    second: str  # language of column 2
    pairs: list[tuple[str, str]]

    def side(self, language: str) -> list[str]:
        column = (self.first, self.second).index(language)
        return [pair[column] for pair in self.pairs]


def _read_text(path: Path) -> str:
    """A UTF-8 file, gzip'd when its name ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def read_parallel_tsv(path: str | Path) -> ParallelCorpus:
    """One TSV with a header; rows with a missing or empty side are an error that names the line."""
    path = Path(path)
    reader = csv.reader(io.StringIO(_read_text(path)), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if not header or len(header) < 2:
        raise DataError(f"{path}: expected a header naming two languages, got {header!r}")
    pairs = []
    for number, row in enumerate(reader, start=2):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}:{number}: expected two non-empty tab-separated columns")
        pairs.append((row[0].strip(), row[1].strip()))
    return ParallelCorpus(header[0], header[1], pairs)


def aligned_lines(first_path: Path, second_path: Path) -> tuple[list[str], list[str]]:
    """The lines of two files meant to translate each other line by line; DataError when their counts differ."""
    a, b = _read_text(first_path).splitlines(), _read_text(second_path).splitlines()
    if len(a) != len(b):
        raise DataError(f"{first_path} has {len(a)} lines but {second_path} has {len(b)}: not line-aligned")
    return a, b


def read_aligned_files(first_path: str | Path, second_path: str | Path, first: str, second: str) -> ParallelCorpus:
    """Two line-aligned files; different line counts or an empty line are an error naming the files."""
    first_path, second_path = Path(first_path), Path(second_path)
    a, b = aligned_lines(first_path, second_path)
    for number, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        if not x.strip() or not y.strip():
            empty = first_path if not x.strip() else second_path
            raise DataError(f"{empty}:{number}: empty line (each line must translate the other file's line)")
    return ParallelCorpus(first, second, [(x.strip(), y.strip()) for x, y in zip(a, b, strict=True)])


def _corpus_files(train: Path) -> dict[str, dict[str, Path]]:
    """{"A-B": {kind: path}} for the files of each corpus in `train/`; kind is "tsv", A or B."""
    if not train.is_dir():
        raise FileNotFoundError(f"no training data: {train} does not exist")
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(train.iterdir()):
        stem, _, kind = path.name.removesuffix(".gz").rpartition(".")
        first, _, second = stem.partition("-")
        if first and second and kind in ("tsv", first, second):
            found.setdefault(stem, {})[kind] = path
    return found


def training_corpora(root: str | Path | None = None) -> list[ParallelCorpus]:
    """Every corpus in the data root's `train/`, sorted by name (layouts: the module docstring)."""
    train = data_root(root) / "train"
    corpora = []
    for stem, files in _corpus_files(train).items():
        first, _, second = stem.partition("-")
        if set(files) == {"tsv"}:
            corpora.append(read_parallel_tsv(files["tsv"]))
        elif set(files) == {first, second}:
            corpora.append(read_aligned_files(files[first], files[second], first, second))
        else:
            raise DataError(f"{train}: corpus {stem} needs {stem}.tsv[.gz] or both {stem}.{first} and "
                             f"{stem}.{second}, not {', '.join(sorted(p.name for p in files.values()))}")
    if not corpora:
        raise FileNotFoundError(f"no parallel corpora in {train} (A-B.tsv.gz, or line-aligned A-B.A and A-B.B)")
    return corpora


def sample(items: list, n: int, seed: int) -> list:
    """n items (all if fewer), chosen reproducibly."""
    return items if len(items) <= n else random.Random(seed).sample(items, n)

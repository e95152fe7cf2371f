"""Parallel text from the data directory (see its README): `train/en-XX.tsv.gz` with header
`en  XX  source`, used in both directions."""

from __future__ import annotations

import csv
import gzip
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def data_root(path: str | Path | None = None) -> Path:
    """`path`, else $LANDERMT_DATA, else ../shared/data beside the checkout."""
    root = Path(path or os.environ.get("LANDERMT_DATA", DEFAULT_DATA))
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist (set --data or LANDERMT_DATA)")
    return root


@dataclass(frozen=True)
class ParallelCorpus:
    first: str  # language of column 1 (en)
    second: str  # language of column 2
    pairs: list[tuple[str, str]]

    def side(self, language: str) -> list[str]:
        column = (self.first, self.second).index(language)
        return [pair[column] for pair in self.pairs]


def read_parallel_tsv(path: str | Path) -> ParallelCorpus:
    """One gzip'd TSV; rows with a missing or empty side are an error that names the line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        reader = csv.reader(io.StringIO(f.read()), delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise ValueError(f"{path}: expected a header naming two languages, got {header!r}")
        pairs = []
        for number, row in enumerate(reader, start=2):
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise ValueError(f"{path}:{number}: expected two non-empty tab-separated columns")
            pairs.append((row[0].strip(), row[1].strip()))
    return ParallelCorpus(header[0], header[1], pairs)


def training_corpora(root: str | Path | None = None) -> list[ParallelCorpus]:
    """Every `train/*.tsv.gz` under the data root, sorted by file name."""
    train = data_root(root) / "train"
    paths = sorted(train.glob("*.tsv.gz"))
    if not paths:
        raise FileNotFoundError(f"no *.tsv.gz parallel files in {train}")
    return [read_parallel_tsv(p) for p in paths]


def sample(items: list, n: int, seed: int) -> list:
    """n items (all if fewer), chosen reproducibly."""
    return items if len(items) <= n else random.Random(seed).sample(items, n)

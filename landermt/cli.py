"""What every command-line tool does with bad input: one line naming the problem, exit status 2."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

from landermt.artifact import ArtifactError
from landermt.data import DataError
from landermt.families import UnsupportedModelError


@contextmanager
def user_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """A missing or malformed data file, a mismatched artifact or an unsupported model ends the command
    with its message (which names the file, key or model) instead of a traceback."""
    try:
        yield
    except (ArtifactError, DataError, FileNotFoundError, UnsupportedModelError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")

"""The unit every reader produces: one question with its passage and gold answers; and the data error."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names the file, record and field."""


@dataclass(frozen=True)
class Example:
    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]  # every gold answer, in file order (duplicates kept); () when unanswerable
    answer_starts: tuple[int, ...] = field(default=())  # character offsets into context

    @property
    def answerable(self) -> bool:
        return bool(self.answers)

    @property
    def answer(self) -> str:
        """The training target: the first gold answer ("" for an unanswerable question)."""
        return self.answers[0] if self.answers else ""


def read_text(path: Path) -> str:
    """A UTF-8 text file, gunzipped first when its name ends in ``.gz``."""
    try:
        raw = path.read_bytes()
        return (gzip.decompress(raw) if path.name.endswith(".gz") else raw).decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip's errors are OSError or EOFError
        raise DataError(f"{path}: cannot read: {e}") from None

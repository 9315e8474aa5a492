"""The one error type every spec problem becomes, with file and line."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FieldPath = tuple[str | int, ...]
"""Where a value sits inside a document: mapping keys and sequence indexes, outermost first."""


def format_field_path(path: Sequence[str | int]) -> str:
    """``("capture", "dataset_files", 0)`` → ``capture.dataset_files[0]``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


@dataclass(frozen=True)
class SpecIssue:
    """One problem in one spec file, located as precisely as the file allows."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class SpecError(ValueError):
    """A spec could not be read or is invalid; the message lists every issue, one per line."""

    def __init__(self, issues: Iterable[SpecIssue]) -> None:
        self.issues: tuple[SpecIssue, ...] = tuple(issues)
        if not self.issues:
            raise ValueError("SpecError needs at least one issue")
        super().__init__("\n".join(str(issue) for issue in self.issues))

    @classmethod
    def single(cls, file: str, line: int | None, field: str, message: str) -> SpecError:
        """An error with exactly one issue."""
        return cls([SpecIssue(file=file, line=line, field=field, message=message)])

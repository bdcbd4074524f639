"""User-facing errors. The CLI maps every `UserError` to one line on stderr and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a sweep file, a data path, a CLI option.

    Its message is one line that names the file, the key and the problem.
    """

    def __init__(self, problem: str, *, file: str | None = None, key: str | None = None) -> None:
        self.problem = problem
        self.file = file
        self.key = key
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = []
        if self.file:
            parts.append(str(self.file))
        if self.key:
            parts.append(f"key '{self.key}'")
        where = ": ".join(parts)
        text = f"{where}: {self.problem}" if where else self.problem
        return " ".join(text.split())


class SpecError(UserError):
    """A sweep file that cannot be loaded or does not validate."""


class DataError(UserError):
    """A dataset that cannot be found or read."""


class StoreError(UserError):
    """A results store that cannot be used (wrong schema version, not a harness store)."""


class WorkerStartError(UserError):
    """A worker process could not start (TensorFlow missing or broken in this environment)."""

"""User-facing errors. The CLI maps every `UserError` to one line on stderr and exit code 2.

Taxonomy: `SpecError` (sweep file or flag), `DataError` (a data set), `StoreError` (the results
store), `OutputError` (a file we were asked to write), `LimitError` (an input over a size limit),
`EnvironmentProblem` (the installation, not the input). Exit 1 is never used for any of them: it
means only "runs failed" (sweep) or "regression" (regress).
"""

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


class OutputError(UserError):
    """A file the harness was asked to write cannot be written there (not a regular file, disk full,
    read-only folder, no permission). Nothing at the path was changed."""


class LimitError(UserError):
    """An input over one of the harness' size limits (the message says the limit and how to raise it)."""


class EnvironmentProblem(UserError):
    """The environment is broken, not the input: TensorFlow missing or failing to import, a worker
    that cannot start. Still one line and exit 2, worded as what to fix in the installation."""


class WorkerStartError(EnvironmentProblem):
    """A worker process could not start (TensorFlow missing or broken in this environment)."""

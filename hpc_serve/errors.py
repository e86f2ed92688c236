"""The one error type users see: what is wrong, and how to fix it."""

from __future__ import annotations


class HpcServeError(Exception):
    """A user-facing error: a one-line problem and an optional one-line fix.

    The CLI prints ``problem`` and ``hint`` and exits with code 2; the Python API raises it.
    """

    exit_code = 2

    def __init__(self, problem: str, hint: str | None = None) -> None:
        super().__init__(problem if not hint else f"{problem}\n{hint}")
        self.problem = problem
        self.hint = hint

    def report(self, prefix: str = "error") -> None:
        """Print the problem and the fix to stderr, the way every entry point shows errors."""
        import sys

        print(f"{prefix}: {self.problem}", file=sys.stderr)
        if self.hint:
            print(self.hint, file=sys.stderr)

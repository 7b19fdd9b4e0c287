"""Errors a user can act on. The CLI turns each into one message and exit code 2."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where (a field path like ``spec.workloads[0].nice``) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InputError(Exception):
    """Bad input (policy, CPU list, host root): nothing has been or will be written."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.source}: " if self.source else ""
        if len(self.problems) == 1:
            return f"{head}{self.problems[0]}"
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        return f"{head}{len(self.problems)} problems:\n{lines}"


def single(source: str, path: str, message: str) -> InputError:
    return InputError(source, [Problem(path, message)])

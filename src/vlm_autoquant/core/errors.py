"""One error type for bad input; the CLI turns it into a message and an exit code."""

from __future__ import annotations

from dataclasses import dataclass, field

EXIT_USAGE = 2  # bad input: the user can fix it
EXIT_FAILURE = 1  # the run failed for another reason
EXIT_INTERRUPTED = 130  # stopped by SIGINT/SIGTERM


@dataclass(frozen=True)
class Problem:
    """One bad input: which input, what is wrong, how to fix it."""

    input: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.input}: {self.message}"
        return f"{text}\n    fix: {self.fix}" if self.fix else text


class VlmAutoquantError(Exception):
    """What the API raises: `problems` is the list the CLI prints (the subclass: its exit code)."""

    @property
    def problems(self) -> list[Problem]:
        return [Problem("run", str(self))]


class UsageError(VlmAutoquantError):
    """Raised with every problem found; exit code 2 at the CLI boundary."""

    def __init__(self, problems: list[Problem] | Problem):
        self._problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__(self.render())

    @property
    def problems(self) -> list[Problem]:
        return self._problems

    def render(self) -> str:
        head = "1 problem" if len(self.problems) == 1 else f"{len(self.problems)} problems"
        return f"{head} with the input:\n" + "\n".join(f"  - {p}" for p in self.problems)


class RunFailed(VlmAutoquantError):
    """A run that started but could not finish (disk full, ModelOpt refused, ...); exit code 1."""


class Interrupted(VlmAutoquantError):
    """SIGINT/SIGTERM asked the run to stop; raised at the next safe point."""

    def __init__(self, signal_name: str):
        self.signal_name = signal_name
        super().__init__(f"stopped by {signal_name}")


@dataclass
class Problems:
    """Collects problems so that all of them are reported together."""

    items: list[Problem] = field(default_factory=list)

    def add(self, input: str, message: str, fix: str = "") -> None:
        self.items.append(Problem(input, message, fix))

    def extend(self, other: "Problems | list[Problem]") -> None:
        self.items.extend(other.items if isinstance(other, Problems) else other)

    def raise_if_any(self) -> None:
        if self.items:
            raise UsageError(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

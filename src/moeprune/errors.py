"""User-facing errors: each carries one line saying what is wrong and how to fix it.

The CLI prints ``str(error)`` and exits with code 2; library callers catch ``MoepruneError``.
"""

from __future__ import annotations

import difflib


class MoepruneError(Exception):
    """Base class of every error caused by bad input (not by a bug)."""


class UnsupportedModelError(MoepruneError):
    """The model is dense, of an unknown family, or cannot be loaded."""


class PlanError(MoepruneError):
    """A pruning plan does not fit the model (layer, expert ids, counts, groups)."""


class DataError(MoepruneError):
    """Calibration/search data is missing, empty or malformed."""


class RegistryError(MoepruneError):
    """An unknown name was asked of a registry."""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or the list of choices."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (choose from: {', '.join(sorted(choices))})"


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (see `moeprune.interrupts`): raised in the main thread so that every
    ``finally`` runs and no half-written output stays. Not a `KeyboardInterrupt`, which click turns
    into a silent exit code; `interrupts.raise_on_signals(redeliver=True)` gives library callers back
    their KeyboardInterrupt or SIGTERM."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class MoepruneWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints one line)."""

"""User-facing errors: each says what went wrong and what to change."""
from __future__ import annotations

import difflib
from typing import Iterable


class ShearkitError(ValueError):
    """A problem with the user's input or environment, reported without a deep traceback."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest valid choice, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> ShearkitError:
    """Build the standard error for an unknown name, with a suggestion and the valid names."""
    choices = sorted(choices)
    return ShearkitError(
        f"Unknown {kind} '{name}'.{did_you_mean(name, choices)} Valid {kind}s: {', '.join(choices)}."
    )

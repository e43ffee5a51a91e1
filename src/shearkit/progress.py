"""Progress bars for the long loops, all alike: tqdm on stderr, cleared when done.

`TQDM_DISABLE=1` in the environment hides every bar (tqdm reads it when first imported), and
pytest's capture keeps them out of test output.
"""
from __future__ import annotations

from typing import Any, Iterable


def progress(iterable: Iterable, desc: str | None, unit: str = "it", **kwargs: Any):
    """Wrap `iterable` in a bar labelled `desc`; `desc=None` shows no bar."""
    from tqdm.auto import tqdm

    if desc is None:
        kwargs["disable"] = True
    return tqdm(iterable, desc=desc, unit=unit, leave=False, **kwargs)

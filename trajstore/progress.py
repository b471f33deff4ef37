"""Progress bars for the core's long operations, shown only when tqdm (the `[distill]` extra) is installed.

The core (format, converters, legacy readers, archive) installs without tqdm; without it, work runs
silently instead of failing.
"""

from __future__ import annotations


class _Silent:
    """What a disabled or unavailable bar does: nothing, with tqdm's calling shape."""

    def __init__(self, iterable=None):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass


def progress_bar(iterable=None, *, disable: bool = False, **kwargs):
    """`tqdm(iterable, **kwargs)` when tqdm is importable and the bar is wanted, else a silent stand-in."""
    if not disable:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, **kwargs)
    return _Silent(iterable)

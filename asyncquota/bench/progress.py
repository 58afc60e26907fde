"""A one-line progress bar for a benchmark run, on stderr when it is a terminal."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TextIO

__all__ = ["Progress"]

_BAR_WIDTH = 24


class Progress:
    """A one-line progress bar on stderr, redrawn each second of the run (only on a terminal).

    Args:
        label: what is running (the strategy's name).
        horizon: the run's longest possible length, in seconds.
        stream: where to draw (stderr by default).
    """

    __slots__ = ("_drawn", "_horizon", "_label", "_stream")

    def __init__(self, label: str, horizon: float, *, stream: TextIO | None = None) -> None:
        self._label = label
        self._horizon = horizon
        self._stream = stream if stream is not None else sys.stderr
        self._drawn = False

    def update(self, t: float, sample: Mapping[str, float]) -> None:
        """Redraw for time ``t`` with the live counts of ``sample``."""
        if not self._stream.isatty():
            return
        filled = min(_BAR_WIDTH, int(_BAR_WIDTH * t / self._horizon))
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        self._stream.write(
            f"\r{self._label:<11} [{bar}] {t:6.0f}/{self._horizon:.0f} s"
            f"  sent {int(sample['started']):>7}  ok {int(sample['ok']):>7}"
            f"  open {int(sample['open']):>6}"
        )
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the bar's line."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()

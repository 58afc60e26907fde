"""A busy machine, for real-time runs: one process spinning 30 ms of every 50 ms.

The punishing rows of the robustness matrix turn on how late a refusal comes back, and
that turns on what else the machine runs. Started beside a run, this keeps one core busy
three fifths of the time in slices the scheduler must preempt, so that the client's and
the upstream's loops are held up now and then, as on a shared machine::

    python benchmarks/busy.py 1800 &   # stops by itself after 1 800 s
    .venv/bin/asyncquota bench --matrix --rows 9,14 --seed 3 --repeat 3

It stops by itself after the seconds given (600 by default, at most a day).
"""

from __future__ import annotations

import argparse
import time

SPIN = 0.03
"""Seconds of each slice spent spinning."""

REST = 0.02
"""Seconds of each slice spent asleep."""

LONGEST = 86_400.0
"""The most seconds it may run."""


def busy(seconds: float) -> int:
    """Spin ``SPIN`` and sleep ``REST`` in turn for ``seconds``; the slices spun."""
    end = time.monotonic() + seconds
    slices = 0
    while time.monotonic() < end:
        until = min(end, time.monotonic() + SPIN)
        while time.monotonic() < until:
            pass
        slices += 1
        time.sleep(REST)
    return slices


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "seconds", nargs="?", type=float, default=600.0, help="how long to run (default 600)"
    )
    seconds = parser.parse_args(argv).seconds
    if not 0 < seconds <= LONGEST:
        parser.error(f"seconds must be above 0 and at most {LONGEST:g}, not {seconds:g}.")
    print(f"busy for {seconds:g} s: {busy(seconds)} slices of {SPIN * 1000:g} ms spun")


if __name__ == "__main__":
    main()

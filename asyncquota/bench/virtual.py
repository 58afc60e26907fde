"""An event loop on virtual time, for benchmark and tuner runs outside pytest.

It is looptime's loop (time starts at 0 and jumps to the next timer whenever every task
waits, so a 60 s night takes only the CPU it needs) with one adjustment: every timer lies
at least one tick (:data:`TICK`) in the future. A wake-up computed with float arithmetic can
land a hair after "now" (aiolimiter's, for one); on a real clock time moves while it
refires, but on a virtual clock nothing moves until every task waits, so the timer would
refire forever. A tick of 1 µs changes no result and makes every chain of timers advance
the clock.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

import looptime

__all__ = ["NOOP_CYCLES", "TICK", "VirtualEventLoop", "new_virtual_loop"]

TICK = 1e-6
"""looptime's resolution: the smallest step of the virtual clock, in seconds."""

NOOP_CYCLES = 1
"""Idle passes the loop makes before jumping to the next timer. looptime's default, 42,
lets chains of ``await`` settle in tests; here it only costs seconds over a 30 000-session
night."""


class VirtualEventLoop(looptime.LoopTimeEventLoop, asyncio.SelectorEventLoop):
    """A selector event loop on looptime's virtual clock, timers at least a tick ahead."""

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        """Schedule ``callback`` at ``when``, or one tick from now if that is sooner."""
        soonest = self.time() + TICK
        return super().call_at(max(when, soonest), callback, *args, context=context)


def new_virtual_loop() -> VirtualEventLoop:
    """A fresh virtual-time loop whose clock starts at 0."""
    return VirtualEventLoop(resolution=TICK, noop_cycles=NOOP_CYCLES)

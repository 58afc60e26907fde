"""Priority classes: the order in which waiting work reaches the upstream.

A priority is an integer rank; a smaller rank is more important and is served strictly
first. Three ranks have names, and any other integer may be used between or around them
(``CRITICAL`` is 0, so ``-1`` outranks it and ``5`` waits behind ``BATCH``).
"""

from __future__ import annotations

import enum

__all__ = ["Priority", "PriorityLike", "coerce_priority", "describe_priority"]


class Priority(enum.IntEnum):
    """The named priority classes, most important first."""

    CRITICAL = 0
    """Must go now: health checks, escalations, paying customers mid-checkout."""
    INTERACTIVE = 10
    """A person is waiting for the answer (the default)."""
    BATCH = 20
    """Background work that can wait or be told to come back later."""


PriorityLike = Priority | int | str
"""What callers may pass as a priority: the enum, its name (any case) or an integer rank."""


def coerce_priority(value: PriorityLike) -> int:
    """Turn a priority as a caller wrote it into its integer rank.

    Raises:
        ValueError: an unknown class name.
        TypeError: neither a name nor an integer (``bool`` is refused too: ``True`` is
            almost certainly a mistake, not rank 1).
    """
    if isinstance(value, str):
        try:
            return int(Priority[value.strip().upper()])
        except KeyError:
            names = ", ".join(repr(p.name.lower()) for p in Priority)
            raise ValueError(
                f"Unknown priority class {value!r}; use one of {names} or an integer rank."
            ) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"A priority is a class name or an integer rank, not {type(value).__name__}."
        )
    return int(value)


_NAMED: dict[int, Priority] = {int(p): p for p in Priority}


def describe_priority(rank: int) -> Priority | int:
    """The enum member for a named rank, else the rank itself (for errors and statistics).

    A dict lookup, not ``Priority(rank)``: every event and error describes its priority,
    and the enum's own lookup costs several times more.
    """
    return _NAMED.get(rank, rank)

"""A covering set of combinations: every pair of values of two dimensions in some row.

Running every combination of seven upstream behaviours would take hundreds of nights;
most faults, though, come from one behaviour or from two meeting (a whole-second
Retry-After *and* refused requests counted). :func:`all_pairs` picks a few rows such that
every value of every dimension meets every value of every other dimension at least once.

The construction is the usual greedy one (AETG without the random restarts, so the same
dimensions always give the same rows): each row starts from the first pair still uncovered
and fills the other dimensions, one by one, with the value that covers the most uncovered
pairs with what the row holds so far (the first such value on a tie). The result is not
always the smallest set, but it is close (for 5 x 4 x 3 x 2 x 2 x 2 x 2 values: 20 or a
few more rows, 20 being the least any set can have).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TypeVar

__all__ = ["all_pairs", "uncovered_pairs"]

V = TypeVar("V")

_Pair = tuple[int, int, int, int]
"""``(dimension i, value index a, dimension j, value index b)`` with ``i < j``."""


def _pairs(sizes: Sequence[int]) -> set[_Pair]:
    return {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(sizes)), 2)
        for a in range(sizes[i])
        for b in range(sizes[j])
    }


def _index_rows(sizes: Sequence[int]) -> list[list[int]]:
    uncovered = _pairs(sizes)
    rows: list[list[int]] = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row: list[int | None] = [None] * len(sizes)
        row[i], row[j] = a, b
        for k in range(len(sizes)):
            if row[k] is not None:
                continue
            best, best_gain = 0, -1
            for value in range(sizes[k]):
                gain = sum(
                    (min(k, m), value if k < m else fixed, max(k, m), fixed if k < m else value)
                    in uncovered
                    for m, fixed in enumerate(row)
                    if fixed is not None
                )
                if gain > best_gain:
                    best, best_gain = value, gain
            row[k] = best
        full = [value for value in row if value is not None]
        uncovered -= {
            (m, full[m], n, full[n]) for m, n in itertools.combinations(range(len(full)), 2)
        }
        rows.append(full)
    return rows


def all_pairs(dimensions: Mapping[str, Sequence[V]]) -> list[dict[str, V]]:
    """Rows (a value per dimension) covering every pair of values of two dimensions.

    Deterministic: the same dimensions, in the same order, give the same rows. With one
    dimension, each value is a row.

    Raises:
        ValueError: a dimension without values.
    """
    names = list(dimensions)
    empty = [name for name in names if not dimensions[name]]
    if empty:
        raise ValueError(f"Every dimension needs a value; {', '.join(empty)} has none.")
    sizes = [len(dimensions[name]) for name in names]
    if len(sizes) == 1:
        return [{names[0]: value} for value in dimensions[names[0]]]
    return [
        {name: dimensions[name][index] for name, index in zip(names, row, strict=True)}
        for row in _index_rows(sizes)
    ]


def uncovered_pairs(
    dimensions: Mapping[str, Sequence[V]], rows: Sequence[Mapping[str, V]]
) -> list[tuple[tuple[str, V], tuple[str, V]]]:
    """The pairs of values of two dimensions that no row holds (empty: the rows cover)."""
    missing = []
    for first, second in itertools.combinations(dimensions, 2):
        seen = {(row[first], row[second]) for row in rows}
        missing += [
            ((first, a), (second, b))
            for a in dimensions[first]
            for b in dimensions[second]
            if (a, b) not in seen
        ]
    return missing

"""The picture of a benchmark: one row per strategy, what the upstream saw and what callers got.

Left, over time: the upstream's answers per second (ok, 429) against its capacity, each
tenant's answers per second when the sessions have tenants, and, for a strategy that
reports them in its samples, its concurrency ``limit`` and queue depths (``queue_*`` keys)
on a second axis. Right: how long answered requests took, per class,
with each class's deadline marked. Needs matplotlib (``pip install asyncquota[bench]``);
draws off screen (Agg).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..outcomes import RequestOutcome
from .sessions import CLASSES

if TYPE_CHECKING:
    from .runner import StrategyRun

__all__ = ["plot"]

_CLASS_COLOURS = {"interactive": "tab:blue", "batch": "tab:orange"}
_TENANT_STYLES = ("-.", (0, (1, 1)), (0, (5, 2)))


def _answers_per_second(run: StrategyRun, tenant_code: int) -> tuple[list[int], list[int]]:
    """Seconds, and how many of the tenant's requests were answered in each."""
    log = run.log
    counts: dict[int, int] = {}
    for code, outcome, end in zip(log.tenants, log.outcomes, log.ends, strict=True):
        if code == tenant_code and outcome == RequestOutcome.OK:
            second = int(end)
            counts[second] = counts.get(second, 0) + 1
    seconds = list(range(max(counts, default=0) + 1))
    return seconds, [counts.get(t, 0) for t in seconds]


def _latencies(run: StrategyRun) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {name: [] for name in CLASSES}
    log = run.log
    for class_code, start, end, code in zip(
        log.classes, log.starts, log.ends, log.outcomes, strict=True
    ):
        if code == RequestOutcome.OK:
            latencies[CLASSES[class_code]].append(end - start)
    return latencies


def plot(doc: Mapping[str, Any], runs: Mapping[str, StrategyRun], path: Path) -> None:
    """Draw the runs of one report into a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    deadlines = {"interactive": doc["model"]["interactive_deadline"],
                 "batch": doc["model"]["batch_deadline"]}
    figure, axes = plt.subplots(
        len(names), 2, figsize=(15, 3.2 * len(names)), squeeze=False,
        gridspec_kw={"width_ratios": [2.2, 1]},
    )
    figure.suptitle(
        f"{doc['scenario']}: {doc['sessions']} sessions over {doc['duration_s']:g} s "
        f"({doc['mode']} time)", fontsize=13,
    )
    bins = [0.05 * 1.15**i for i in range(int(math.log(max(deadlines.values()) / 0.05, 1.15)) + 2)]
    for row, name in enumerate(names):
        result = doc["results"][name]
        left, right = axes[row]
        timeline = result["timeline"]
        t = [entry["t"] for entry in timeline]
        left.plot(t, [e["ok"] for e in timeline], color="tab:green", label="upstream ok/s")
        left.plot(t, [e["429"] for e in timeline], color="tab:red", label="upstream 429/s")
        left.plot(t, [e["capacity_rps"] for e in timeline], color="grey", linestyle="--",
                  label="capacity (req/s)")
        for code, tenant in enumerate(doc["model"].get("tenants", ())):
            seconds, answered = _answers_per_second(runs[name], code)
            left.plot(seconds, answered, color="black",
                      linestyle=_TENANT_STYLES[code % len(_TENANT_STYLES)],
                      label=f"{tenant['name']} ok/s ({tenant['tier']})")
        left.set_ylabel("requests / s")
        left.set_title(
            f"{name}: goodput ratio {result['goodput_ratio']:.2f}, "
            f"429 share {100 * result['upstream_429_ratio']:.1f} %, lost {result['lost']}",
            fontsize=10, loc="left",
        )
        left.legend(loc="upper right", fontsize=8)
        internals = sorted(
            {key for s in result["samples"] for key in s if key == "limit" or
             key.startswith("queue_")}
        )
        if internals:
            twin = left.twinx()
            samples = result["samples"]
            for key in internals:
                twin.plot([s["t"] for s in samples if key in s],
                          [s[key] for s in samples if key in s], linestyle=":", label=key)
            twin.set_ylabel("limit / queued")
            twin.legend(loc="upper center", fontsize=8)
        latencies = _latencies(runs[name])
        for cls in CLASSES:
            if latencies[cls]:
                right.hist(latencies[cls], bins=bins, alpha=0.6, color=_CLASS_COLOURS[cls],
                           label=f"{cls} ({len(latencies[cls])} ok)")
            right.axvline(deadlines[cls], color=_CLASS_COLOURS[cls], linestyle="--",
                          linewidth=1)
        right.set_xscale("log")
        right.set_xlabel("latency of answered requests (s); dashed: deadline")
        right.legend(loc="upper right", fontsize=8)
    axes[-1][0].set_xlabel("seconds since the upstream's first request")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)

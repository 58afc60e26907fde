"""What a person sees: the progress bar while it runs, the JSON document, the table.

The JSON document (:func:`document`) has the shape the benchmark issue fixes::

    {"scenario", "sessions", "duration_s", "upstream": {...}, "results": {STRATEGY: {
      "requests", "ok", "ok_in_deadline", "shed", "deadline_exceeded", "errors", "lost",
      "goodput_rps", "goodput_ratio", "upstream_requests", "upstream_429",
      "upstream_429_ratio", "latency_ms": {"interactive": {"p50", "p99"}, "batch": {...}},
      "ok_in_deadline_by_class": {"interactive", "batch"}, "reject_ms": {"p50", "p99"},
      "queue_wait_ms": {"interactive": {"p50", "p99"}, "batch": {...}} | null,
      "queue_wait_source", "cpu_s", "peak_rss_mb", "wall_s", ...}}}

``queue_wait_ms`` is how long first attempts waited from the call to their send, for the
strategies that can tell (asyncquota: the Shaper's admission events; ``queue_wait_source``
says what was measured); null for the others. Plus, per strategy, the outcome counts, the
busy window, the quota over it, the upstream's per-second ``timeline`` and the client's
per-second ``samples``; and at the top the mode, the seed, the session model and the
machine. When the sessions belong to tenants (the
``tiers`` scenario), each strategy's result also has::

    "tenants": {TENANT: {"requests", "ok", "ok_in_deadline", "served_ratio",
      "goodput_rps", "goodput_ratio", "upstream_share", "shed", "tier_refused",
      "deadline_exceeded", "errors", "lost", "reject_ms", "tier_reject_ms", ...}}

(see :func:`~asyncquota.bench.metrics.summarize`), and the table a row per tenant.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..testing import UpstreamConfig
from .metrics import queue_wait_ms, summarize
from .sessions import SessionModel

if TYPE_CHECKING:
    from .runner import StrategyRun

__all__ = ["document", "table"]

def _upstream_description(scenario: str, config: UpstreamConfig) -> dict[str, Any]:
    described = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name != "wall_clock"
    }
    described["schedule"] = [list(step) for step in config.schedule]
    return {"preset": scenario, **described}


def document(
    *,
    scenario: str,
    config: UpstreamConfig,
    model: SessionModel,
    virtual: bool,
    runs: Mapping[str, StrategyRun],
) -> dict[str, Any]:
    """The whole report as JSON-ready data (see the module docstring for its shape)."""
    deadlines = {"interactive": model.interactive_deadline, "batch": model.batch_deadline}
    results: dict[str, Any] = {}
    for name, run in runs.items():
        result = summarize(
            run.log,
            config=config,
            deadlines=deadlines,
            upstream_totals=run.upstream.get("totals", {}),
            stopped_at=run.stopped_at,
            tenants=[tenant.name for tenant in model.tenants],
        )
        result["queue_wait_ms"] = queue_wait_ms(run.queue_waits)
        result["queue_wait_source"] = run.queue_wait_source
        result["cpu_s"] = round(run.cpu_s, 2)
        result["peak_rss_mb"] = round(run.peak_rss_mb, 1)
        result["wall_s"] = round(run.wall_s, 2)
        result["timeline"] = run.upstream.get("timeline", [])
        result["samples"] = run.samples
        results[name] = result
    return {
        "scenario": scenario,
        "sessions": model.sessions,
        "duration_s": model.duration,
        "mode": "virtual" if virtual else "real",
        "seed": model.seed,
        "model": {
            f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init
        } | {"tenants": [dataclasses.asdict(tenant) for tenant in model.tenants]},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "upstream": _upstream_description(scenario, config),
        "results": results,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


_COLUMNS = (
    ("strategy", "<11"), ("requests", ">8"), ("ok", ">7"), ("in dl", ">7"), ("shed", ">6"),
    ("deadline", ">8"), ("errors", ">7"), ("lost", ">5"), ("good/s", ">7"), ("ratio", ">6"),
    ("429 %", ">6"), ("p99 int", ">8"), ("p99 bat", ">8"), ("wait p50", ">8"),
    ("wait p99", ">8"), ("rej p99", ">8"), ("cpu s", ">6"), ("rss MB", ">7"), ("wall s", ">7"),
)


_TENANT_COLUMNS = (
    ("strategy", "<11"), ("tenant", "<8"), ("tier", "<12"), ("requests", ">8"),
    ("in dl", ">7"), ("served", ">7"), ("good/s", ">7"), ("of quota", ">8"),
    ("ok share", ">8"), ("shed", ">7"),
    ("by tier", ">7"), ("deadline", ">8"), ("errors", ">7"), ("lost", ">5"), ("rej p99", ">8"),
    ("tier p99", ">8"),
)


def _row(cells: tuple[Any, ...], columns: tuple[tuple[str, str], ...]) -> str:
    return " ".join(format(cell, spec) for cell, (_, spec) in zip(cells, columns, strict=True))


def _tier(tenant: Mapping[str, Any]) -> str:
    quota = tenant["tier_quota"]
    return f"{tenant['tier']} {'any' if quota is None else format(quota, '.0%')}"


def _tenant_table(doc: Mapping[str, Any]) -> list[str]:
    """Per strategy, a row per tenant: what it asked, what it got, what its tier refused."""
    tenants = {tenant["name"]: tenant for tenant in doc["model"]["tenants"]}
    header = " ".join(format(title, spec) for title, spec in _TENANT_COLUMNS)
    lines = [
        "",
        "per tenant (tier: its requests per minute as a share of the upstream's; of quota: "
        "answered in deadline / the upstream's quota over the run; ok share: of the "
        "upstream's successful replies)",
        header,
        "-" * len(header),
    ]
    for name, r in doc["results"].items():
        for tenant, t in r["tenants"].items():
            cells = (
                name, tenant, _tier(tenants[tenant]), t["requests"], t["ok_in_deadline"],
                _fmt(100 * t["served_ratio"], ".1f") + " %", _fmt(t["goodput_rps"], ".1f"),
                _fmt(100 * t["goodput_ratio"], ".1f") + " %",
                _fmt(100 * t["upstream_share"], ".1f") + " %", t["shed"], t["tier_refused"],
                t["deadline_exceeded"], t["errors"], t["lost"],
                _fmt(t["reject_ms"]["p99"], ".0f"), _fmt(t["tier_reject_ms"]["p99"], ".0f"),
            )
            lines.append(_row(cells, _TENANT_COLUMNS))
    return lines


def _interactive_wait(result: Mapping[str, Any]) -> tuple[str, str]:
    """The interactive queue wait's p50 and p99 cells (``-`` when not measured)."""
    waits = result.get("queue_wait_ms")
    if waits is None:
        return "-", "-"
    return _fmt(waits["interactive"]["p50"], ".0f"), _fmt(waits["interactive"]["p99"], ".0f")


def table(doc: Mapping[str, Any]) -> str:
    """The results as a fixed-width text table, one row per strategy, latencies in ms.

    ``wait p50``/``wait p99``: interactive queue wait (call to send), where measured.

    With tenants, a second table follows: a row per strategy and tenant.
    """
    header = " ".join(format(title, spec) for title, spec in _COLUMNS)
    lines = [
        f"{doc['scenario']}: {doc['sessions']} sessions, {doc['duration_s']:g} s, "
        f"{doc['mode']} time, seed {doc['seed']}",
        header,
        "-" * len(header),
    ]
    for name, r in doc["results"].items():
        cells = (
            name, r["requests"], r["ok"], r["ok_in_deadline"], r["shed"],
            r["deadline_exceeded"], r["errors"], r["lost"], _fmt(r["goodput_rps"], ".1f"),
            _fmt(r["goodput_ratio"], ".3f"), _fmt(100 * r["upstream_429_ratio"], ".1f"),
            _fmt(r["latency_ms"]["interactive"]["p99"], ".0f"),
            _fmt(r["latency_ms"]["batch"]["p99"], ".0f"),
            *_interactive_wait(r), _fmt(r["reject_ms"]["p99"], ".0f"), _fmt(r["cpu_s"], ".1f"),
            _fmt(r["peak_rss_mb"], ".0f"), _fmt(r["wall_s"], ".1f"),
        )
        lines.append(_row(cells, _COLUMNS))
    if doc["model"].get("tenants"):
        lines.extend(_tenant_table(doc))
    return "\n".join(lines)

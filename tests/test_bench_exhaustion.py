"""The 2 a.m. night's scenario: its figures from a known log, and a short night on virtual time."""

from __future__ import annotations

from array import array
from dataclasses import replace

import pytest

from asyncquota.bench.exhaustion import (
    GatewaySpec,
    Served,
    exhaustion_document,
    exhaustion_figures,
    exhaustion_table,
    fallback_config,
    run_gateway,
)
from asyncquota.bench.metrics import RequestLog
from asyncquota.bench.sessions import SessionModel
from asyncquota.bench.strategies.fallback import reply_dialect
from asyncquota.cli import main
from asyncquota.outcomes import RequestOutcome
from asyncquota.testing import UpstreamConfig

INTERACTIVE, BATCH = 0, 1
PRIMARY, FALLBACK = 0, 1

# A night on the clock of its log: the primary's first request at 1.0 s, so its window
# (20 s, 45 s) is 21.0 s to 46.0 s here; its first refusal at 20.05 s is 21.05 s.
UPSTREAM = UpstreamConfig(rps=10.0, exhausted=((20.0, 45.0),))
WINDOW = {"start": 20.0, "end": 45.0, "refused": 3, "first_refused_at": 20.05}
ROWS = [
    (INTERACTIVE, 1.0, 1.5, RequestOutcome.OK),  # the primary
    (BATCH, 2.0, 3.0, RequestOutcome.OK),  # the primary
    (INTERACTIVE, 21.0, 21.1, RequestOutcome.HTTP_ERROR),  # the spend cap, passed on
    (INTERACTIVE, 21.2, 21.6, RequestOutcome.OK),  # the fallback
    (INTERACTIVE, 30.0, 40.0, RequestOutcome.OK),  # the fallback
    (INTERACTIVE, 46.0, 46.5, RequestOutcome.OK),  # the primary, back
    (BATCH, 50.0, None, None),  # lost at the hard stop (60 s)
]
SERVED = Served(
    array("d", [1.5, 3.0, 21.6, 40.0, 46.5]),
    array("b", [INTERACTIVE, BATCH, INTERACTIVE, INTERACTIVE, INTERACTIVE]),
    array("b", [PRIMARY, PRIMARY, FALLBACK, FALLBACK, PRIMARY]),
)


def figures(**overrides: object) -> dict[str, object]:
    arguments: dict[str, object] = {
        "served": SERVED,
        "window": WINDOW,
        "primary": UPSTREAM,
        "fallback": fallback_config(UPSTREAM),
        "stopped_at": 60.0,
        "alerts": ([21.05, 21.3, 47.0], ["exhausted", "fallback", "recovered"]),
    }
    arguments.update(overrides)
    return exhaustion_figures(RequestLog.from_rows(ROWS), **arguments)  # type: ignore[arg-type]


def test_the_figures_of_a_known_night_on_a_gateway():
    # Interactive from 1.0 s to 46.5 s: 45.5 s. The primary admits 10/s outside its 25 s
    # window (205), the fallback 5/s throughout (227.5).
    assert figures() == {
        "dies_at": 21.0,
        "returns_at": 46.0,
        "first_exhaustion": 21.05,
        "refused_as_exhausted": 3,
        "switch_over_s": 0.55,  # 21.05 → the fallback's first reply at 21.6
        "switch_back_s": 0.5,  # 46.0 → the primary's first reply after it at 46.5
        "interactive": {
            "requests": 5,
            "served": 4,
            "by_model": {"primary": 2, "fallback": 2},
            "allowed": 5.0,
            "served_ratio": 0.8,
        },
        # Started in 21.0–46.0: three interactive; the fallback replied twice in it, and
        # alone admits 125 then.
        "during": {"requests": 3, "served": 2, "allowed": 3.0, "served_ratio": 0.6667},
        "capacity_requests": 432.5,
        "lost": 1,
        "alerts": {
            "count": 3,
            "by_kind": {"exhausted": 1, "fallback": 1, "recovered": 1},
            "first_after_exhaustion_s": 0.0,
        },
        "wrong_shape": {"primary": 0, "fallback": 0},
        "targets": {"served_ratio": False, "switch_over_s": True, "lost": False,
                    "alert_s": True},
    }


def test_the_window_counts_the_fallbacks_replies_in_it_whoever_asked_before_it():
    # Asked at 20.9 s, just before the window, on a fallback already serving: its reply at
    # 21.2 s is the fallback's capacity in the window at work, not capacity left unused.
    rows = [*ROWS, (INTERACTIVE, 20.9, 21.2, RequestOutcome.OK)]
    served = Served(
        array("d", [*SERVED.at[:2], 21.2, *SERVED.at[2:]]),
        array("b", [*SERVED.classes[:2], INTERACTIVE, *SERVED.classes[2:]]),
        array("b", [*SERVED.models[:2], FALLBACK, *SERVED.models[2:]]),
    )
    night = exhaustion_figures(
        RequestLog.from_rows(rows),
        served=served,
        window=WINDOW,
        primary=UPSTREAM,
        fallback=fallback_config(UPSTREAM),
        stopped_at=60.0,
    )
    assert night["during"] == {"requests": 3, "served": 3, "allowed": 3.0, "served_ratio": 1.0}


def test_a_peer_knows_only_the_primary_so_it_never_switches_and_has_no_alerts():
    peer = figures(served=None, alerts=None)
    assert (peer["switch_over_s"], peer["switch_back_s"], peer["alerts"]) == (None, 0.5, None)
    assert peer["interactive"]["by_model"] == {"primary": 4, "fallback": 0}  # type: ignore[index]
    assert peer["targets"]["alert_s"] is False  # type: ignore[index]


def test_an_alert_before_the_first_exhaustion_does_not_count_as_its_alarm():
    late = figures(alerts=([5.0, 22.3], ["usage", "exhausted"]))
    assert late["alerts"] == {"count": 2, "by_kind": {"exhausted": 1, "usage": 1},
                              "first_after_exhaustion_s": 1.25}
    assert late["targets"]["alert_s"] is False  # type: ignore[index]


def test_only_the_exhausted_alert_is_the_alarm_not_a_usage_alert_that_follows():
    # A usage alert 0.05 s after the exhaustion is no alarm; the exhausted one at 22.3 s is.
    late = figures(alerts=([21.1, 22.3], ["usage", "exhausted"]))
    assert late["alerts"]["first_after_exhaustion_s"] == 1.25  # type: ignore[index]
    assert late["targets"]["alert_s"] is False  # type: ignore[index]


def test_a_demand_above_the_capacity_is_measured_against_the_capacity():
    small = replace(UPSTREAM, rps=0.04)  # 0.04/s outside the window, 0.02/s on the fallback
    measured = figures(primary=small, fallback=fallback_config(small))
    # 0.04 × 20.5 s + 0.02 × 45.5 s = 1.73 requests allowed; 4 served.
    assert measured["interactive"]["allowed"] == 1.7  # type: ignore[index]
    assert measured["interactive"]["served_ratio"] == pytest.approx(4 / 1.73, abs=1e-4)  # type: ignore[index]


def test_the_fallback_has_half_the_primarys_capacity_in_the_openai_dialect_and_is_never_spent():
    primary = UpstreamConfig.preset("exhaustion")
    fallback = fallback_config(primary)
    assert (fallback.rps, fallback.tpm, fallback.max_concurrency) == (150.0, 4_500_000.0, 64)
    assert (fallback.headers_style, fallback.retry_after_style, fallback.exhausted) == (
        "openai", "seconds", ()
    )


def test_a_reply_is_read_as_the_dialect_its_shape_says():
    assert reply_dialect({"choices": [], "usage": {}}) == "openai"
    assert reply_dialect({"type": "message", "content": []}) == "anthropic"
    assert reply_dialect({"type": "error"}) is None


def test_the_tuner_does_not_take_the_exhaustion_night():
    with pytest.raises(SystemExit):
        main(["tune", "--scenario", "exhaustion", "--param", "retry_budget=0.1"])


async def test_a_short_night_on_virtual_time_ends_every_request_and_reports_it():
    # A tenth of the crisis, dead from 10 s to 20 s, for 30 s.
    primary = UpstreamConfig.preset("exhaustion", rps=30.0, tpm=None, max_concurrency=16,
                                    exhausted=((10.0, 20.0),))
    model = SessionModel(sessions=300, duration=30.0, spike=2.0, think_mean=5.0,
                         batch_deadline=20.0)
    spec = GatewaySpec(primary=primary, fallback=fallback_config(primary), model=model,
                       virtual=True)
    night = await run_gateway(spec)
    log = night.run.log
    assert log.open == 0 and len(log) > 300
    window = night.run.upstream["exhausted"][0]
    assert window["refused"] > 0 and 10.0 <= window["first_refused_at"] < 10.1
    # Every reply a caller read is in the log as an answer, with its model.
    assert len(night.served.at) == log.ok == night.run.upstream["totals"]["ok"] + (
        night.fallback["totals"]["ok"]
    ) - sum(night.wrong_shape)
    doc = exhaustion_document(primary=primary, model=model, virtual=True,
                              runs={"asyncquota": night.run}, gateway=night)
    figures = doc["results"]["asyncquota"]["exhaustion"]
    interactive = figures["interactive"]
    assert sum(interactive["by_model"].values()) == interactive["served"]
    assert figures["fallback"] == night.fallback["totals"]
    assert figures["lost"] == 0
    assert "asyncquota" in exhaustion_table(doc).splitlines()[-1]

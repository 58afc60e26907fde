"""The ``tiers`` scenario: two tenants share the crisis upstream, one floods, the other keeps
its share under asyncquota's gateway, and every strategy is reported per tenant."""

from __future__ import annotations

import hashlib
import statistics
from pathlib import Path

import orjson
import pytest

from asyncquota.bench import RequestLog, SessionModel, summarize
from asyncquota.bench.report import document, table
from asyncquota.bench.runner import RunSpec, run_strategy
from asyncquota.bench.sessions import SCENARIO_TENANTS, Tenant
from asyncquota.bench.strategies import STRATEGIES, Target
from asyncquota.bench.strategies.shaper import ShaperStrategy, tier_limits
from asyncquota.cli import main
from asyncquota.errors import QueueFullError, TenantLimitError
from asyncquota.outcomes import RequestOutcome, classify
from asyncquota.testing import PRESETS, UpstreamConfig

TIERS = SCENARIO_TENANTS["tiers"]
ACME, FLOOD = TIERS
DEADLINES = {"interactive": 10.0, "batch": 120.0}
INTERACTIVE, BATCH = 0, 1

# -- the crowd ---------------------------------------------------------------------------


def _night_digest(model: SessionModel, sessions: int = 2_000, turns: int = 5) -> str:
    digest = hashlib.sha256()
    for i in range(sessions):
        session = model.session(i)
        digest.update(f"{session.priority}{session.first_at!r}".encode())
        for n in range(turns):
            turn = model.turn(i, n)
            digest.update(f"{turn.max_tokens}{turn.think!r}".encode())
    return digest.hexdigest()


def test_the_other_scenarios_draw_the_same_night_as_before_tenants_existed():
    # Digests taken before tenants were added to the session model.
    assert _night_digest(SessionModel(seed=0)) == (
        "1752444d00bc7ceab83aa3603c13cc8e3987d693a81c9460821d224f9919450d"
    )
    assert _night_digest(SessionModel(seed=7)) == (
        "9d36fc10fad7d360a91feff020f9231a69505d7c45c8a3062c423d94bc7edfff"
    )
    model = SessionModel(seed=7)
    session = model.session(17)
    assert (session.priority, session.first_at, session.tenant) == (
        "batch", 3.0755255877666188, None
    )
    assert (model.turn(17, 2).max_tokens, model.turn(17, 2).think) == (147, 0.28993528178598327)
    assert model.call(session, model.turn(17, 2)).tenant is None


def test_tenants_leave_every_other_draw_of_a_session_as_it_was():
    plain, shared = SessionModel(seed=3), SessionModel(seed=3, tenants=TIERS)
    for i in range(200):
        a, b = plain.session(i), shared.session(i)
        assert (a.priority, a.first_at) == (b.priority, b.first_at)
        assert plain.turn(i, 1).max_tokens == shared.turn(i, 1).max_tokens


def test_sessions_are_split_by_the_tenants_shares_and_think_at_their_tenants_pace():
    model = SessionModel(sessions=20_000, seed=7, tenants=TIERS)
    sessions = [model.session(i) for i in range(model.sessions)]
    acme = [s for s in sessions if s.tenant == "acme"]
    assert {s.tenant for s in sessions} == {"acme", "flood"}
    assert len(acme) / len(sessions) == pytest.approx(ACME.share, abs=0.005)
    # Each tenant's sessions keep the night's class mix.
    assert sum(s.priority == "interactive" for s in acme) / len(acme) == pytest.approx(
        0.7, abs=0.03
    )
    for tenant in TIERS:
        theirs = [s for s in sessions if s.tenant == tenant.name][:1_000]
        thinks = [model.turn(s.index, n).think for s in theirs for n in range(10)]
        assert statistics.mean(thinks) == pytest.approx(tenant.think_mean, rel=0.05)
    call = model.call(acme[0], model.turn(acme[0].index, 0))
    assert call.tenant == "acme"


def test_the_tiers_fit_the_upstream_together_and_the_flood_speaks_three_times_as_often():
    assert ACME.tier_quota is not None and FLOOD.tier_quota is not None
    assert ACME.tier_quota + FLOOD.tier_quota == pytest.approx(1.0)
    assert FLOOD.share > ACME.share and FLOOD.think_mean * 3 == ACME.think_mean
    assert PRESETS["tiers"] == PRESETS["crisis"]


@pytest.mark.parametrize(
    ("tenants", "words"),
    [
        ((Tenant(name="a", share=0.5, think_mean=1.0, tier="t"),), "add up to 1"),
        (
            (Tenant(name="a", share=0.5, think_mean=1.0, tier="t"),
             Tenant(name="a", share=0.5, think_mean=1.0, tier="t")),
            "names must differ",
        ),
        (
            (Tenant(name="a", share=0.5, think_mean=1.0, tier="t", tier_quota=0.2),
             Tenant(name="b", share=0.5, think_mean=1.0, tier="t", tier_quota=0.3)),
            "given two quotas",
        ),
    ],
)
def test_a_crowd_refuses_tenants_that_do_not_make_sense_together(tenants, words):
    with pytest.raises(ValueError, match=words):
        SessionModel(tenants=tenants)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"name": ""}, "name must be a non-empty string"),
        ({"share": 0.0}, "share must be in"),
        ({"think_mean": -1.0}, "think_mean must be a positive number"),
        ({"tier_quota": 1.5}, "tier_quota must be in"),
    ],
)
def test_a_tenant_refuses_nonsense(fields, words):
    good = {"name": "a", "share": 1.0, "think_mean": 1.0, "tier": "t"}
    with pytest.raises(ValueError, match=words):
        Tenant(**(good | fields))


# -- the figures -------------------------------------------------------------------------


def test_a_tier_refusal_is_its_own_outcome_and_still_counts_as_shed():
    refusal = TenantLimitError("over", dimension="rpm", model="simulated", tenant="flood")
    assert classify(refusal) == RequestOutcome.TENANT_LIMIT
    assert classify(QueueFullError("full")) == RequestOutcome.SHED


def test_per_tenant_figures_of_a_hand_built_night():
    acme, flood = 0, 1
    log = RequestLog.from_rows(
        [
            (INTERACTIVE, 0.0, 1.0, RequestOutcome.OK),
            (BATCH, 0.0, 4.0, RequestOutcome.OK),
            (INTERACTIVE, 1.0, 11.5, RequestOutcome.DEADLINE_EXCEEDED),
            (INTERACTIVE, 0.0, 2.0, RequestOutcome.OK),
            (INTERACTIVE, 1.0, 1.0, RequestOutcome.TENANT_LIMIT),
            (BATCH, 2.0, 2.5, RequestOutcome.SHED),
            (BATCH, 3.0, 3.0, RequestOutcome.TENANT_LIMIT),
            (BATCH, 5.0, 10.0, RequestOutcome.THROTTLED),
        ],
        tenant_codes=[acme, acme, acme, flood, flood, flood, flood, flood],
    )
    result = summarize(
        log,
        config=UpstreamConfig(rps=1.0),
        deadlines=DEADLINES,
        upstream_totals={"requests": 12, "ok": 4, "429": 1},
        stopped_at=12.0,
        tenants=["acme", "flood"],
    )
    # The busy window runs from 0 to 11.5 s: 11.5 requests of quota at 1 req/s.
    assert result["shed"] == 3 and result["outcomes"]["tenant_limit"] == 2
    acme_figures, flood_figures = result["tenants"]["acme"], result["tenants"]["flood"]
    assert acme_figures == acme_figures | {
        "requests": 3, "ok": 2, "ok_in_deadline": 2, "served_ratio": 0.6667,
        "deadline_exceeded": 1, "shed": 0, "tier_refused": 0, "upstream_share": 0.5,
        "goodput_rps": 0.17, "goodput_ratio": 0.1739,
        "reject_ms": {"p50": None, "p99": None},
    }
    assert flood_figures == flood_figures | {
        "requests": 5, "ok": 1, "ok_in_deadline": 1, "served_ratio": 0.2, "errors": 1,
        "shed": 3, "tier_refused": 2, "upstream_share": 0.25, "goodput_rps": 0.09,
        "reject_ms": {"p50": 0.0, "p99": 500.0}, "tier_reject_ms": {"p50": 0.0, "p99": 0.0},
        "lost": 0,
    }
    assert acme_figures["ok_in_deadline"] + flood_figures["ok_in_deadline"] == (
        result["ok_in_deadline"]
    )


def test_a_night_without_tenants_reports_none():
    log = RequestLog.from_rows([(INTERACTIVE, 0.0, 1.0, RequestOutcome.OK)])
    result = summarize(log, config=UpstreamConfig(), deadlines=DEADLINES,
                       upstream_totals={}, stopped_at=1.0)
    assert "tenants" not in result
    assert log.tenants.tolist() == [-1]


def test_rows_and_tenant_codes_must_pair_up():
    with pytest.raises(ValueError):
        RequestLog.from_rows([(INTERACTIVE, 0.0, 1.0, RequestOutcome.OK)], tenant_codes=[0, 1])


# -- the gateway strategy ----------------------------------------------------------------


def test_each_tier_is_its_share_of_the_upstreams_requests_per_minute():
    assert tier_limits(FLOOD, requests_per_minute=18_000).rpm == pytest.approx(5_400)
    assert tier_limits(ACME, requests_per_minute=18_000).rpm == pytest.approx(12_600)
    unlimited = Tenant(name="x", share=1.0, think_mean=1.0, tier="open")
    assert tier_limits(unlimited, requests_per_minute=18_000).unlimited


async def test_through_the_gateway_the_flood_is_refused_at_once_past_its_tier():
    # 10 requests/s upstream: the free tier admits 30 % of 600 a minute, 180.
    config = UpstreamConfig.preset("tiers", rps=10.0, wall_clock=lambda: 1_800_000_000.0)
    target = Target("http://simulated.upstream", config, _instant, tenants=TIERS)
    model = SessionModel(sessions=1, tenants=TIERS)
    flood = next(model.session(i) for i in range(100) if model.session(i).tenant == "flood")
    call = model.call(flood, model.turn(flood.index, 0))
    async with ShaperStrategy(target) as strategy:
        for _ in range(180):
            await strategy.complete(call)
        with pytest.raises(TenantLimitError) as refused:
            await strategy.complete(call)
    assert refused.value.tenant == "flood" and refused.value.dimension == "rpm"
    assert refused.value.retry_after is not None and refused.value.retry_after > 0


async def _instant(request):
    from asyncquota.transport import Response

    usage = {"prompt_tokens": 100, "completion_tokens": 100, "total_tokens": 200}
    return Response(200, {"content-type": "application/json"},
                    orjson.dumps({"choices": [], "usage": usage}))


# -- a small night, every strategy -------------------------------------------------------


@pytest.fixture(scope="module")
def small_night() -> dict:
    """400 sessions over 10 s against a 10 requests/s upstream, each strategy in process."""
    config = UpstreamConfig.preset("tiers", rps=10.0)
    model = SessionModel(sessions=400, duration=10.0, tenants=TIERS)
    runs = {
        name: run_strategy(RunSpec(strategy=name, config=config, model=model, virtual=True))
        for name in STRATEGIES
    }
    doc = document(scenario="tiers", config=config, model=model, virtual=True, runs=runs)
    loaded: dict = orjson.loads(orjson.dumps(doc))
    return loaded


def test_every_strategy_reports_each_tenant_and_loses_nothing(small_night: dict):
    assert [t["name"] for t in small_night["model"]["tenants"]] == ["acme", "flood"]
    for name, result in small_night["results"].items():
        assert result["lost"] == 0, name
        tenants = result["tenants"]
        assert tenants.keys() == {"acme", "flood"}, name
        for tenant, figures in tenants.items():
            assert figures["lost"] == 0, (name, tenant)
            ended = (figures["ok"] + figures["shed"] + figures["deadline_exceeded"]
                     + figures["errors"])
            assert ended == figures["requests"] > 0, (name, tenant)
        assert sum(t["requests"] for t in tenants.values()) == result["requests"], name
        assert sum(t["ok"] for t in tenants.values()) <= result["upstream_ok"], name


def test_only_asyncquota_refuses_the_flood_by_its_tier(small_night: dict):
    results = small_night["results"]
    for name, result in results.items():
        refused = result["tenants"]["flood"]["tier_refused"]
        assert (refused > 0) == (name == "asyncquota"), name
        assert result["tenants"]["acme"]["tier_refused"] == 0, name
    flood = results["asyncquota"]["tenants"]["flood"]
    assert flood["tier_reject_ms"]["p99"] == 0.0  # told at once
    # The free tier's 180 requests a minute is all the flood got through.
    assert flood["ok"] <= 180


def test_under_asyncquota_acme_gets_what_it_asks_and_the_flood_does_not_take_it(
    small_night: dict,
):
    results = small_night["results"]
    acme = results["asyncquota"]["tenants"]["acme"]
    assert acme["served_ratio"] >= 0.95
    for name in ("naive", "tenacity", "cookbook", "openai-sdk"):
        assert acme["served_ratio"] > results[name]["tenants"]["acme"]["served_ratio"], name


def test_the_table_has_a_row_per_strategy_and_tenant(small_night: dict):
    printed = table(small_night)
    tenant_rows = [line.split() for line in printed.splitlines()
                   if line.split()[:1] and line.split()[0] in STRATEGIES
                   and line.split()[1] in {"acme", "flood"}]
    assert [(row[0], row[1]) for row in tenant_rows] == [
        (name, tenant) for name in STRATEGIES for tenant in ("acme", "flood")
    ]


def test_the_command_runs_the_tiers_scenario(tmp_path: Path, capsys):
    out, picture = tmp_path / "tiers.json", tmp_path / "tiers.png"
    status = main([
        "bench", "--virtual", "--scenario", "tiers", "--sessions", "200", "--duration", "5",
        "--strategies", "asyncquota,naive", "--json", str(out), "--plot", str(picture),
    ])
    assert status == 0
    doc = orjson.loads(out.read_bytes())
    assert doc["scenario"] == "tiers" and doc["upstream"]["rps"] == 300.0
    for result in doc["results"].values():
        assert result["tenants"].keys() == {"acme", "flood"}
        assert result["lost"] == 0
    assert capsys.readouterr().out.strip() == table(doc)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

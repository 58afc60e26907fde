"""The robustness matrix: its covering set, its rows' upstreams and nights, its figures, a run."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from asyncquota.bench.matrix import (
    DIMENSIONS,
    TARGETS,
    matrix_rows,
    matrix_table,
    repeated_document,
    row_figures,
    run_matrix,
)
from asyncquota.bench.metrics import queue_wait_ms
from asyncquota.bench.pairwise import all_pairs, uncovered_pairs
from asyncquota.bench.strategies.shaper import QueueWaits
from asyncquota.cli import main
from asyncquota.hooks import Admitted, Queued
from asyncquota.priority import Priority
from asyncquota.testing import UpstreamConfig

# -- the covering set --------------------------------------------------------------------


def test_the_matrix_rows_cover_every_pair_of_values_of_two_dimensions_in_20_rows():
    rows = all_pairs(DIMENSIONS)
    assert uncovered_pairs(DIMENSIONS, rows) == []
    # 5 header dialects x 4 Retry-After styles: no covering set has fewer rows.
    assert len(rows) == 20
    assert all(row[name] in DIMENSIONS[name] for row in rows for name in DIMENSIONS)
    assert len({tuple(row.values()) for row in rows}) == len(rows)
    assert all_pairs(DIMENSIONS) == rows  # the same rows every time


@pytest.mark.parametrize(
    ("sizes", "most"),
    [((2, 2, 2), 4), ((3, 3, 3, 3), 12), ((2,) * 10, 11), ((4, 1, 3), 12), ((6, 2), 12)],
)
def test_all_pairs_covers_any_dimensions_with_few_rows(sizes: tuple[int, ...], most: int):
    dimensions = {f"d{i}": [f"v{j}" for j in range(size)] for i, size in enumerate(sizes)}
    rows = all_pairs(dimensions)
    assert uncovered_pairs(dimensions, rows) == []
    assert len(rows) <= most
    # At least the product of the two largest dimensions: every such pair needs a row.
    largest = sorted(sizes)[-2:]
    assert len(rows) >= largest[0] * largest[1]


def test_uncovered_pairs_names_what_a_set_of_rows_misses():
    dimensions = {"a": [0, 1], "b": ["x", "y"], "c": [True, False]}
    rows = [{"a": 0, "b": "x", "c": True}, {"a": 1, "b": "y", "c": True},
            {"a": 0, "b": "y", "c": False}]
    assert uncovered_pairs(dimensions, rows) == [
        (("a", 1), ("b", "x")), (("a", 1), ("c", False)), (("b", "x"), ("c", False)),
    ]


def test_one_dimension_is_a_row_per_value_and_an_empty_one_is_refused():
    assert all_pairs({"a": [1, 2, 3]}) == [{"a": 1}, {"a": 2}, {"a": 3}]
    with pytest.raises(ValueError, match="b has none"):
        all_pairs({"a": [1], "b": []})


# -- the rows ----------------------------------------------------------------------------


def test_each_row_plays_its_behaviour_on_the_issues_base():
    rows = matrix_rows(seed=4)
    assert [row.number for row in rows] == list(range(1, 21))
    assert dict(rows[0].behaviour) == {
        "headers": "openai-ms", "retry_after": "seconds", "capacity": "constant",
        "refused": "counted", "penalty": "off", "replies": "short", "skew": "0",
    }
    for row in rows:
        b, config, model = row.behaviour, row.config, row.model
        assert (config.rps, config.burst_seconds, config.seed, model.seed) == (100, 1, 4, 4)
        assert config.retry_after_style == b["retry_after"]
        assert config.count_rejected == (b["refused"] == "counted")
        assert config.penalty == (b["penalty"] == "on")
        assert config.clock_skew == {"0": 0.0, "+3": 3.0}[b["skew"]]
        assert config.headers_style == b["headers"].partition("-")[0]
        if b["headers"].startswith("openai"):
            assert config.reset_resolution == b["headers"].partition("-")[2]
        if b["headers"].startswith("anthropic"):
            assert config.limit_header == ("per_minute" if "minute" in b["headers"] else "bucket")
        assert config.schedule == {
            "constant": (), "halves": ((10, 0.5), (20, 1.0)), "doubles": ((10, 2.0),)
        }[b["capacity"]]
        doubled = 2 if b["capacity"] == "doubles" else 1
        if b["replies"] == "short":
            assert config.reply_seconds == (0.15, 0.5)
            assert config.max_concurrency == 48 * doubled
            assert (model.sessions, model.interactive_deadline, model.batch_deadline) == (
                5_000, 10.0, 120.0)
            assert row.shaper_options == ()
        else:
            assert config.reply_seconds == (5.0, 30.0)
            assert config.max_concurrency == 3_000 * doubled
            assert (model.sessions, model.interactive_deadline, model.batch_deadline) == (
                10_000, 40.0, 150.0)
            assert row.shaper_options == (("max_connections", config.max_concurrency),)
        assert (model.duration, model.think_mean) == (30.0, 10.0)
    assert len({row.label for row in rows}) == 20


# -- the figures -------------------------------------------------------------------------


def result(**overrides):
    base = {
        "requests": 1_000, "ok_in_deadline": 2_850, "upstream_429_ratio": 0.01,
        "deadline_exceeded": 5, "reject_ms": {"p50": 0.1, "p99": 2.0},
        "queue_wait_ms": None, "cpu_s": 1.5, "lost": 0,
        "timeline": [{"t": t, "admitted_ok": 95} for t in range(40)],
    }
    return base | overrides


def test_goodput_is_over_the_quota_until_the_last_admission_or_the_nights_end():
    config = UpstreamConfig(rps=100, schedule=((10, 0.5), (20, 1.0)))
    figures = row_figures(result(), {"last_admitted_at": 20.0}, config=config, duration=30)
    # 30 s of quota, 10 of them at half the rate: 2 500 requests.
    assert figures["goodput"] == 1.14
    assert figures["quota_window_s"] == 30
    later = row_figures(result(), {"last_admitted_at": 40.0}, config=config, duration=30)
    assert later["goodput"] == round(2_850 / 3_500, 4)
    # The first 10 s: what was admitted then and answered, by admission time.
    assert figures["goodput_10s"] == 0.95
    assert figures["deadline_share"] == 0.005
    assert (figures["share_429"], figures["refusal_p99_ms"], figures["lost"]) == (0.01, 2.0, 0)
    assert figures["misses"] == []


def test_a_row_names_every_target_it_misses():
    config = UpstreamConfig(rps=100)
    bad = result(ok_in_deadline=2_000, upstream_429_ratio=0.03, deadline_exceeded=11, lost=1,
                 timeline=[{"t": t, "admitted_ok": 89} for t in range(30)])
    figures = row_figures(bad, {"last_admitted_at": 30.0}, config=config, duration=30)
    assert figures["misses"] == list(TARGETS)
    edge = result(ok_in_deadline=2_850, upstream_429_ratio=0.02, deadline_exceeded=10,
                  timeline=[{"t": t, "admitted_ok": 90} for t in range(30)])
    assert row_figures(edge, {"last_admitted_at": None}, config=config, duration=30)[
        "misses"] == []


def figures_of(goodput: float, share_429: float, lost: int = 0) -> dict:
    """A strategy's row figures as ``row_figures`` gives them, the bench's result left out."""
    waits = {"interactive": {"p50": 400.0 * goodput, "p99": 900.0}, "batch": {
        "p50": 1_000.0, "p99": 9_000.0}}
    figures = {"goodput": goodput, "goodput_10s": 0.95, "share_429": share_429,
               "deadline_share": 0.0, "queue_wait_ms": waits, "refusal_p99_ms": 500.0,
               "cpu_s": 3.0, "lost": lost, "bench": {"timeline": []}}
    comparisons = {name: value for name, value in figures.items() if name in TARGETS}
    figures["misses"] = [name for name, (op, bound) in TARGETS.items() if not (
        comparisons[name] >= bound if op == ">=" else comparisons[name] <= bound)]
    return figures


def entries_of(*figures: dict) -> list[dict]:
    behaviour = {name: values[0] for name, values in DIMENSIONS.items()}
    return [{"row": number, "behaviour": behaviour, "label": f"row {number}", "upstream": {},
             "model": {}, "shaper_options": [], "results": {"asyncquota": f}}
            for number, f in enumerate(figures, start=1)]


def test_repeated_runs_fold_into_medians_judged_on_the_targets_and_a_count_of_runs_met():
    runs = [
        entries_of(figures_of(0.99, 0.010), figures_of(0.93, 0.030)),
        entries_of(figures_of(0.94, 0.012), figures_of(0.96, 0.010)),
        entries_of(figures_of(0.97, 0.025, lost=1), figures_of(0.92, 0.031)),
    ]
    doc = repeated_document(runs, virtual=False, seeds=[0, 1, 2])
    assert (doc["mode"], doc["seed"], doc["seeds"], doc["repeat"]) == ("real", 0, [0, 1, 2], 3)
    assert doc["runs"] == runs  # every run whole, the bench's results with it
    first, second = (entry["results"]["asyncquota"] for entry in doc["rows"])
    # Row 1: medians 0.97 of the quota and 1.2 % of 429s; the most any run lost is 1.
    assert (first["goodput"], first["share_429"], first["lost"]) == (0.97, 0.012, 1)
    assert first["misses"] == ["lost"]
    assert first["met"] == 1  # only the second run met every target
    assert first["queue_wait_ms"]["interactive"] == {"p50": 388.0, "p99": 900.0}
    assert [run["goodput"] for run in first["runs"]] == [0.99, 0.94, 0.97]
    assert all("bench" not in run for run in first["runs"])
    # Row 2: one run of three met every target; its medians miss two.
    assert (second["goodput"], second["share_429"]) == (0.93, 0.03)
    assert second["misses"] == ["goodput", "share_429"] and second["met"] == 1
    # An even count: the mean of the two middle values.
    even = repeated_document(runs[:2], virtual=True, seeds=[5, 6])
    assert even["rows"][0]["results"]["asyncquota"]["goodput"] == 0.965
    table = matrix_table(even)
    assert "medians of 2 runs, seeds 5-6" in table
    assert table.splitlines()[1].split()[-1] == "met"
    assert table.splitlines()[3].split()[-1] == "1/2"


def test_repeated_runs_must_be_of_the_same_rows_one_per_seed():
    one = entries_of(figures_of(0.99, 0.01))
    two = entries_of(figures_of(0.99, 0.01), figures_of(0.99, 0.01))
    with pytest.raises(ValueError, match="one run per seed"):
        repeated_document([one, one], virtual=True, seeds=[0])
    with pytest.raises(ValueError, match="one run per seed"):
        repeated_document([], virtual=True, seeds=[])
    with pytest.raises(ValueError, match="same rows"):
        repeated_document([one, two], virtual=True, seeds=[0, 1])


def test_the_queue_wait_hook_keeps_first_attempts_admissions_by_class():
    hook = QueueWaits()
    common = {"at": 1.0, "method": "POST", "path": "/v1/chat/completions", "tenant": None}
    for priority, attempt, waited in [(Priority.INTERACTIVE, 1, 0.2),
                                      (Priority.BATCH, 1, 3.0),
                                      (Priority.INTERACTIVE, 2, 9.0),  # a retry: left out
                                      (Priority.INTERACTIVE, 1, 0.0)]:
        hook.on_event(Admitted(priority=priority, attempt=attempt, waited=waited, **common))
    hook.on_event(Queued(priority=Priority.BATCH, attempt=1, depth=4, **common))
    waits = hook.by_class()
    assert {name: list(values) for name, values in waits.items()} == {
        "interactive": [0.2, 0.0], "batch": [3.0]}
    assert queue_wait_ms(waits) == {
        "interactive": {"p50": 0.0, "p99": 200.0}, "batch": {"p50": 3000.0, "p99": 3000.0}}
    assert queue_wait_ms(None) is None


# -- a run -------------------------------------------------------------------------------


def test_a_small_virtual_matrix_through_the_command(tmp_path: Path, capsys):
    out = tmp_path / "matrix.json"
    status = main([
        "bench", "--matrix", "--virtual", "--rows", "1,2", "--sessions", "60",
        "--duration", "4", "--strategies", "asyncquota,naive", "--json", str(out),
    ])
    assert status == 0
    doc = orjson.loads(out.read_bytes())
    assert doc.keys() == {"mode", "seed", "dimensions", "targets", "rows"}
    assert doc["mode"] == "virtual" and doc["dimensions"] == {
        name: list(values) for name, values in DIMENSIONS.items()}
    assert [entry["row"] for entry in doc["rows"]] == [1, 2]
    assert [entry["model"]["sessions"] for entry in doc["rows"]] == [60, 120]  # 2: long replies
    for entry in doc["rows"]:
        assert entry["behaviour"].keys() == DIMENSIONS.keys()
        assert entry["upstream"]["rps"] == 100.0
        assert list(entry["results"]) == ["asyncquota", "naive"]
        for name, figures in entry["results"].items():
            assert figures.keys() >= {
                "goodput", "goodput_10s", "share_429", "deadline_share", "queue_wait_ms",
                "refusal_p99_ms", "cpu_s", "lost", "misses", "bench"}
            assert figures["lost"] == 0, name
            assert figures["goodput"] > 0 and figures["ok_in_deadline"] > 0, name
            assert figures["bench"]["timeline"], name
        waits = entry["results"]["asyncquota"]["queue_wait_ms"]
        assert waits["interactive"]["p50"] <= waits["interactive"]["p99"]
        assert entry["results"]["naive"]["queue_wait_ms"] is None
    assert capsys.readouterr().out.strip() == matrix_table(doc)


def test_a_small_virtual_matrix_repeated_through_the_command(tmp_path: Path, capsys):
    out = tmp_path / "matrix.json"
    status = main([
        "bench", "--matrix", "--virtual", "--rows", "3", "--sessions", "60",
        "--duration", "4", "--repeat", "3", "--seed", "4", "--json", str(out),
    ])
    assert status == 0
    doc = orjson.loads(out.read_bytes())
    assert (doc["repeat"], doc["seeds"]) == (3, [4, 5, 6])
    assert [[entry["upstream"]["seed"] for entry in run] for run in doc["runs"]] == [
        [4], [5], [6]]
    figures = doc["rows"][0]["results"]["asyncquota"]
    goodputs = sorted(run["goodput"] for run in figures["runs"])
    assert figures["goodput"] == goodputs[1]
    assert 0 <= figures["met"] <= 3
    assert figures["met"] == sum(1 for run in figures["runs"] if not run["misses"])
    assert capsys.readouterr().out.strip() == matrix_table(doc)


def test_the_matrix_refuses_what_it_does_not_take(capsys):
    for argv, message in [
        (["--rows", "21"], "no row 21"),
        (["--scenario", "crisis"], "drop --scenario"),
        (["--rows", "x"], "--rows takes row numbers"),
        (["--repeat", "0"], "--repeat must be between 1 and 10"),
        (["--repeat", "11"], "--repeat must be between 1 and 10"),
    ]:
        with pytest.raises(SystemExit):
            main(["bench", "--matrix", "--virtual", *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--virtual", "--rows", "1"])
    assert "--rows goes with --matrix" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--virtual", "--repeat", "2"])
    assert "--repeat goes with --matrix" in capsys.readouterr().err



def test_the_rows_without_headers_that_count_refusals_meet_every_target_on_virtual_time():
    # No rate-limit headers and refusals counted against the quota: only refusals say
    # where the quota is, and each one digs a debt. These rows missed their 429s (rows 17
    # and 20 with some seeds, row 19 with every one: 2.6-2.9 %) before refusals that name
    # a concurrency cap were told apart, a swamped upstream was held, cuts were bounded
    # by what it accepted, a probe's success resumed the sends at the pace and growth
    # past the level last refused waited on a plateau. The whole nights, seeds 0 and 2.
    for seed in (0, 2):
        rows = [row for row in matrix_rows(seed=seed) if row.number in (17, 19, 20)]
        entries = run_matrix(rows, ["asyncquota"], virtual=True)
        for entry in entries:
            figures = entry["results"]["asyncquota"]
            assert figures["misses"] == [], (seed, entry["row"], figures["misses"])
            assert figures["lost"] == 0

"""The tuner: parameters and objectives as written, the grid, the ranking, what it writes."""

from __future__ import annotations

import csv
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from asyncquota.bench import SessionModel
from asyncquota.bench.runner import RunSpec
from asyncquota.bench.strategies import Target
from asyncquota.bench.strategies.shaper import (
    Options,
    ShaperStrategy,
    build_limit,
    shaper_arguments,
)
from asyncquota.bench.tune import (
    MAX_COMBINATIONS,
    PARAMETERS,
    Ranked,
    Trial,
    combinations,
    heatmap,
    parse_objective,
    parse_param,
    prepare,
    rank,
    table,
    write_csv,
)
from asyncquota.cli import main
from asyncquota.limits import AIMD, Fixed, Gradient
from asyncquota.shaper import Shaper
from asyncquota.testing import UpstreamConfig

PNG = b"\x89PNG\r\n\x1a\n"
CRISIS = UpstreamConfig.preset("crisis")


def _result(goodput: float, share_429: float, p99: float | None, **more: Any) -> dict[str, Any]:
    return {
        "goodput_ratio": goodput,
        "upstream_429_ratio": share_429,
        "latency_ms": {"interactive": {"p50": None, "p99": p99},
                       "batch": {"p50": None, "p99": None}},
        "reject_ms": {"p50": 0.0, "p99": 0.0},
        "deadline_exceeded": 0,
        "ok_in_deadline": int(goodput * 1000),
        "wall_s": 1.5,
        **more,
    }


# -- parameters --------------------------------------------------------------------------


def test_values_are_parsed_to_the_parameters_types():
    assert parse_param("limit.initial=20,64") == ("limit.initial", (20, 64))
    assert parse_param(" retry_budget = 0.05, 0.2 ") == ("retry_budget", (0.05, 0.2))
    assert parse_param("limit.backoff_ratio=1") == ("limit.backoff_ratio", (1.0,))
    assert parse_param("default_deadline=none,30") == ("default_deadline", (None, 30.0))
    assert parse_param("limit=aimd,gradient,fixed") == ("limit", ("aimd", "gradient", "fixed"))
    assert all(type(value) is int for value in parse_param("max_attempts=1,4")[1])


def test_the_tunable_parameters_are_the_shapers_scalar_arguments_and_the_limits():
    shaper = inspect.signature(Shaper).parameters
    own = {name for name in PARAMETERS if not name.startswith("limit")}
    assert own <= shaper.keys()
    assert {"retry_budget", "max_attempts", "max_retry_after", "cooldown_ramp", "max_queue",
            "default_output_tokens", "seed", "max_connections"} <= own
    # Where to send and the objects a run provides are not settings.
    assert not own & {"base_url", "transport", "hooks", "wall_clock"}
    assert {"limit", "limit.initial", "limit.backoff_ratio", "limit.drop_tolerance",
            "limit.increase", "limit.max_limit", "limit.smoothing",
            "limit.limit"} <= PARAMETERS.keys()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("limit.initial", "written NAME=V1,V2"),
        ("=5", "written NAME=V1,V2"),
        ("max_attempts=1,,2", "written NAME=V1,V2"),
        ("max_attempts=2.5", "max_attempts takes an integer, not '2.5'"),
        ("retry_budget=lots", "retry_budget takes a number, not 'lots'"),
        ("retry_budget=nan", "retry_budget takes a finite number"),
        ("max_attempts=none", "max_attempts takes an integer, not 'none'"),
        ("limit=vegas", "limit is one of aimd, gradient, fixed, not 'vegas'"),
        ("max_queue=10,10", "max_queue lists a value twice"),
    ],
)
def test_a_malformed_parameter_is_refused_with_the_reason(text: str, words: str):
    with pytest.raises(ValueError, match=words):
        parse_param(text)


def test_an_unknown_parameter_is_refused_with_the_known_ones_listed():
    with pytest.raises(ValueError, match=re.escape("Unknown parameter 'limit.beta'")) as caught:
        parse_param("limit.beta=1")
    assert "retry_budget, " in str(caught.value)
    assert "limit.backoff_ratio" in str(caught.value)


# -- options into a Shaper ---------------------------------------------------------------


def test_limit_parameters_alone_tune_the_shapers_own_default_limit():
    arguments = shaper_arguments((("limit.initial", 64), ("retry_budget", 0.2)))
    assert arguments["retry_budget"] == 0.2
    limit = arguments["limit"]
    assert isinstance(limit, AIMD) and limit.limit == 64
    # The Shaper's default AIMD bears a lone drop (its 3 % tolerance); a bare AIMD cuts.
    assert limit.on_sample(10.0, 0.1, 64, True) == 64
    assert AIMD(initial=64).on_sample(10.0, 0.1, 64, True) == 32


def test_no_options_build_no_limit_and_the_algorithm_is_chosen_by_name():
    assert shaper_arguments(()) == {}
    assert isinstance(shaper_arguments((("limit", "gradient"),))["limit"], Gradient)
    fixed = shaper_arguments((("limit", "fixed"), ("limit.limit", 7)))["limit"]
    assert isinstance(fixed, Fixed) and fixed.limit == 7


def test_a_limit_is_refused_when_its_algorithm_takes_or_needs_other_parameters():
    with pytest.raises(ValueError, match=re.escape(
        "The Gradient limit takes no limit.drop_tolerance; it takes limit.initial"
    )):
        build_limit("gradient", {"drop_tolerance": 0.1})
    with pytest.raises(ValueError, match=re.escape("The Fixed limit needs limit.limit.")):
        build_limit("fixed", {})
    with pytest.raises(ValueError, match="Unknown limit algorithm 'vegas'"):
        build_limit("vegas", {})


async def test_the_strategy_builds_its_shaper_from_the_options():
    target = Target("http://simulated.upstream", CRISIS, lambda request: None)
    async with ShaperStrategy(target, options=(("limit.initial", 64),)) as tuned:
        assert tuned.sample()["limit"] == 64
    async with ShaperStrategy(target) as untuned:
        assert untuned.sample()["limit"] == 20


def test_shaper_options_go_only_to_the_asyncquota_strategy():
    model = SessionModel(sessions=1)
    assert RunSpec("asyncquota", CRISIS, model, True).shaper_options == ()
    with pytest.raises(ValueError, match="asyncquota strategy only, not 'naive'"):
        RunSpec("naive", CRISIS, model, True, shaper_options=(("retry_budget", 0.2),))


# -- the grid ----------------------------------------------------------------------------


def test_the_combinations_are_the_cartesian_product_first_name_slowest():
    sweep = [("limit", ("aimd", "gradient")), ("limit.initial", (10, 20, 30))]
    combos = combinations(sweep)
    assert len(combos) == 6
    assert combos[0] == (("limit", "aimd"), ("limit.initial", 10))
    assert combos[1] == (("limit", "aimd"), ("limit.initial", 20))
    assert combos[-1] == (("limit", "gradient"), ("limit.initial", 30))
    assert len(set(combos)) == 6


def test_every_combination_is_built_before_anything_runs():
    assert len(prepare([("limit.initial", (20, 64)), ("cooldown_ramp", (0.5, 1.0))],
                       config=CRISIS)) == 4
    # 1 000 is fine on its own, but not under a max_limit of 500: only the pair is refused.
    with pytest.raises(ValueError, match=r"The combination limit.initial=1000, "
                                         r"limit.max_limit=500 cannot run: initial \(1000\)"):
        prepare([("limit.initial", (20, 1000)), ("limit.max_limit", (1000, 500))],
                config=CRISIS)
    refused = re.escape("retry_budget=-1.0 cannot run: retry_budget must be at least 0")
    with pytest.raises(ValueError, match=refused):
        prepare([("retry_budget", (0.1, -1.0))], config=CRISIS)
    unknown = re.escape("limit=gradient, limit.drop_tolerance=0.1 cannot run")
    with pytest.raises(ValueError, match=unknown):
        prepare([("limit", ("aimd", "gradient")), ("limit.drop_tolerance", (0.1,))],
                config=CRISIS)


def test_a_sweep_names_each_parameter_once_and_stays_bounded():
    with pytest.raises(ValueError, match=re.escape("limit.initial came twice")):
        prepare([("limit.initial", (20,)), ("limit.initial", (64,))], config=CRISIS)
    values = tuple(range(1, 18))
    with pytest.raises(ValueError, match=f"289 combinations; at most {MAX_COMBINATIONS}"):
        prepare([("limit.initial", values), ("max_queue", values)], config=CRISIS)


# -- objectives and ranking --------------------------------------------------------------


def test_a_single_metric_objective_keeps_its_direction():
    assert parse_objective("goodput").higher_is_better
    assert not parse_objective("p99").higher_is_better
    assert not parse_objective("429").higher_is_better
    result = _result(0.98, 0.004, 870.0)
    assert parse_objective("goodput").score(result) == 0.98
    assert parse_objective("429").score(result) == 0.004
    assert parse_objective("p99").score(result) == 870.0


def test_a_weighted_objective_is_the_weighted_sum_and_higher_is_better():
    objective = parse_objective("goodput=1,429=-10,p99=-0.0001")
    assert objective.higher_is_better
    assert objective.terms == (("goodput", 1.0), ("429", -10.0), ("p99", -0.0001))
    assert objective.score(_result(0.98, 0.004, 1000.0)) == pytest.approx(0.98 - 0.04 - 0.1)
    # No interactive request answered: no p99, so no score.
    assert objective.score(_result(0.5, 0.0, None)) is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("speed", "Unknown metric 'speed'; use one of goodput, 429, p99"),
        ("goodput=1,speed=2", "Unknown metric 'speed'"),
        ("goodput=high", "'goodput=high' is not"),
        ("goodput=1,429", "'429' is not"),
        ("goodput=inf", "'goodput=inf' is not"),
        ("goodput=1,goodput=2", "weighs goodput twice"),
        ("goodput=0,p99=0", "at least one nonzero weight"),
    ],
)
def test_a_malformed_objective_is_refused_with_the_reason(text: str, words: str):
    with pytest.raises(ValueError, match=words):
        parse_objective(text)


def _trials() -> list[Trial]:
    return [
        Trial((("limit.initial", 5),), _result(0.90, 0.010, 900.0)),
        Trial((("limit.initial", 20),), _result(0.97, 0.002, 1200.0)),
        Trial((("limit.initial", 64),), _result(0.99, 0.030, None)),
        Trial((("limit.initial", 128),), _result(0.97, 0.002, 1100.0)),
    ]


def test_ranking_puts_the_best_first_in_the_objectives_direction():
    trials = _trials()
    by_goodput = rank(trials, parse_objective("goodput"))
    assert [row.trial.options[0][1] for row in by_goodput] == [64, 20, 128, 5]  # ties keep order
    assert [row.rank for row in by_goodput] == [1, 2, 3, 4]
    by_429 = rank(trials, parse_objective("429"))
    assert [row.trial.options[0][1] for row in by_429] == [20, 128, 5, 64]
    # Without a p99 there is no score: last, whatever the direction.
    by_p99 = rank(trials, parse_objective("p99"))
    assert [(row.trial.options[0][1], row.score) for row in by_p99] == [
        (5, 900.0), (128, 1100.0), (20, 1200.0), (64, None)
    ]


def test_the_table_lists_the_ranking_and_names_the_best():
    objective = parse_objective("429")
    text = table(rank(_trials(), objective), objective=objective, title="crisis: test")
    lines = text.splitlines()
    assert lines[0] == "crisis: test"
    assert lines[1] == "objective: 429 (lower is better)"
    assert lines[2].split() == ["rank", "limit.initial", "score", "goodput", "429", "%", "p99",
                                "int", "ms", "ok", "in", "dl", "wall", "s"]
    assert lines[4].split() == ["1", "20", "0.002", "0.9700", "0.20", "1200", "970", "1.5"]
    assert lines[7].split()[:2] == ["4", "64"] and lines[7].split()[5] == "-"
    assert lines[-1] == "best: limit.initial=20 (score 0.002)"


def test_the_csv_has_one_row_per_combination_with_its_params_and_every_metric(tmp_path: Path):
    path = tmp_path / "tune.csv"
    write_csv(path, rank(_trials(), parse_objective("goodput")))
    with path.open() as file:
        rows = list(csv.DictReader(file))
    assert [row["limit.initial"] for row in rows] == ["64", "20", "128", "5"]
    assert list(rows[0])[:3] == ["rank", "limit.initial", "score"]
    assert rows[0]["rank"] == "1" and rows[0]["score"] == "0.99"
    assert rows[0]["latency_ms.interactive.p99"] == ""
    assert rows[1]["latency_ms.interactive.p99"] == "1200.0"
    assert rows[3]["upstream_429_ratio"] == "0.01"
    assert rows[3]["wall_s"] == "1.5"


def _grid() -> tuple[list[tuple[str, tuple[Any, ...]]], list[Trial]]:
    sweep: list[tuple[str, tuple[Any, ...]]] = [
        ("limit.initial", (20, 64)), ("retry_budget", (0.1,)), ("cooldown_ramp", (0.5, 1.0)),
        ("max_attempts", (2, 4)),
    ]
    trials = [
        Trial(options, _result(0.9 + 0.01 * index, 0.0, 900.0 if index % 3 else None))
        for index, options in enumerate(combinations(sweep))
    ]
    return sweep, trials


def test_the_heatmap_of_two_parameters_is_a_png(tmp_path: Path):
    sweep, trials = _grid()
    path = tmp_path / "grid.png"
    objective = parse_objective("goodput")
    heatmap(path, rank(trials, objective), sweep=sweep, objective=objective, title="crisis")
    assert path.read_bytes()[:8] == PNG


def test_with_one_varying_parameter_the_heatmap_is_a_bar_chart_png(tmp_path: Path):
    sweep: list[tuple[str, tuple[Any, ...]]] = [("limit.initial", (5, 20, 64)),
                                                 ("retry_budget", (0.1,))]
    trials = [Trial(options, _result(0.9, 0.0, 800.0 - index))
              for index, options in enumerate(combinations(sweep))]
    path = tmp_path / "bars.png"
    objective = parse_objective("p99")
    heatmap(path, rank(trials, objective), sweep=sweep, objective=objective, title="crisis")
    assert path.read_bytes()[:8] == PNG


# -- the command -------------------------------------------------------------------------


def test_a_small_tuning_run_through_the_command(tmp_path: Path, capsys):
    out, picture = tmp_path / "tune.csv", tmp_path / "tune.png"
    status = main([
        "tune", "--scenario", "crisis", "--sessions", "300", "--duration", "8",
        "--param", "limit=fixed", "--param", "limit.limit=1,64", "--objective", "goodput",
        "--csv", str(out), "--heatmap", str(picture), "--jobs", "2",
    ])
    assert status == 0
    with out.open() as file:
        rows = list(csv.DictReader(file))
    # One request in flight at a time answers a fraction of what 64 do.
    assert [(row["rank"], row["limit"], row["limit.limit"]) for row in rows] == [
        ("1", "fixed", "64"), ("2", "fixed", "1")
    ]
    best, worst = rows
    assert float(best["goodput_ratio"]) > 5 * float(worst["goodput_ratio"]) > 0
    assert float(best["score"]) == float(best["goodput_ratio"])
    for row in rows:
        assert row["lost"] == "0"
        assert int(row["requests"]) > 300
        assert float(row["cpu_s"]) > 0 and float(row["peak_rss_mb"]) > 0
        assert float(row["wall_s"]) > 0
    assert picture.read_bytes()[:8] == PNG
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "crisis: 300 sessions, 8 s, virtual time, seed 0"
    assert printed[4].split()[:3] == ["1", "fixed", "64"]
    assert printed[-1].startswith("best: limit=fixed, limit.limit=64 (score ")


def test_the_command_refuses_a_combination_before_running_anything(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["tune", "--param", "limit=aimd,fixed", "--sessions", "10"])
    assert exited.value.code == 2
    assert "The combination limit=fixed cannot run: The Fixed limit needs limit.limit." in (
        capsys.readouterr().err
    )


def test_the_command_lists_the_known_parameters_for_an_unknown_one(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--param", "speed=1"])
    err = capsys.readouterr().err
    assert "Unknown parameter 'speed'; the tunable ones are" in err
    assert "limit.initial" in err


def _options(*pairs: tuple[str, Any]) -> Options:
    return tuple(pairs)


def test_a_row_of_the_ranking_holds_its_place_score_and_trial():
    trial = Trial(_options(("limit.initial", 20)), _result(0.97, 0.0, 1.0))
    assert rank([trial], parse_objective("goodput")) == [Ranked(1, 0.97, trial)]

"""The tuner: the night replayed once per combination of Shaper settings, then ranked.

    asyncquota tune --scenario crisis --param limit.initial=20,64 \\
        --param retry_budget=0.05,0.2 --objective goodput=1,429=-10 \\
        --csv tune.csv --heatmap tune.png --jobs 2

A *sweep* names parameters and the values to try (:func:`parse_param` reads
``NAME=V1,V2,...``); its combinations are their cartesian product. Parameters are the
Shaper's scalar keyword arguments (``retry_budget``, ``max_attempts``, ...), ``limit`` (the
algorithm: ``aimd``, ``gradient`` or ``fixed``) and the algorithm's own arguments written
``limit.NAME``. They are read off the signatures, so a new Shaper argument is tunable at
once. Every combination is built before anything runs (:func:`prepare`), so a value the
Shaper or its limit refuses stops the tuner at once, with their message.

Each combination runs the ``asyncquota`` strategy exactly as ``asyncquota bench --virtual``
does (in-process simulated upstream, virtual time), in its own spawned process, so its
``cpu_s``, ``peak_rss_mb`` and ``wall_s`` are its own; ``--seed`` also seeds the Shaper's
jitter (unless ``seed`` is swept), so a tuning run repeats exactly.

The objective (:func:`parse_objective`) is one metric of :data:`METRICS`, better in its own
direction, or a weighted sum ``goodput=1,429=-10,p99=-0.0001`` (higher is better). Mind
the units: ``goodput`` is a ratio near 1, ``429`` a share in [0, 1] (not a percentage),
latencies are in milliseconds.
"""

from __future__ import annotations

import csv
import itertools
import math
import multiprocessing
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..shaper import Shaper
from ..testing import UpstreamConfig
from .report import document
from .runner import VIRTUAL_BASE_URL, RunSpec, run_strategy
from .sessions import SessionModel
from .strategies import Target
from .strategies.shaper import LIMIT_PREFIX, LIMITS, Options, OptionValue, ShaperStrategy

__all__ = [
    "MAX_COMBINATIONS",
    "METRICS",
    "PARAMETERS",
    "Metric",
    "Objective",
    "Parameter",
    "Ranked",
    "Sweep",
    "Trial",
    "combinations",
    "describe",
    "heatmap",
    "parse_objective",
    "parse_param",
    "prepare",
    "rank",
    "run_trials",
    "table",
    "write_csv",
]

MAX_COMBINATIONS = 256
"""The most combinations one tuning run may ask for (a run stays bounded)."""

Sweep = Sequence[tuple[str, tuple[OptionValue, ...]]]
"""Parameters and the values to try for each, in the order they were given."""


@dataclass(frozen=True, slots=True)
class Parameter:
    """A tunable parameter: its name, the type of its values, and what else it accepts.

    Attributes:
        name: as written on the command line (``retry_budget``, ``limit.initial``).
        kind: ``int``, ``float`` or ``str``.
        optional: whether ``none`` is a value (the Shaper's "not set").
        choices: the only values a ``str`` parameter takes.
    """

    name: str
    kind: type[int] | type[float] | type[str]
    optional: bool = False
    choices: tuple[str, ...] = ()

    def parse(self, text: str) -> OptionValue:
        """The value ``text`` stands for.

        Raises:
            ValueError: not a value of this parameter's type.
        """
        if self.optional and text.lower() == "none":
            return None
        if self.choices:
            if text not in self.choices:
                raise ValueError(
                    f"{self.name} is one of {', '.join(self.choices)}, not {text!r}."
                )
            return text
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError(f"{self.name} takes {self._described()}, not {text!r}.") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.name} takes a finite number, not {text!r}.")
        return value

    def _described(self) -> str:
        kind = {int: "an integer", float: "a number", str: "a word"}[self.kind]
        return f"{kind} or none" if self.optional else kind


_NOT_TUNED = frozenset({"base_url"})
"""Scalar Shaper arguments that are no setting of the shaping: where to send."""


def _scalar(name: str, hint: Any) -> Parameter | None:
    """The parameter a type hint allows, if it is a scalar one (``int``, ``float | None``)."""
    optional = False
    if isinstance(hint, types.UnionType):
        kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(kinds) != 1 or len(typing.get_args(hint)) != 2:
            return None
        hint, optional = kinds[0], True
    if hint in (int, float, str):
        return Parameter(name, hint, optional)
    return None


def _parameters() -> dict[str, Parameter]:
    found: dict[str, Parameter] = {}
    for name, hint in typing.get_type_hints(Shaper.__init__).items():
        parameter = None if name in _NOT_TUNED else _scalar(name, hint)
        if parameter is not None:
            found[name] = parameter
    found["limit"] = Parameter("limit", str, choices=tuple(LIMITS))
    for cls in LIMITS.values():
        for name, hint in typing.get_type_hints(cls.__init__).items():
            parameter = _scalar(LIMIT_PREFIX + name, hint)
            if parameter is not None:
                found.setdefault(parameter.name, parameter)
    return found


PARAMETERS: Mapping[str, Parameter] = types.MappingProxyType(_parameters())
"""Every tunable parameter by name: the Shaper's, ``limit`` and each algorithm's."""


def parse_param(text: str) -> tuple[str, tuple[OptionValue, ...]]:
    """A parameter and its values from ``NAME=V1,V2,...``.

    Raises:
        ValueError: not of that shape, an unknown name (the message lists the known ones),
            a value of the wrong type, or a value given twice.
    """
    name, equals, listed = (part.strip() for part in text.partition("="))
    texts = [value.strip() for value in listed.split(",")]
    if not name or not equals or not all(texts):
        raise ValueError(f"A parameter is written NAME=V1,V2,...; {text!r} is not.")
    if name not in PARAMETERS:
        raise ValueError(
            f"Unknown parameter {name!r}; the tunable ones are {', '.join(PARAMETERS)}."
        )
    values = tuple(PARAMETERS[name].parse(value) for value in texts)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} lists a value twice in {listed!r}.")
    return name, values


def combinations(sweep: Sweep) -> list[Options]:
    """Every combination of the sweep's values (the cartesian product, first name slowest)."""
    names = [name for name, _ in sweep]
    return [
        tuple(zip(names, values, strict=True))
        for values in itertools.product(*(values for _, values in sweep))
    ]


def describe(options: Options) -> str:
    """``name=value, name=value``: a combination as the command line writes it."""
    return ", ".join(f"{name}={_text(value)}" for name, value in options)


def _text(value: OptionValue) -> str:
    return "none" if value is None else str(value)


def _refuse(request: Any) -> Any:
    raise AssertionError("A Shaper built only to be checked sent a request.")


def prepare(sweep: Sweep, *, config: UpstreamConfig) -> list[Options]:
    """The sweep's combinations, each built once (Shaper and limit) to check it can run.

    Raises:
        ValueError: a parameter named twice, too many combinations, or a combination the
            Shaper or its limit refuses (the message names it and gives their reason).
    """
    names = [name for name, _ in sweep]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"Give each parameter once, with all its values; {', '.join(repeated)} came twice."
        )
    count = math.prod(len(values) for _, values in sweep)
    if count > MAX_COMBINATIONS:
        raise ValueError(
            f"The sweep makes {count} combinations; at most {MAX_COMBINATIONS} may run at once."
        )
    combos = combinations(sweep)
    target = Target(VIRTUAL_BASE_URL, config, _refuse)
    for options in combos:
        try:
            ShaperStrategy(target, options=options)
        except ValueError as exc:
            raise ValueError(f"The combination {describe(options)} cannot run: {exc}") from None
    return combos


@dataclass(frozen=True, slots=True)
class Metric:
    """A figure of a run the objective may weigh.

    Attributes:
        name: as written in an objective.
        path: where it sits in the report's result (``("latency_ms", "interactive", "p99")``).
        unit: what one unit of it is.
        higher_is_better: its direction when it is the whole objective.
    """

    name: str
    path: tuple[str, ...]
    unit: str
    higher_is_better: bool

    def value(self, result: Mapping[str, Any]) -> float | None:
        """Its value in a run's result; None when the run has none (a percentile of nothing)."""
        found: Any = result
        for key in self.path:
            found = found[key]
        return None if found is None else float(found)


METRICS: Mapping[str, Metric] = types.MappingProxyType({
    metric.name: metric
    for metric in (
        Metric("goodput", ("goodput_ratio",),
               "ratio: answered within deadline ÷ the upstream's quota (about 0 to 1)", True),
        Metric("429", ("upstream_429_ratio",),
               "share of the upstream's replies that were 429 (0 to 1, not %)", False),
        Metric("p99", ("latency_ms", "interactive", "p99"),
               "ms: 99th percentile of answered interactive requests", False),
        Metric("p99_batch", ("latency_ms", "batch", "p99"),
               "ms: 99th percentile of answered batch requests", False),
        Metric("reject_p99", ("reject_ms", "p99"),
               "ms: 99th percentile of the time to a refusal", False),
        Metric("deadline_exceeded", ("deadline_exceeded",),
               "requests that ended by their deadline expiring", False),
    )
})
"""The metrics an objective may name, with their units."""


@dataclass(frozen=True, slots=True)
class Objective:
    """What the tuner maximises (or minimises): a weighted sum of metrics.

    Attributes:
        text: as written on the command line.
        terms: ``(metric name, weight)`` pairs.
        higher_is_better: the direction of the score.
    """

    text: str
    terms: tuple[tuple[str, float], ...]
    higher_is_better: bool

    def score(self, result: Mapping[str, Any]) -> float | None:
        """The weighted sum of the metrics in ``result``; None if one of them is missing."""
        total = 0.0
        for name, weight in self.terms:
            value = METRICS[name].value(result)
            if value is None:
                return None
            total += weight * value
        return total

    @property
    def direction(self) -> str:
        """``higher is better`` or ``lower is better``."""
        return "higher is better" if self.higher_is_better else "lower is better"


def _metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(
            f"Unknown metric {name!r}; use one of {', '.join(METRICS)}."
        ) from None


def parse_objective(text: str) -> Objective:
    """An objective: a metric name (``goodput``, ``p99``, ``429``, ...), or a weighted sum
    of them written ``NAME=WEIGHT,NAME=WEIGHT`` (then higher is better).

    Raises:
        ValueError: an unknown metric (the message lists them), a weight that is not a
            finite number, a metric weighed twice, or a sum with no nonzero weight.
    """
    text = text.strip()
    if "=" not in text:
        metric = _metric(text)
        return Objective(text, ((metric.name, 1.0),), metric.higher_is_better)
    terms: list[tuple[str, float]] = []
    for term in text.split(","):
        name, equals, weight_text = (part.strip() for part in term.partition("="))
        metric = _metric(name)
        try:
            weight = float(weight_text) if equals else math.nan
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(
                f"Each term of a weighted objective is METRIC=WEIGHT with a finite number "
                f"for a weight; {term.strip()!r} is not."
            )
        if any(metric.name == seen for seen, _ in terms):
            raise ValueError(f"The objective weighs {metric.name} twice.")
        terms.append((metric.name, weight))
    if not any(weight for _, weight in terms):
        raise ValueError("A weighted objective needs at least one nonzero weight.")
    return Objective(text, tuple(terms), True)


@dataclass(frozen=True, slots=True)
class Trial:
    """One combination's run.

    Attributes:
        options: the combination (the swept parameters and their values).
        result: the run's figures, as in the bench report's ``results`` entries (without
            the per-second timeline and samples).
    """

    options: Options
    result: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Ranked:
    """A trial in the ranking: its place (1 is best) and its score."""

    rank: int
    score: float | None
    trial: Trial


def run_trials(
    combos: Sequence[Options],
    *,
    scenario: str,
    config: UpstreamConfig,
    model: SessionModel,
    jobs: int = 1,
    on_done: Callable[[Trial], None] | None = None,
) -> list[Trial]:
    """Run each combination in its own spawned process, up to ``jobs`` at once.

    Each process runs exactly one combination and exits, so the figures of its process
    (CPU, peak memory) are that combination's. The Shaper's jitter is seeded with the
    upstream's seed (as in the bench) unless ``seed`` is one of the options. Trials come
    back in ``combos``' order; ``on_done`` hears of each as it finishes.

    Raises:
        ValueError: ``jobs`` below 1.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs!r}.")
    specs = [
        RunSpec(
            strategy=ShaperStrategy.name,
            config=config,
            model=model,
            virtual=True,
            shaper_options=options,
        )
        for options in combos
    ]
    trials: list[Trial | None] = [None] * len(specs)
    context = multiprocessing.get_context("spawn")
    workers = min(jobs, len(specs)) or 1
    with ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_strategy, spec): index for index, spec in enumerate(specs)}
        for future in as_completed(futures):
            run = future.result()
            index = futures[future]
            doc = document(scenario=scenario, config=config, model=model, virtual=True,
                           runs={run.strategy: run})
            result = {
                key: value for key, value in doc["results"][run.strategy].items()
                if key not in ("timeline", "samples")
            }
            trial = Trial(combos[index], result)
            trials[index] = trial
            if on_done is not None:
                on_done(trial)
    return [trial for trial in trials if trial is not None]


def rank(trials: Sequence[Trial], objective: Objective) -> list[Ranked]:
    """The trials best first by ``objective``; runs without a score last; ties keep order."""
    scored = [(objective.score(trial.result), trial) for trial in trials]
    sign = -1.0 if objective.higher_is_better else 1.0
    ordered = sorted(
        scored, key=lambda pair: (pair[0] is None, 0.0 if pair[0] is None else sign * pair[0])
    )
    return [Ranked(place, score, trial) for place, (score, trial) in enumerate(ordered, 1)]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.5g}"


def table(ranked: Sequence[Ranked], *, objective: Objective, title: str) -> str:
    """The ranking as a fixed-width text table, best first, its last line the best."""
    names = [name for name, _ in ranked[0].trial.options] if ranked else []
    columns: list[tuple[str, str]] = [("rank", ">4")]
    columns += [(name, f">{max(len(name), 8)}") for name in names]
    columns += [("score", ">10"), ("goodput", ">8"), ("429 %", ">6"), ("p99 int ms", ">10"),
                ("ok in dl", ">8"), ("wall s", ">7")]
    header = " ".join(format(name, spec) for name, spec in columns)
    lines = [title, f"objective: {objective.text} ({objective.direction})", header,
             "-" * len(header)]
    for row in ranked:
        result = row.trial.result
        cells = (
            row.rank, *(_text(value) for _, value in row.trial.options), _number(row.score),
            f"{result['goodput_ratio']:.4f}", f"{100 * result['upstream_429_ratio']:.2f}",
            _number(result["latency_ms"]["interactive"]["p99"]), result["ok_in_deadline"],
            f"{result['wall_s']:.1f}",
        )
        lines.append(
            " ".join(format(cell, spec) for cell, (_, spec) in zip(cells, columns, strict=True))
        )
    if ranked:
        lines.append(f"best: {describe(ranked[0].trial.options) or '(defaults)'} "
                     f"(score {_number(ranked[0].score)})")
    return "\n".join(lines)


def _flat(result: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def write_csv(path: Path, ranked: Sequence[Ranked]) -> None:
    """One row per combination, best first: rank, its parameters, score, every metric.

    Nested figures are flattened with dots (``latency_ms.interactive.p99``); a value that
    does not exist (a percentile of nothing, no score) is an empty cell.
    """
    rows = [
        {"rank": row.rank, **{name: _text(value) for name, value in row.trial.options},
         "score": row.score, **_flat(row.trial.result)}
        for row in ranked
    ]
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def heatmap(path: Path, ranked: Sequence[Ranked], *, sweep: Sweep, objective: Objective,
            title: str) -> None:
    """Draw the scores into a PNG at ``path``, the best combination marked.

    Axes are the first two swept parameters with more than one value; a cell shows the
    best score over the other parameters' values. With one such parameter (or none) the
    scores are bars. Needs matplotlib (``pip install asyncquota[bench]``); draws off screen.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    varying = [(name, values) for name, values in sweep if len(values) > 1]
    best = ranked[0]
    figure, axis = plt.subplots(figsize=(8.5, 6.5) if len(varying) >= 2 else (8.5, 5))
    figure.suptitle(f"{title}\nobjective {objective.text} ({objective.direction})\n"
                    f"best: {describe(best.trial.options) or '(defaults)'}", fontsize=10)
    if len(varying) >= 2:
        (x_name, x_values), (y_name, y_values) = varying[:2]
        cells: list[list[float]] = [[math.nan] * len(x_values) for _ in y_values]
        for row in ranked:  # best first, so the first score a cell gets is its best
            chosen = dict(row.trial.options)
            x, y = x_values.index(chosen[x_name]), y_values.index(chosen[y_name])
            if math.isnan(cells[y][x]) and row.score is not None:
                cells[y][x] = row.score
        image = axis.imshow(cells, cmap="viridis" if objective.higher_is_better else "viridis_r",
                            aspect="auto", origin="lower")
        figure.colorbar(image, ax=axis, label="score")
        scores = [score for line in cells for score in line if not math.isnan(score)]
        low, high = (min(scores), max(scores)) if scores else (0.0, 0.0)
        for y, line in enumerate(cells):
            for x, score in enumerate(line):
                # Dark text on the bright (better) end of the colour map, light on the dark.
                better = (score - low) / (high - low) if high > low else 1.0
                if not objective.higher_is_better:
                    better = 1.0 - better
                shade = "white" if math.isnan(score) or better < 0.6 else "black"
                axis.text(x, y, "-" if math.isnan(score) else f"{score:.4g}", ha="center",
                          va="center", color=shade, fontsize=9)
        chosen = dict(best.trial.options)
        bx, by = x_values.index(chosen[x_name]), y_values.index(chosen[y_name])
        axis.add_patch(Rectangle((bx - 0.5, by - 0.5), 1, 1, fill=False, edgecolor="red",
                                 linewidth=3, label="best"))
        axis.legend(loc="upper right", fontsize=8)
        axis.set_xticks(range(len(x_values)), [_text(v) for v in x_values])
        axis.set_yticks(range(len(y_values)), [_text(v) for v in y_values])
        axis.set_xlabel(x_name)
        axis.set_ylabel(y_name)
        others = [name for name, _ in varying[2:]]
        if others:
            axis.set_title(f"each cell: the best over {', '.join(others)}", fontsize=9)
    else:
        name = varying[0][0] if varying else None
        # In the sweep's order, as the values were given.
        bars = sorted(ranked, key=lambda row: [
            values.index(value) for (_, values), (_, value) in zip(sweep, row.trial.options,
                                                                   strict=True)
        ])
        labels = [_text(dict(row.trial.options)[name]) if name is not None
                  else describe(row.trial.options) or "(defaults)" for row in bars]
        heights = [math.nan if row.score is None else row.score for row in bars]
        colours = ["tab:red" if row is best else "tab:blue" for row in bars]
        drawn = axis.bar(range(len(bars)), heights, color=colours)
        axis.bar_label(drawn, labels=[_number(row.score) for row in bars], fontsize=9)
        axis.set_xticks(range(len(bars)), labels)
        axis.set_xlabel(name or "combination")
        axis.set_ylabel("score (red: best)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)

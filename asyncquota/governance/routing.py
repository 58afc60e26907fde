"""Which model serves a request: a small declarative table of rules, and fallback chains.

A request names a model, or describes itself (a task such as ``"code_review"``, a
complexity ``"low"``/``"medium"``/``"high"``, and how many tokens its context takes:
prompt plus the output it may produce). The router picks a model in this order:

1. the model the request names, if it names one;
2. else the first rule, in table order, whose conditions all hold;
3. else the default model.

The chosen model comes with its fallback chain (the models to move to, in order, when its
upstream is cooling down, out of quota or over budget). Models whose context window is too
small for the request are dropped from both, so whatever the caller falls back to can take
the request; when none can, the request gets :class:`~asyncquota.errors.NoRouteError`.

Routing is pure and synchronous: a table lookup, no time and no I/O. Moving along the chain
at run time (:meth:`Route.fallback`) and downgrading to a cheaper model for the budget
(:meth:`Router.cheaper`) return new routes whose ``reason`` says why, so a response can tell
which model answered and why it was chosen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import NoRouteError
from .budget import Price

__all__ = ["COMPLEXITIES", "Model", "Route", "Router", "Rule"]

COMPLEXITIES = ("low", "medium", "high")
"""The complexity levels a rule or a request may name."""


@dataclass(frozen=True, slots=True)
class Model:
    """A model as routing, tiers and the budget know it.

    Attributes:
        name: the name routing, tiers and the price table use (``"gpt-4o-mini"``).
        upstream: the name of the upstream (one Shaper) that serves it.
        context_window: how many tokens (input plus maximum output) it accepts.
        price: what it costs per million input and output tokens.
        api_name: the name sent in the request body, when it differs from ``name``.
        path: its endpoint on its upstream.

    Raises:
        ValueError: an empty name or upstream, a context window that is not a positive
            integer, or a path that does not start with ``/``.
    """

    name: str
    upstream: str
    context_window: int
    price: Price
    api_name: str | None = None
    path: str = "/v1/chat/completions"

    def __post_init__(self) -> None:
        for field in ("name", "upstream"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"A model's {field} must be a non-empty string, not {value!r}.")
        window = self.context_window
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ValueError(
                f"Model {self.name!r}: context_window must be a positive integer of tokens, "
                f"not {window!r}."
            )
        if self.api_name is not None and (not isinstance(self.api_name, str) or not self.api_name):
            raise ValueError(
                f"Model {self.name!r}: api_name must be a non-empty string or None, "
                f"not {self.api_name!r}."
            )
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ValueError(f"Model {self.name!r}: path must start with '/', not {self.path!r}.")

    def fits(self, context_tokens: int) -> bool:
        """Whether a request of ``context_tokens`` (input plus maximum output) fits it."""
        return context_tokens <= self.context_window


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the routing table: when every condition holds, use ``model``.

    A condition left at its default matches anything. A rule that names a task or a
    complexity matches only requests that name the same one.

    Attributes:
        model: the model to use.
        task: the task it applies to (None: any task).
        complexity: ``"low"``, ``"medium"`` or ``"high"`` (None: any complexity).
        min_context: the rule applies when ``min_context <= context tokens``...
        max_context: ...``< max_context`` (None: no upper bound).

    The router validates rules (naming each by its index in the table).
    """

    model: str
    task: str | None = None
    complexity: str | None = None
    min_context: int = 0
    max_context: int | None = None

    def matches(self, *, context_tokens: int, task: str | None, complexity: str | None) -> bool:
        """Whether a request with these properties satisfies every condition of the rule."""
        return (
            (self.task is None or self.task == task)
            and (self.complexity is None or self.complexity == complexity)
            and self.min_context <= context_tokens
            and (self.max_context is None or context_tokens < self.max_context)
        )

    def describe(self) -> str:
        """Its conditions as a reader would say them: ``task=code_review, context < 8000``."""
        conditions = []
        if self.task is not None:
            conditions.append(f"task={self.task}")
        if self.complexity is not None:
            conditions.append(f"complexity={self.complexity}")
        if self.min_context and self.max_context is not None:
            conditions.append(f"{self.min_context} <= context < {self.max_context}")
        elif self.min_context:
            conditions.append(f"context >= {self.min_context}")
        elif self.max_context is not None:
            conditions.append(f"context < {self.max_context}")
        return ", ".join(conditions) or "any request"


@dataclass(frozen=True, slots=True)
class Route:
    """The model chosen for a request, why, and what remains to try after it.

    Attributes:
        model: the model to send the request to.
        reason: a sentence a person can read in a response or a log: ``"rule 2:
            task=code_review, complexity=high"``, ``"fallback from gpt-4o: cooling down"``,
            ``"downgraded from gpt-4o: ..."``.
        chain: the models to fall back to, in order, all of which fit the request.
    """

    model: Model
    reason: str
    chain: tuple[Model, ...] = ()

    def fallback(self, why: str) -> Route | None:
        """The next model of the chain, once this one cannot serve (None: chain exhausted).

        Args:
            why: what went wrong with the current model (``"cooling down"``,
                ``"out of quota"``), kept in the new route's reason.
        """
        if not self.chain:
            return None
        return Route(
            model=self.chain[0],
            reason=f"fallback from {self.model.name}: {why}",
            chain=self.chain[1:],
        )


class Router:
    """Picks the model for each request from a table of rules and per-model fallback chains.

    Args:
        models: every model that may be routed to; names must be unique.
        rules: the routing table, tried in order; the first match wins.
        fallbacks: model name → the names of the models to fall back to, in order.
        default_model: the model for requests that name none and match no rule (None: such
            requests get NoRouteError).

    Raises:
        ValueError: no models, a repeated model name, a rule, fallback or default naming an
            unknown model, a rule whose complexity is not one of ``COMPLEXITIES`` or whose
            context bounds are not ``0 <= min_context < max_context``, a fallback chain that
            repeats a model or contains the model itself. Messages name the rule by its
            index in ``rules`` (from 0) or the fallback by its model.
    """

    __slots__ = ("_default", "_fallbacks", "_models", "_rules")

    def __init__(
        self,
        *,
        models: Sequence[Model],
        rules: Sequence[Rule] = (),
        fallbacks: Mapping[str, Sequence[str]] | None = None,
        default_model: str | None = None,
    ) -> None:
        if not models:
            raise ValueError("A router needs at least one model.")
        self._models: dict[str, Model] = {}
        for model in models:
            if model.name in self._models:
                raise ValueError(f"The model name {model.name!r} appears more than once.")
            self._models[model.name] = model
        for index, rule in enumerate(rules):
            self._check_rule(index, rule)
        self._rules = tuple(rules)
        self._fallbacks: dict[str, tuple[Model, ...]] = {}
        for name, chain in (fallbacks or {}).items():
            self._fallbacks[name] = self._check_chain(name, chain)
        if default_model is not None:
            self._known(default_model, "default_model")
        self._default = default_model

    @property
    def models(self) -> tuple[Model, ...]:
        """Every configured model, in configuration order."""
        return tuple(self._models.values())

    def model(self, name: str) -> Model:
        """The model called ``name``.

        Raises:
            ValueError: no model has that name (the message lists the known ones).
        """
        return self._models[self._known(name, "The model")]

    def route(
        self,
        *,
        context_tokens: int,
        model: str | None = None,
        task: str | None = None,
        complexity: str | None = None,
    ) -> Route:
        """The route for one request: its model, why, and the fallbacks that fit it.

        Args:
            context_tokens: the request's input tokens plus its maximum output tokens.
            model: the model the request names (wins over every rule).
            task: the request's task, matched against the rules' tasks.
            complexity: ``"low"``, ``"medium"``, ``"high"`` or None (unknown).

        Raises:
            ValueError: a complexity not in ``COMPLEXITIES``, or ``context_tokens`` not
                an integer >= 0.
            NoRouteError: the requested model is not configured, no rule matches and there
                is no default model, or neither the chosen model nor any of its fallbacks
                has a context window large enough.
        """
        if (
            isinstance(context_tokens, bool)
            or not isinstance(context_tokens, int)
            or context_tokens < 0
        ):
            raise ValueError(f"context_tokens must be an integer >= 0, not {context_tokens!r}.")
        if complexity is not None and complexity not in COMPLEXITIES:
            raise ValueError(
                f"complexity must be one of {', '.join(COMPLEXITIES)} or None, not {complexity!r}."
            )
        if model is not None:
            if model not in self._models:
                # A request's own word, not configuration: refused like any unroutable one.
                raise NoRouteError(
                    f"The requested model {model!r} is not one of the configured models: "
                    f"{', '.join(sorted(self._models))}."
                )
            chosen, reason = self._models[model], f"model {model} requested"
        else:
            chosen, reason = self._match(
                context_tokens=context_tokens, task=task, complexity=complexity
            )
        candidates = (chosen, *self._fallbacks.get(chosen.name, ()))
        fitting = tuple(m for m in candidates if m.fits(context_tokens))
        if not fitting:
            raise NoRouteError(
                f"No model can take {context_tokens} tokens ({reason}): "
                f"{_windows(candidates)} are too small."
            )
        if fitting[0] is not chosen:
            too_small = candidates[: candidates.index(fitting[0])]
            reason = (
                f"{reason}; fallback from {_windows(too_small)}: "
                f"too small for {context_tokens} tokens"
            )
        return Route(model=fitting[0], reason=reason, chain=fitting[1:])

    def cheaper(
        self,
        route: Route,
        *,
        input_tokens: int,
        output_tokens: int,
        max_cost: float | None = None,
    ) -> Route | None:
        """The cheapest model of a route that fits and costs less than its current model.

        Candidates are ``route.model`` and ``route.chain``: only models the route already
        allows, so a downgrade never leaves the request's fallback chain. A candidate must
        fit ``input_tokens + output_tokens``, cost at most ``max_cost`` (None: no ceiling)
        for this request, and cost strictly less than ``route.model``. Equal costs keep the
        chain's order.

        The new route's chain holds the other candidates that pass the same tests, cheapest
        first, so falling back after a downgrade never climbs back to a dearer model.

        Returns:
            The downgraded route (reason ``"downgraded from X: ..."``), or None when no
            model qualifies (``route.model`` may already be the cheapest).
        """
        context = input_tokens + output_tokens
        current = route.model.price.cost(input_tokens, output_tokens)
        # route.model is never strictly cheaper than itself: only the chain can qualify.
        ranked = sorted(
            (
                (cost, order, model)
                for order, model in enumerate(route.chain)
                if model.fits(context)
                and (cost := model.price.cost(input_tokens, output_tokens)) < current
                and (max_cost is None or cost <= max_cost)
            ),
            key=lambda entry: (entry[0], entry[1]),
        )
        if not ranked:
            return None
        cost, _, model = ranked[0]
        limit = "" if max_cost is None else f", within ${max_cost:.6g}"
        return Route(
            model=model,
            reason=(
                f"downgraded from {route.model.name}: ${cost:.6g} instead of ${current:.6g}{limit}"
            ),
            chain=tuple(entry[2] for entry in ranked[1:]),
        )

    def _match(
        self, *, context_tokens: int, task: str | None, complexity: str | None
    ) -> tuple[Model, str]:
        for index, rule in enumerate(self._rules):
            if rule.matches(context_tokens=context_tokens, task=task, complexity=complexity):
                return self._models[rule.model], f"rule {index}: {rule.describe()}"
        if self._default is None:
            raise NoRouteError(
                f"No routing rule matches task={task}, complexity={complexity}, "
                f"{context_tokens} context tokens, and no default model is configured."
            )
        return self._models[self._default], "default model"

    def _known(self, name: str, where: str) -> str:
        if name not in self._models:
            known = ", ".join(sorted(self._models))
            raise ValueError(f"{where} {name!r} is not one of the configured models: {known}.")
        return name

    def _check_rule(self, index: int, rule: Rule) -> None:
        where = f"rules[{index}]"
        self._known(rule.model, f"{where}.model")
        if rule.complexity is not None and rule.complexity not in COMPLEXITIES:
            raise ValueError(
                f"{where}.complexity must be one of {', '.join(COMPLEXITIES)} or None, "
                f"not {rule.complexity!r}."
            )
        low, high = rule.min_context, rule.max_context
        if isinstance(low, bool) or not isinstance(low, int) or low < 0:
            raise ValueError(f"{where}.min_context must be an integer >= 0, not {low!r}.")
        if high is not None and (
            isinstance(high, bool) or not isinstance(high, int) or high <= low
        ):
            raise ValueError(
                f"{where}.max_context must be None or an integer greater than min_context "
                f"({low}), not {high!r}."
            )

    def _check_chain(self, name: str, chain: Sequence[str]) -> tuple[Model, ...]:
        where = f"fallbacks[{name!r}]"
        self._known(name, "The fallbacks key")
        if isinstance(chain, str):
            raise ValueError(
                f"{where} must be a sequence of model names, not the string {chain!r}."
            )
        for position, fallback in enumerate(chain):
            self._known(fallback, f"{where}[{position}]")
            if fallback == name or fallback in chain[:position]:
                raise ValueError(f"{where} repeats the model {fallback!r}.")
        return tuple(self._models[fallback] for fallback in chain)

    def __repr__(self) -> str:
        return (
            f"<Router models={len(self._models)} rules={len(self._rules)} "
            f"default={self._default!r}>"
        )


def _windows(models: Iterable[Model]) -> str:
    return ", ".join(f"{m.name} ({m.context_window} tokens)" for m in models)

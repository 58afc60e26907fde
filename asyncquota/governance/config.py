"""The governance layer's TOML configuration: read, check every field, name what is wrong.

One TOML file (standard-library ``tomllib``) describes the upstreams, the models and their
prices, the routing table, the tenants' tiers, the budget and the alerts. ``load_config``
reads a file and ``parse_config`` a table already parsed; both return a frozen
``GovernanceConfig`` that the gateway turns into Shapers, a ``Router``, ``TenantQuotas``, a
``BudgetGuard`` and a ``UsageMonitor``. Parsing only checks: it opens no store, no socket,
and reads no environment variable (a file names the variables that hold keys and webhook
URLs; the gateway reads them).

Whatever is wrong fails at load with ``ConfigError``, whose message names the field by its
path, the way a reader finds it in the file::

    models.gpt-4o.context_window must be a positive integer, not -5.
    models.gpt-4o.contxt_window is not a known field; did you mean context_window?
    routing.rules[1].model names an unknown model 'gpt-5'; known: claude-haiku, gpt-4o.

Every field's type and range is checked here; the checks that span fields or belong to a
class (rule context bounds, alert thresholds, the time zone, a webhook URL, the router's and
tenant quotas' own consistency) are those of the classes the configuration builds, run at
load on throwaway instances, their messages prefixed with the path. Unknown keys are errors
anywhere (a misspelt limit would otherwise be no limit).

Quotas count requests and tokens one by one, so ``rpm``, ``rpd`` and ``tpm`` (of tiers
and of upstreams) must be positive whole numbers (``600`` or ``600.0``, never ``0.5``).
A file nested too deeply to read, a base URL or a path that is wrong, fail with
``ConfigError`` too, and a URL is shown scrubbed (a password or a query key as ``***``).

Every section is optional except ``upstreams`` and ``models``. A relative ``store`` path is
taken from the TOML file's folder. A complete example, which the tests load as written::

    timezone = "Europe/Paris"          # budget months, and tenants' days unless
                                       # [tenants] names its own (default "UTC")
    store = "quota.sqlite3"            # SQLite file, relative to this file's folder, or
                                       # "redis://host:6379/0" to share the counters with a
                                       # fleet of processes (extra redis); absent: memory

    [upstreams.openai]
    base_url = "https://api.openai.com"
    api_key_env = "OPENAI_API_KEY"     # the variable holding the key (never the key itself)
    auth = "bearer"                    # "bearer" (Authorization: Bearer) or "x-api-key"
    headers = { "OpenAI-Organization" = "org-123" }
    rpm = 10000                        # the upstream's known quota, if known
    tpm = 2000000
    max_connections = 100
    default_deadline = 60.0            # seconds; absent: the Shaper's default
    timeout = 120.0                    # seconds per attempt; absent: the Shaper's default

    [upstreams.anthropic]
    base_url = "https://api.anthropic.com"
    api_key_env = "ANTHROPIC_API_KEY"
    auth = "x-api-key"
    headers = { "anthropic-version" = "2023-06-01" }
    monthly_cap = 500.0                # $ a UTC month, the account's own spend cap at the
                                       # provider: past it, its models' requests fall back

    [models.gpt-4o]
    upstream = "openai"
    context_window = 128000
    input_per_mtok = 2.50              # $ per million input tokens
    output_per_mtok = 10.00            # $ per million output tokens
    fallbacks = ["claude-haiku", "gpt-4o-mini"]
    api_name = "gpt-4o-2024-08-06"     # the name sent upstream (default: the table's name)

    [models.gpt-4o-mini]
    upstream = "openai"
    context_window = 128000
    input_per_mtok = 0.15
    output_per_mtok = 0.60

    [models.claude-haiku]
    upstream = "anthropic"
    context_window = 200000
    input_per_mtok = 0.80
    output_per_mtok = 4.00
    api_name = "claude-3-5-haiku-latest"
    path = "/v1/messages"              # default "/v1/chat/completions"

    [gateway]
    exhausted_hold = 600.0             # seconds an account out of quota is held back when it
                                       # does not say until when (default 300)
    fallback_on = ["exhausted", "overloaded", "transport"]   # what moves a request to its
                                       # fallback, beside rate limiting (default: all three)

    [routing]
    default_model = "gpt-4o-mini"
    rules = [                          # the first match wins
      { task = "code_review", complexity = "high", model = "gpt-4o" },
      { min_context = 32000, model = "claude-haiku" },
    ]

    [tiers.free]
    "*" = { rpm = 20, rpd = 200, tpm = 40000 }   # "*": each model not named, on its own
    shared = { rpd = 300 }             # every model together: a fallback spends the same
                                       # allowance, not a fresh one
    [tiers.pro]
    "*" = { rpm = 600, rpd = 20000 }
    "gpt-4o" = { rpm = 100, tpm = 400000 }

    [tenants]
    default_tier = "free"              # the tier of tenants not listed, and of requests
                                       # naming no tenant (absent: unlimited)
    timezone = "Asia/Shanghai"         # whose midnight ends a tenant's day (RPD); default:
                                       # the timezone above
    [tenants.members]
    acme = "pro"                       # a tenant given as 42 is the member "42"

    [budget]
    monthly = 5000.0                   # $ per calendar month in the time zone
    downgrade_share = 0.10             # a request costing more than this share of what
                                       # is left is downgraded to a cheaper model
    when_spent = "downgrade"           # or "reject"
    downgrade_at = 0.80                # from 80 % of a budget spent, requests go to the
                                       # cheapest model of their chain that fits
    overdraft_limit = 250.0            # $ a "downgrade" may spend past a budget, at most
    [budget.tenants]
    acme = 1000.0

    [alerts]
    warning = 0.70                     # where no rule below says otherwise
    critical = 0.90
    hysteresis = 0.05
    log = true                         # alerts go to the log (default true)
    shed_batch_on_critical = true      # critical upstream alerts shed batch traffic
    shed_seconds = 60.0
    [alerts.thresholds."tenant:*:rpd"] # per dimension, "*" for any run of characters; the
    warning = 0.80                     # first match wins (budgets warn at 0.80 by default)
    critical_action = "offer the customer the pro tier"   # and warning_action
    [[alerts.webhooks]]
    url_env = "SLACK_WEBHOOK_URL"      # or url = "https://..." (exactly one of the two)
    format = "slack"                   # json | wecom | dingtalk | feishu | slack
    timeout = 5.0
    [[alerts.webhooks]]
    url_env = "DINGTALK_WEBHOOK_URL"
    format = "dingtalk"
    secret_env = "DINGTALK_SECRET"     # a signed robot (dingtalk, feishu); or secret = "..."
    markdown = true                    # wecom, dingtalk, feishu (rich text)
    min_level = "warning"              # which alerts it takes: the least severe level,
    kinds = ["usage", "exhausted", "fallback"]         # the kinds, the dimensions
    dimensions = ["upstream:*", "budget", "model:*"]   # (patterns), tenants = [...]
    pace = { messages = 20, per = 60.0 }               # default: the robot's own limit
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar, cast, get_args

from ..urls import join_path, redact_url
from .alerts import (
    REARM_AFTER,
    AlertLevel,
    Pace,
    Route,
    Thresholds,
    UsageMonitor,
    WebhookFormat,
    WebhookSink,
)
from .budget import Price
from .redis_store import is_redis_url
from .routing import COMPLEXITIES, Model, Router, Rule
from .tiers import TenantQuotas, Tier, TierLimits, zone

__all__ = [
    "EXHAUSTED_HOLD",
    "FALLBACK_CAUSES",
    "AlertsSpec",
    "BudgetSpec",
    "ConfigError",
    "GatewaySpec",
    "GovernanceConfig",
    "RedisURL",
    "UpstreamSpec",
    "WebhookSpec",
    "load_config",
    "parse_config",
]

Auth = Literal["bearer", "x-api-key"]
WhenSpent = Literal["downgrade", "reject"]

EXHAUSTED_HOLD = 300.0
"""Seconds an account that said its quota is gone, without saying until when, is held back
(the default of ``[gateway] exhausted_hold`` and of the Gateway's ``exhausted_hold``)."""

FALLBACK_CAUSES = ("exhausted", "overloaded", "transport")
"""What may move a request to its model's fallback, beside rate limiting and shedding:
an account out of quota, an overloaded service (503, 529), an upstream out of reach."""

_T = TypeVar("_T")
_D = TypeVar("_D")

# Headers that carry the credential `auth` sets: a key written in the file would be a secret
# in a file, and would collide with the one read from api_key_env.
_CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(ValueError):
    """The governance configuration is invalid; the message names the field by its path."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamSpec:
    """One upstream (one Shaper): where it is, how to authenticate, what it is known to allow.

    Attributes:
        name: the table's name (``[upstreams.openai]`` → ``"openai"``); models refer to it.
        base_url: its http(s) base URL.
        api_key_env: the environment variable holding its key (None: it needs none).
        auth: how the key is sent: ``"bearer"`` (``Authorization: Bearer``) or
            ``"x-api-key"`` (Anthropic's header).
        headers: extra headers on every request (never a credential).
        rpm, tpm: its known requests and tokens per minute (None: unknown).
        max_connections, default_deadline, timeout: the Shaper's settings of the same
            names; None where the file leaves them out, so the Shaper's defaults apply.
        monthly_cap: the spend cap, in $ per UTC month, that the provider keeps on this
            upstream's account (Anthropic's usage limits, an OpenAI project's budget);
            the gateway mirrors it per account and moves a request it cannot pay to the
            model's fallback (None: no cap). Upstreams sharing a key share one cap.
    """

    name: str
    base_url: str
    api_key_env: str | None = None
    auth: Auth = "bearer"
    headers: Mapping[str, str] = field(default_factory=dict)
    rpm: float | None = None
    tpm: float | None = None
    max_connections: int | None = None
    default_deadline: float | None = None
    timeout: float | None = None
    monthly_cap: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetSpec:
    """The monthly budgets and what happens as they run out.

    Attributes:
        monthly: the global budget in $ per calendar month (None: unlimited).
        tenants: tenant → its own monthly budget in $.
        downgrade_share: a request whose estimated cost is more than this share of the
            remaining budget is downgraded to a cheaper model that fits.
        when_spent: ``"downgrade"`` (to the cheapest allowed model, charged past the
            budget) or ``"reject"`` (``BudgetExceededError``) once a budget is spent.
        downgrade_at: the share of a budget spent from which every request goes to the
            cheapest model of its chain that fits (None: only ``downgrade_share``).
        overdraft_limit: dollars ``"downgrade"`` may spend past a budget, at most (None:
            no ceiling).
    """

    monthly: float | None = None
    tenants: Mapping[str, float] = field(default_factory=dict)
    downgrade_share: float = 0.1
    when_spent: WhenSpent = "downgrade"
    downgrade_at: float | None = None
    overdraft_limit: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenants", MappingProxyType(dict(self.tenants)))


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySpec:
    """The gateway's own settings (``[gateway]``): the ``Gateway`` arguments of the same names.

    Attributes:
        exhausted_hold: seconds an account out of quota is held back when it does not say
            until when.
        fallback_on: what moves a request to its fallback, of ``FALLBACK_CAUSES``.
    """

    exhausted_hold: float = EXHAUSTED_HOLD
    fallback_on: tuple[str, ...] = FALLBACK_CAUSES


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookSpec:
    """One webhook sink: the ``WebhookSink`` arguments, and where its URL and secret are.

    Exactly one of ``url`` and ``url_env`` is set, and at most one of ``secret`` and
    ``secret_env``: a webhook URL carries its key, and a signing secret is one, so both are
    better kept in the environment.

    Attributes:
        route: which alerts it takes (None: all), from ``min_level``, ``kinds``,
            ``dimensions`` and ``tenants``.
        pace: its pace (None: its format's, ``WEBHOOK_PACES``).
    """

    url: str | None = None
    url_env: str | None = None
    format: WebhookFormat = "json"
    timeout: float = 5.0
    secret: str | None = None
    secret_env: str | None = None
    markdown: bool = False
    route: Route | None = None
    pace: Pace | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertsSpec:
    """The usage monitor: thresholds, sinks and the built-in critical action.

    Attributes:
        warning, critical, hysteresis, rearm_after, thresholds: the ``UsageMonitor``
            arguments of the same names.
        log: whether alerts go to a ``LoggingSink``.
        shed_batch_on_critical: whether a critical upstream alert runs a
            ``ShedBatchAction`` on the upstreams.
        shed_seconds: how long that action sheds batch traffic.
        webhooks: the webhook sinks, in file order.
    """

    warning: float = 0.7
    critical: float = 0.9
    hysteresis: float = 0.05
    rearm_after: float = REARM_AFTER
    log: bool = True
    shed_batch_on_critical: bool = False
    shed_seconds: float = 60.0
    webhooks: tuple[WebhookSpec, ...] = ()
    thresholds: Mapping[str, Thresholds] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", MappingProxyType(dict(self.thresholds)))


class RedisURL(str):
    """The ``store`` of a configuration when it is a Redis URL rather than a SQLite file.

    A ``str`` (the URL as written, to connect with) whose ``repr`` hides the password the
    URL may carry, so a configuration printed or logged never shows it.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"RedisURL({redact_url(str(self))!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class GovernanceConfig:
    """A whole governance configuration, checked: what ``Gateway.from_config`` builds from.

    Attributes:
        timezone: the IANA zone of the budget's months, and of tenants' days unless
            ``tenant_timezone`` is set.
        store: where the counters live: a SQLite file (a ``Path``, relative to the TOML
            file's folder when loaded from a file), a Redis URL (a :class:`RedisURL`,
            for ``redis://``, ``rediss://`` and ``unix://``: a ``RedisStore`` shared by a
            fleet), or None (in memory).
        upstreams: the upstreams, in file order.
        models: the models, in file order.
        rules: the routing table, in order.
        fallbacks: model name → the models to fall back to, for models that name some.
        default_model: the model of requests no rule matches (None: NoRouteError).
        tiers: the tenant tiers (``shared`` from the reserved key ``shared`` of a tier's
            table: limits on all its models together).
        tenants: tenant → its tier's name.
        default_tier: the tier of tenants not listed and of requests naming no tenant
            (None: they are unlimited).
        tenant_timezone: the IANA zone whose midnight ends a tenant's day
            (``[tenants] timezone``); None: ``timezone``.
        budget: the budget (None: no budget section, spend is not guarded).
        alerts: the usage monitor (None: no alerts section, no monitor).
        gateway: the gateway's own settings (defaults where there is no section).
    """

    timezone: str = "UTC"
    store: Path | RedisURL | None = None
    upstreams: tuple[UpstreamSpec, ...]
    models: tuple[Model, ...]
    rules: tuple[Rule, ...] = ()
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_model: str | None = None
    tiers: tuple[Tier, ...] = ()
    tenants: Mapping[str, str] = field(default_factory=dict)
    default_tier: str | None = None
    tenant_timezone: str | None = None
    budget: BudgetSpec | None = None
    alerts: AlertsSpec | None = None
    gateway: GatewaySpec = field(default_factory=GatewaySpec)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fallbacks", MappingProxyType(dict(self.fallbacks)))
        object.__setattr__(self, "tenants", MappingProxyType(dict(self.tenants)))


def load_config(path: str | os.PathLike[str]) -> GovernanceConfig:
    """Read and check the TOML file at ``path``.

    A relative ``store`` path is resolved against the file's folder (a Redis URL is kept
    as it is).

    Raises:
        ConfigError: the file is not valid UTF-8 TOML (the message names the file, and the
            line and column of a syntax error), nests too deeply to read, or the
            configuration is invalid.
        OSError: the file cannot be read.
    """
    file = Path(path)
    with file.open("rb") as stream:
        try:
            data = tomllib.load(stream)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file} is not valid TOML: {exc}.") from None
        except RecursionError:
            raise ConfigError(
                f"{file} nests arrays or tables too deeply to be read; no configuration "
                "needs more than a few levels."
            ) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{file} is not UTF-8 text: {exc.reason} at byte {exc.start}."
            ) from None
    return parse_config(data, base_dir=file.absolute().parent)


def parse_config(data: Mapping[str, Any], *, base_dir: Path | None = None) -> GovernanceConfig:
    """Check a parsed TOML table and build the configuration it describes.

    Args:
        data: the table, as ``tomllib`` returns it.
        base_dir: the folder a relative ``store`` path is taken from (None: it is kept
            relative, i.e. to the working directory of whoever opens it).

    Raises:
        ConfigError: anything invalid, named by its path.
    """
    top = _Table(
        data,
        "",
        (
            "timezone",
            "store",
            "upstreams",
            "models",
            "routing",
            "tiers",
            "tenants",
            "budget",
            "alerts",
            "gateway",
        ),
    )
    timezone = top.get("timezone", _string, "UTC")
    with _reported(""):
        zone(timezone)
    store = top.get("store", _store, None)
    if isinstance(store, Path) and base_dir is not None:
        store = base_dir / store
    upstreams = tuple(
        _upstream(name, table) for name, table in top.required("upstreams", _named).items()
    )
    models, fallbacks = _models(top.required("models", _named), {u.name for u in upstreams})
    known_models = {model.name for model in models}
    rules, default_model = _routing(top, known_models)
    with _reported("routing."):
        Router(models=models, rules=rules, fallbacks=fallbacks, default_model=default_model)
    tiers = tuple(
        _tier(name, table, known_models) for name, table in top.get("tiers", _named, {}).items()
    )
    tenants, default_tier, tenant_timezone = _tenants(top, {tier.name for tier in tiers})
    # Spelt out because Mapping keys are invariant and TenantQuotas takes any Hashable tenant.
    members: dict[Hashable, str] = {tenant: tier for tenant, tier in tenants.items()}
    with _reported("tenants: "):
        TenantQuotas(
            tiers=tiers,
            tenants=members,
            default_tier=default_tier,
            timezone=tenant_timezone or timezone,
        )
    budget = top.get("budget", _budget, None)
    alerts = top.get("alerts", _alerts, None)
    gateway = top.get("gateway", _gateway, GatewaySpec())
    return GovernanceConfig(
        timezone=timezone,
        store=store,
        upstreams=upstreams,
        models=models,
        rules=rules,
        fallbacks=fallbacks,
        default_model=default_model,
        tiers=tiers,
        tenants=tenants,
        default_tier=default_tier,
        tenant_timezone=tenant_timezone,
        budget=budget,
        alerts=alerts,
        gateway=gateway,
    )


# ---------------------------------------------------------------------------- the sections


def _upstream(name: str, data: object) -> UpstreamSpec:
    table = _Table(
        data,
        _join("upstreams", name),
        (
            "base_url",
            "api_key_env",
            "auth",
            "headers",
            "rpm",
            "tpm",
            "max_connections",
            "default_deadline",
            "timeout",
            "monthly_cap",
        ),
    )
    api_key_env = table.get("api_key_env", _env_name, None)
    if api_key_env is None and "auth" in table:
        raise ConfigError(
            f"{table.at('auth')} says how to send a key, but {table.at('api_key_env')} "
            "names no variable to read it from."
        )
    headers = table.get("headers", _string_table, {})
    for header in headers:
        if header.lower() in _CREDENTIAL_HEADERS:
            raise ConfigError(
                f"{_join(table.at('headers'), header)} would carry a credential in the file; "
                "name the environment variable that holds the key in api_key_env instead."
            )
    return UpstreamSpec(
        name=name,
        base_url=table.required("base_url", _http_url),
        api_key_env=api_key_env,
        auth=cast(Auth, table.get("auth", _one_of("bearer", "x-api-key"), "bearer")),
        headers=headers,
        rpm=table.get("rpm", _whole_number, None),
        tpm=table.get("tpm", _whole_number, None),
        max_connections=table.get("max_connections", _positive_int, None),
        default_deadline=table.get("default_deadline", _positive_number, None),
        timeout=table.get("timeout", _positive_number, None),
        monthly_cap=table.get("monthly_cap", _positive_number, None),
    )


def _models(
    entries: Mapping[str, object], upstreams: Collection[str]
) -> tuple[tuple[Model, ...], dict[str, tuple[str, ...]]]:
    models: list[Model] = []
    tables: dict[str, _Table] = {}
    for name, data in entries.items():
        table = tables[name] = _Table(
            data,
            _join("models", name),
            (
                "upstream",
                "context_window",
                "input_per_mtok",
                "output_per_mtok",
                "fallbacks",
                "api_name",
                "path",
            ),
        )
        upstream = table.required("upstream", _string)
        _known(upstream, upstreams, table.at("upstream"), "upstream")
        context_window = table.required("context_window", _positive_int)
        price = (
            table.required("input_per_mtok", _dollars),
            table.required("output_per_mtok", _dollars),
        )
        api_name = table.get("api_name", _string, None)
        endpoint = table.get("path", _endpoint, "/v1/chat/completions")
        with _reported(f"{table.path}: "):
            models.append(
                Model(
                    name=name,
                    upstream=upstream,
                    context_window=context_window,
                    price=Price(*price),
                    api_name=api_name,
                    path=endpoint,
                )
            )
    # Checked once every model is known: a chain may name a model defined further down.
    chains: dict[str, tuple[str, ...]] = {}
    for name, table in tables.items():
        if "fallbacks" not in table:
            continue
        chain = table.required("fallbacks", _strings)
        for position, fallback in enumerate(chain):
            where = f"{table.at('fallbacks')}[{position}]"
            _known(fallback, tables, where, "model")
            if fallback == name or fallback in chain[:position]:
                raise ConfigError(f"{where} repeats the model {fallback!r} in its own chain.")
        chains[name] = chain
    return tuple(models), chains


def _routing(top: _Table, models: Collection[str]) -> tuple[tuple[Rule, ...], str | None]:
    if "routing" not in top:
        return (), None
    table = _Table(top.data["routing"], "routing", ("default_model", "rules"))
    default_model = table.get("default_model", _string, None)
    if default_model is not None:
        _known(default_model, models, table.at("default_model"), "model")
    rules = []
    for index, data in enumerate(table.get("rules", _list, [])):
        rule = _Table(
            data,
            f"{table.at('rules')}[{index}]",
            ("model", "task", "complexity", "min_context", "max_context"),
        )
        model = rule.required("model", _string)
        _known(model, models, rule.at("model"), "model")
        rules.append(
            Rule(
                model=model,
                task=rule.get("task", _string, None),
                complexity=rule.get("complexity", _one_of(*COMPLEXITIES), None),
                min_context=rule.get("min_context", _non_negative_int, 0),
                max_context=rule.get("max_context", _positive_int, None),
            )
        )
    return tuple(rules), default_model


# The key of a tier's table that holds the limits all its models share, beside "*" and the
# models' own names.
_SHARED = "shared"


def _tier(name: str, data: object, models: Collection[str]) -> Tier:
    path = _join("tiers", name)
    limits = {}
    shared = TierLimits()
    for key, entry in _named(data, path).items():
        where = _join(path, key)
        if key == _SHARED:
            if key in models:
                raise ConfigError(
                    f"{where} is ambiguous: {_SHARED!r} holds the limits every model of the "
                    f"tier shares, and is also a model's name; rename that model (its "
                    "api_name keeps the name sent upstream)."
                )
            shared = _tier_limits(entry, where)
            continue
        if key != "*":
            _known(key, models, where, "model")
        limits[key] = _tier_limits(entry, where)
    with _reported(f"{path}: "):
        return Tier(name=name, models=limits, shared=shared)


def _tier_limits(data: object, path: str) -> TierLimits:
    table = _Table(data, path, ("rpm", "rpd", "tpm"))
    return TierLimits(
        rpm=table.get("rpm", _whole_number, None),
        rpd=table.get("rpd", _whole_number, None),
        tpm=table.get("tpm", _whole_number, None),
    )


def _tenants(top: _Table, tiers: Collection[str]) -> tuple[dict[str, str], str | None, str | None]:
    """The members, the default tier and the zone of tenants' days (None: the top one's)."""
    if "tenants" not in top:
        return {}, None, None
    table = _Table(top.data["tenants"], "tenants", ("default_tier", "members", "timezone"))
    default_tier = table.get("default_tier", _string, None)
    if default_tier is not None:
        _known(default_tier, tiers, table.at("default_tier"), "tier")
    timezone = table.get("timezone", _string, None)
    if timezone is not None:
        with _reported(f"{table.at('timezone')}: "):
            zone(timezone)
    members = {}
    for tenant, tier in table.get("members", _named, {}).items():
        where = _join(table.at("members"), tenant)
        members[tenant] = _string(tier, where)
        _known(members[tenant], tiers, where, "tier")
    return members, default_tier, timezone


def _budget(data: object, path: str) -> BudgetSpec:
    table = _Table(
        data,
        path,
        (
            "monthly",
            "downgrade_share",
            "when_spent",
            "tenants",
            "downgrade_at",
            "overdraft_limit",
        ),
    )
    return BudgetSpec(
        monthly=table.get("monthly", _positive_number, None),
        tenants={
            tenant: _positive_number(amount, _join(table.at("tenants"), tenant))
            for tenant, amount in table.get("tenants", _named, {}).items()
        },
        downgrade_share=table.get("downgrade_share", _share, 0.1),
        when_spent=cast(
            WhenSpent, table.get("when_spent", _one_of("downgrade", "reject"), "downgrade")
        ),
        downgrade_at=table.get("downgrade_at", _share, None),
        overdraft_limit=table.get("overdraft_limit", _dollars, None),
    )


def _gateway(data: object, path: str) -> GatewaySpec:
    table = _Table(data, path, ("exhausted_hold", "fallback_on"))
    fallback_on = table.get("fallback_on", _strings, FALLBACK_CAUSES)
    for index, cause in enumerate(fallback_on):
        _known(cause, FALLBACK_CAUSES, f"{table.at('fallback_on')}[{index}]", "cause")
    return GatewaySpec(
        exhausted_hold=table.get("exhausted_hold", _positive_number, EXHAUSTED_HOLD),
        fallback_on=tuple(dict.fromkeys(fallback_on)),
    )


def _alerts(data: object, path: str) -> AlertsSpec:
    table = _Table(
        data,
        path,
        (
            "warning",
            "critical",
            "hysteresis",
            "rearm_after",
            "log",
            "shed_batch_on_critical",
            "shed_seconds",
            "webhooks",
            "thresholds",
        ),
    )
    spec = AlertsSpec(
        warning=table.get("warning", _share, 0.7),
        critical=table.get("critical", _share, 0.9),
        hysteresis=table.get("hysteresis", _fraction, 0.05),
        rearm_after=table.get("rearm_after", _seconds_or_zero, REARM_AFTER),
        log=table.get("log", _boolean, True),
        shed_batch_on_critical=table.get("shed_batch_on_critical", _boolean, False),
        shed_seconds=table.get("shed_seconds", _positive_number, 60.0),
        webhooks=tuple(
            _webhook(entry, f"{table.at('webhooks')}[{index}]")
            for index, entry in enumerate(table.get("webhooks", _list, []))
        ),
        thresholds={
            pattern: _thresholds(rule, _join(table.at("thresholds"), pattern))
            for pattern, rule in table.get("thresholds", _named, {}).items()
        },
    )
    with _reported(f"{path}: "):
        UsageMonitor(
            warning=spec.warning,
            critical=spec.critical,
            hysteresis=spec.hysteresis,
            rearm_after=spec.rearm_after,
            thresholds=spec.thresholds,
            sinks=(),
        )
    return spec


def _thresholds(data: object, path: str) -> Thresholds:
    table = _Table(data, path, ("warning", "critical", "warning_action", "critical_action"))
    warning = table.get("warning", _share, None)
    critical = table.get("critical", _share, None)
    warning_action = table.get("warning_action", _string, None)
    critical_action = table.get("critical_action", _string, None)
    with _reported(f"{path}: "):
        return Thresholds(
            warning=warning,
            critical=critical,
            warning_action=warning_action,
            critical_action=critical_action,
        )


_ROUTE_FIELDS = ("min_level", "kinds", "dimensions", "tenants")


def _webhook(data: object, path: str) -> WebhookSpec:
    table = _Table(
        data,
        path,
        (
            "url",
            "url_env",
            "format",
            "timeout",
            "secret",
            "secret_env",
            "markdown",
            "pace",
            *_ROUTE_FIELDS,
        ),
    )
    url = table.get("url", _string, None)
    url_env = table.get("url_env", _env_name, None)
    if (url is None) == (url_env is None):
        has = "both" if url is not None else "neither"
        raise ConfigError(f"{path} needs exactly one of url and url_env; it has {has}.")
    secret = table.get("secret", _secret, None)
    secret_env = table.get("secret_env", _env_name, None)
    if secret is not None and secret_env is not None:
        raise ConfigError(f"{path} needs at most one of secret and secret_env; it has both.")
    spec = WebhookSpec(
        url=url,
        url_env=url_env,
        format=cast(WebhookFormat, table.get("format", _one_of(*get_args(WebhookFormat)), "json")),
        timeout=table.get("timeout", _positive_number, 5.0),
        secret=secret,
        secret_env=secret_env,
        markdown=table.get("markdown", _boolean, False),
        route=_route(table) if any(key in table for key in _ROUTE_FIELDS) else None,
        pace=table.get("pace", _pace, None),
    )
    # The sink's own checks, which never repeat the URL (it carries the webhook's key) nor
    # the secret; a stand-in for what the environment will hold.
    with _reported(f"{table.at('url') if url is not None else path}: "):
        WebhookSink(
            url or "https://webhook.invalid/",
            format=spec.format,
            timeout=spec.timeout,
            secret=secret or ("…" if secret_env is not None else None),
            markdown=spec.markdown,
        )
    return spec


def _route(table: _Table) -> Route:
    kinds = ("usage", "exhausted", "fallback", "recovered")
    levels = ("info", "warning", "critical")
    return Route(
        min_level=cast(AlertLevel, table.get("min_level", _one_of(*levels), "info")),
        kinds=tuple(
            _one_of(*kinds)(kind, f"{table.at('kinds')}[{index}]")
            for index, kind in enumerate(table.get("kinds", _list, []))
        ),
        dimensions=table.get("dimensions", _strings, ()),
        tenants=table.get("tenants", _strings, ()),
    )


def _pace(data: object, path: str) -> Pace:
    table = _Table(data, path, ("messages", "per"))
    return Pace(table.required("messages", _positive_int), table.get("per", _positive_number, 60.0))


def _secret(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        # Not repeated: whatever stands where a secret belongs may be one.
        raise ConfigError(
            f"{path} must be a non-empty string; the value given is not shown in case it is "
            "a secret."
        )
    return value


# ---------------------------------------------------------------------------- reading fields


class _Table:
    """One TOML table being read: its path, and a refusal of any key it does not know."""

    __slots__ = ("data", "path")

    def __init__(self, data: object, path: str, fields: Collection[str]) -> None:
        self.data = _named(data, path or "The configuration")
        self.path = path
        for key in self.data:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = (
                    f"did you mean {close[0]}?"
                    if close
                    else f"known fields: {', '.join(sorted(fields))}."
                )
                raise ConfigError(f"{self.at(key)} is not a known field; {hint}")

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def get(self, key: str, read: Callable[[object, str], _T], default: _D) -> _T | _D:
        if key not in self.data:
            return default
        return read(self.data[key], self.at(key))

    def required(self, key: str, read: Callable[[object, str], _T]) -> _T:
        if key not in self.data:
            raise ConfigError(f"{self.at(key)} is required.")
        return read(self.data[key], self.at(key))


def _join(path: str, key: str) -> str:
    """``path.key``, the key quoted as TOML would need it (``tiers.free."*"``)."""
    shown = key if _BARE_KEY.fullmatch(key) else '"' + key.replace('"', '\\"') + '"'
    return f"{path}.{shown}" if path else shown


def _known(name: str, known: Collection[str], path: str, what: str) -> None:
    if name not in known:
        names = ", ".join(sorted(known)) or "none"
        raise ConfigError(f"{path} names an unknown {what} {name!r}; known: {names}.")


@contextlib.contextmanager
def _reported(prefix: str) -> Iterator[None]:
    """Re-raise a class's own ValueError as a ConfigError, its message after ``prefix``."""
    try:
        yield
    except ValueError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def _named(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path} must be a table, not {_shown(value)}.")
    for key in value:
        if not key:
            raise ConfigError(f'{path} has an empty key ""; give it a name.')
    return value


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{path} must be an array, not {_shown(value)}.")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path} must be a non-empty string, not {_shown(value)}.")
    return value


def _store(value: object, path: str) -> Path | RedisURL:
    text = _string(value, path)
    if is_redis_url(text):
        return RedisURL(text)
    if _SCHEME.match(text):
        raise ConfigError(
            f"{path} must be a SQLite file path or a redis://, rediss:// or unix:// URL, "
            f"not {redact_url(text)!r}."
        )
    return Path(text)


def _strings(value: object, path: str) -> tuple[str, ...]:
    return tuple(_string(item, f"{path}[{index}]") for index, item in enumerate(_list(value, path)))


def _string_table(value: object, path: str) -> dict[str, str]:
    return {key: _string(item, _join(path, key)) for key, item in _named(value, path).items()}


def _boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path} must be true or false, not {_shown(value)}.")
    return value


def _one_of(*choices: str) -> Callable[[object, str], str]:
    def read(value: object, path: str) -> str:
        if value not in choices:
            options = " or ".join(f'"{choice}"' for choice in choices)
            raise ConfigError(f"{path} must be {options}, not {_shown(value)}.")
        return value

    return read


def _env_name(value: object, path: str) -> str:
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        # Not repeated: a key pasted where its variable's name belongs is still a key.
        raise ConfigError(
            f"{path} must name an environment variable (letters, digits and _, not starting "
            "with a digit); the value given is not shown in case it is a secret."
        )
    return value


def _http_url(value: object, path: str) -> str:
    text = _string(value, path)
    if not re.match(r"https?://[^/?#\s]+", text):
        # Scrubbed: a base URL may carry a password (https://user:pw@proxy).
        raise ConfigError(f"{path} must be an http:// or https:// URL, not {redact_url(text)!r}.")
    with _reported(f"{path}: "):
        join_path(text, "/")  # the Shaper's own check: no query, no control character
    return text


def _endpoint(value: object, path: str) -> str:
    text = _string(value, path)
    if not text.startswith("/"):
        raise ConfigError(f"{path} must be a path starting with '/', not {redact_url(text)!r}.")
    return text


def _is_number(value: object) -> bool:
    # TOML has inf and nan; neither is a quota, a price or a duration.
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _number(kind: str, test: Callable[[float], bool]) -> Callable[[object, str], float]:
    def read(value: object, path: str) -> float:
        if not _is_number(value) or not test(cast(float, value)):
            raise ConfigError(f"{path} must be {kind}, not {_shown(value)}.")
        return float(cast(float, value))

    return read


_positive_number = _number("a positive number", lambda x: x > 0)
# Quotas count requests and tokens one by one: rpm, rpd and tpm (tiers and upstreams).
_whole_number = _number("a positive whole number", lambda x: x > 0 and x == int(x))
_dollars = _number("a number of dollars >= 0", lambda x: x >= 0)
_share = _number("a number above 0 and at most 1", lambda x: 0 < x <= 1)
_fraction = _number("a number from 0 to below 1", lambda x: 0 <= x < 1)
_seconds_or_zero = _number("a number of seconds >= 0", lambda x: x >= 0)


def _integer(kind: str, minimum: int) -> Callable[[object, str], int]:
    def read(value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{path} must be {kind}, not {_shown(value)}.")
        return value

    return read


_positive_int = _integer("a positive integer", 1)
_non_negative_int = _integer("an integer >= 0", 0)


def _shown(value: object) -> str:
    """A value as the file would spell it: tables and arrays by kind, not by content."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)

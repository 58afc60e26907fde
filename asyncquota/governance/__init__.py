"""Quota governance: tenant tiers, model routing, cost and budget guard, usage alerts.

The layer above the Shapers that decides *who* may spend *what* on *which model*, and
warns people before anything runs out. One module a job::

    gateway.py   Gateway: one entry point over several upstreams (one Shaper each)
    routing.py   Router: task × complexity × context → model; fallback chains; downgrades
    tiers.py     TenantQuotas: per-tenant, per-model RPM / RPD / TPM (days in a time zone)
    budget.py    BudgetGuard: monthly budgets in dollars, reserved up front, reconciled
    alerts.py    UsageMonitor: 70 % / 90 % alerts to logs, callbacks and webhooks
    store.py     where counters live: in memory, or SQLite so they survive a restart
    redis_store.py  RedisStore: counters shared by a fleet of processes (extra redis,
                 imported only when a RedisStore is made: the package imports without it)
    config.py    one TOML file describing all of it

Build a gateway from Python objects, or from a TOML file with
``Gateway.from_config("governance.toml")``.
"""

from ..errors import StoreUnavailableError
from .alerts import (
    Alert,
    CallbackSink,
    LoggingSink,
    MonitorStatistics,
    ShedBatchAction,
    Sink,
    UsageMonitor,
    WebhookSink,
)
from .budget import BudgetGuard, BudgetReservation, Price
from .config import (
    AlertsSpec,
    BudgetSpec,
    ConfigError,
    GatewaySpec,
    GovernanceConfig,
    RedisURL,
    UpstreamSpec,
    WebhookSpec,
    load_config,
    parse_config,
)
from .gateway import Availability, Gateway, GatewayStatistics, QuotaStatus, Routed, RoutedStream
from .redis_store import RedisStore
from .routing import Model, Route, Router, Rule
from .store import MemoryStore, Reservation, SQLiteStore, Store
from .tiers import DimensionStatus, TenantGrant, TenantQuotas, Tier, TierLimits

__all__ = [
    "Alert",
    "AlertsSpec",
    "Availability",
    "BudgetGuard",
    "BudgetReservation",
    "BudgetSpec",
    "CallbackSink",
    "ConfigError",
    "DimensionStatus",
    "Gateway",
    "GatewaySpec",
    "GatewayStatistics",
    "GovernanceConfig",
    "LoggingSink",
    "MemoryStore",
    "Model",
    "MonitorStatistics",
    "Price",
    "QuotaStatus",
    "RedisStore",
    "RedisURL",
    "Reservation",
    "Route",
    "Routed",
    "RoutedStream",
    "Router",
    "Rule",
    "SQLiteStore",
    "ShedBatchAction",
    "Sink",
    "Store",
    "StoreUnavailableError",
    "TenantGrant",
    "TenantQuotas",
    "Tier",
    "TierLimits",
    "UpstreamSpec",
    "UsageMonitor",
    "WebhookSink",
    "WebhookSpec",
    "load_config",
    "parse_config",
]

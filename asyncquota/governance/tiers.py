"""Tenant tiers: each tenant's own per-model limits on requests per minute, per day, tokens.

A ``Tier`` names limits per model (``TierLimits``: RPM, RPD, TPM, any may be absent).
``TenantQuotas`` maps tenants to tiers and admits a request against the tenant's limits
for that model, all or nothing, before it joins any queue: a tenant over its own quota is
told at once with ``TenantLimitError`` and a ``retry_after`` (it is their quota, not
congestion).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["DimensionStatus", "Tier", "TierLimits"]


def _check_limit(owner: str, field: str, value: float | None) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{owner}.{field} must be a positive number or None, not {value!r}.")


@dataclass(frozen=True, slots=True)
class TierLimits:
    """One model's limits in a tier; None means that dimension is unlimited.

    Attributes:
        rpm: requests per minute (a sliding minute, see ``TenantQuotas``).
        rpd: requests per day (the calendar day in the configured time zone).
        tpm: tokens per minute (the request's estimate, reconciled with the real usage).

    Raises:
        ValueError: a limit that is not a positive finite number (naming the field).
    """

    rpm: float | None = None
    rpd: float | None = None
    tpm: float | None = None

    def __post_init__(self) -> None:
        for field in ("rpm", "rpd", "tpm"):
            _check_limit("TierLimits", field, getattr(self, field))

    @property
    def unlimited(self) -> bool:
        """True when no dimension has a limit (admission then costs nothing)."""
        return self.rpm is None and self.rpd is None and self.tpm is None


UNLIMITED = TierLimits()


@dataclass(frozen=True, slots=True)
class Tier:
    """A named set of per-model limits that tenants subscribe to.

    Attributes:
        name: the tier's name, as tenants refer to it.
        models: model name → its limits; the key ``"*"`` applies to every model not named.
            A model neither named nor covered by ``"*"`` is unlimited. Copied read-only.

    Raises:
        ValueError: an empty name, or a value that is not a ``TierLimits``.
    """

    name: str
    models: Mapping[str, TierLimits]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"A tier's name must be a non-empty string, not {self.name!r}.")
        for model, limits in self.models.items():
            if not isinstance(model, str) or not model:
                raise ValueError(
                    f"Tier {self.name!r} has a model key {model!r}; use a model name or '*'."
                )
            if not isinstance(limits, TierLimits):
                raise ValueError(
                    f"Tier {self.name!r}: the limits of model {model!r} must be a "
                    f"TierLimits, not {type(limits).__name__}."
                )
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))

    def limits_for(self, model: str) -> TierLimits:
        """The limits that apply to ``model``: its own, else ``"*"``'s, else none."""
        limits = self.models.get(model)
        if limits is None:
            limits = self.models.get("*", UNLIMITED)
        return limits


@dataclass(frozen=True, slots=True)
class DimensionStatus:
    """Where one quota dimension stands: used, limit, what remains and when it frees.

    Attributes:
        dimension: ``"rpm"``, ``"rpd"``, ``"tpm"``, ``"budget"``, ``"tenant_budget"``, ...
        used: what is counted in the current window.
        limit: the limit, or None when the dimension is unlimited.
        remaining: ``limit - used`` (never below 0), or None when unlimited.
        resets_at: Unix time the window frees (for minute windows, the end of the current
            one-minute counter, when the previous minute's uses have all left the window),
            or None when unlimited.
    """

    dimension: str
    used: float
    limit: float | None
    remaining: float | None
    resets_at: float | None

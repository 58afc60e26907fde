"""Tenant tiers: per-model RPM, RPD and TPM limits, admitted all or nothing, with retry_after."""

from __future__ import annotations

import pytest

from asyncquota.governance.tiers import DimensionStatus, Tier, TierLimits


def test_tier_limits_refuse_anything_but_positive_numbers_naming_the_field():
    assert TierLimits(rpm=60, tpm=1e5).rpd is None
    for bad in (0, -1, float("inf"), float("nan"), True, "60"):
        with pytest.raises(ValueError, match=r"TierLimits\.rpd must be a positive number"):
            TierLimits(rpd=bad)  # type: ignore[arg-type]


def test_a_tier_gives_a_model_its_own_limits_else_the_wildcard_else_none():
    gpt4o = TierLimits(rpm=10)
    wildcard = TierLimits(rpm=100)
    tier = Tier("pro", {"gpt-4o": gpt4o, "*": wildcard})
    assert tier.limits_for("gpt-4o") is gpt4o
    assert tier.limits_for("gpt-4o-mini") is wildcard
    assert Tier("free", {"gpt-4o": gpt4o}).limits_for("claude").unlimited


def test_a_tier_copies_its_models_read_only_and_validates_them():
    models = {"gpt-4o": TierLimits(rpm=10)}
    tier = Tier("pro", models)
    models["gpt-4o"] = TierLimits(rpm=1)
    assert tier.limits_for("gpt-4o").rpm == 10
    with pytest.raises(TypeError):
        tier.models["x"] = TierLimits()  # type: ignore[index]
    with pytest.raises(ValueError, match="Tier 'pro': the limits of model 'gpt-4o' must be"):
        Tier("pro", {"gpt-4o": {"rpm": 10}})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-empty string"):
        Tier("", {})


def test_a_dimension_status_is_a_frozen_record():
    status = DimensionStatus("rpm", used=3, limit=10, remaining=7, resets_at=60.0)
    with pytest.raises(AttributeError):
        status.used = 4  # type: ignore[misc]

"""Quota governance: tenant tiers, model routing, cost and budget guard, usage alerts."""

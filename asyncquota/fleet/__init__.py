"""One quota shared exactly by a fleet of processes, through Redis (extra ``redis``).

    async with RedisFleet("redis://127.0.0.1:6379/0", name="openai-main") as fleet:
        async with asyncquota.Shaper(base_url, rpm=6000, tpm=..., fleet=fleet) as shaper:
            ...

Every process passes the same ``rpm``/``tpm`` (the quota) and a fleet of the same name;
together they send what one quota allows, and share the cooldown, the retry budget and
what the upstream's headers say. See :mod:`asyncquota.fleet.client` for how (leases of
units taken in one round trip, settlements by id, a breaker and a local share while
Redis is away), :mod:`asyncquota.fleet.scripts` for the Lua, and
:mod:`asyncquota.fleet.lease` for what a process holds.

Importing this package needs redis-py: ``pip install 'asyncquota[redis]'``. The rest of
asyncquota never imports it.
"""

try:
    import redis.asyncio  # noqa: F401
except ImportError as exc:  # pragma: no cover - the test environment has redis-py
    raise ImportError(
        "asyncquota.fleet needs redis-py (redis>=5): pip install 'asyncquota[redis]'"
    ) from exc

from .client import FleetStatistics, RedisFleet

__all__ = ["FleetStatistics", "RedisFleet"]

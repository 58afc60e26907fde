"""The strategies the harness compares, by name, imported only in the process that runs one.

``STRATEGIES`` maps a name to ``"module:Class"``; :func:`load_strategy` imports it. Each
strategy runs in its own fresh process, so a run of ``naive`` neither imports nor pays for
``openai``. To add one, write a :class:`~asyncquota.bench.strategies.base.Strategy`
subclass in a module here and add its line below.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType

from .base import Strategy, Target

__all__ = ["PEERS", "STRATEGIES", "Strategy", "Target", "load_strategy"]

STRATEGIES: Mapping[str, str] = MappingProxyType(
    {
        "asyncquota": "asyncquota.bench.strategies.shaper:ShaperStrategy",
        "naive": "asyncquota.bench.strategies.naive:NaiveStrategy",
        "openai-sdk": "asyncquota.bench.strategies.openai_sdk:OpenAISDKStrategy",
        "tenacity": "asyncquota.bench.strategies.tenacity_limiter:TenacityStrategy",
        "cookbook": "asyncquota.bench.strategies.cookbook:CookbookStrategy",
    }
)
"""Every strategy the harness knows, in report order."""

PEERS: tuple[str, ...] = ("naive", "openai-sdk", "tenacity", "cookbook")
"""The strategies asyncquota is compared with."""


def load_strategy(name: str) -> type[Strategy]:
    """The strategy class registered as ``name`` (imports its module).

    Raises:
        ValueError: no strategy has that name.
        ImportError: its library is not installed (``pip install asyncquota[bench]``).
    """
    try:
        module_name, _, class_name = STRATEGIES[name].partition(":")
    except KeyError:
        raise ValueError(
            f"Unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}."
        ) from None
    cls: type[Strategy] = getattr(importlib.import_module(module_name), class_name)
    return cls

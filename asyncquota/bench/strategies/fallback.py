"""``asyncquota`` on the 2 a.m. night: a Gateway over a primary model and its fallback.

The ``exhaustion`` scenario (:mod:`asyncquota.bench.exhaustion`) runs this strategy under
the name ``asyncquota``: one :class:`~asyncquota.governance.gateway.Gateway` built from
the public governance API, as a chatbot server would build it, with two models on two
upstreams (each behind its own Shaper with its defaults): ``primary`` on the
Anthropic-dialect upstream (``/v1/messages``), falling back to ``fallback`` on the
OpenAI-dialect one (``/v1/chat/completions``). Both are free (no budget) and nobody's (no
tenants). Its alerts go to a :class:`~asyncquota.governance.alerts.CallbackSink` that
keeps each one's time and kind, and every reply is kept with the model that gave it, so
the scenario can tell who served whom, and when.

Each call asks for ``primary`` by name, with its class and deadline. The caller reads its
reply in the shape it sent; a reply in another shape is an error to it
(:class:`WrongShapeError`), as it would be to a real client reading ``["choices"]`` off
an Anthropic message.

The callers speak OpenAI's shape (:data:`CALLER_DIALECT`), the Gateway's default for
callers: the primary hears Anthropic messages, so the Gateway must translate the body to
it and its reply back (issue 13, item 2). A Gateway that does not would send the chat as
it is and hand back Anthropic's message: the callers count that as unread, and the
scenario's ``wrong_shape`` shows it.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Self

from ...hooks import LoggingHook
from ...shaper import DEFAULT_MAX_CONNECTIONS, Shaper
from ...signals import Provider
from ...testing.replies import CHAT_PATH, MESSAGES_PATH
from ..sessions import CLASSES, Call
from .base import Strategy, Target
from .shaper import CONTEXT_WINDOW, QueueWaits

if TYPE_CHECKING:
    from ...governance.alerts import Alert
    from ...governance.gateway import Gateway

__all__ = [
    "CALLER_DIALECT",
    "FALLBACK",
    "MODELS",
    "PRIMARY",
    "FallbackStrategy",
    "WrongShapeError",
    "reply_dialect",
]

PRIMARY: Final = "primary"
"""The primary model's name (and its upstream's)."""

FALLBACK: Final = "fallback"
"""The fallback model's name (and its upstream's)."""

MODELS: tuple[str, str] = (PRIMARY, FALLBACK)
"""The models, in the order of their codes in :attr:`FallbackStrategy.served_model`."""

CALLER_DIALECT: Provider = "openai"
"""The shape the callers send and read (the Gateway's default for its callers)."""

_CLASS_CODES = {name: code for code, name in enumerate(CLASSES)}


class WrongShapeError(Exception):
    """A successful reply the caller cannot read: it is not in the shape the caller sent."""


def reply_dialect(reply: object) -> Provider | None:
    """The dialect a successful reply body is in (None: neither)."""
    if isinstance(reply, Mapping):
        if isinstance(reply.get("choices"), list):
            return "openai"
        if reply.get("type") == "message" and isinstance(reply.get("content"), list):
            return "anthropic"
    return None


class FallbackStrategy(Strategy):
    """Every call through one Gateway: the primary model, else its fallback.

    Args:
        target: the primary upstream (Anthropic dialect).
        fallback: the fallback upstream (OpenAI dialect).

    Attributes:
        served_at, served_class, served_model: one entry per reply the caller read, in
            order: its loop time, its class code and its model code (an index of
            :data:`MODELS`).
        wrong_shape: successful replies the caller could not read, by model code.
        alerts_at, alert_kinds: the loop time and kind of every alert delivered.
    """

    name = "asyncquota"
    description = "asyncquota.Gateway: the primary model, falling back to another provider"
    queue_wait_source = (
        "the Shapers' Admitted.waited: arrival to send, first attempts on either upstream"
    )

    def __init__(self, target: Target, fallback: Target) -> None:
        super().__init__(target)
        self.fallback = fallback
        self.served_at = array("d")
        self.served_class = array("b")
        self.served_model = array("b")
        self.wrong_shape = [0, 0]
        self.alerts_at = array("d")
        self.alert_kinds: list[str] = []
        self._waits = QueueWaits()
        self._gateway = self._build()

    def _build(self) -> Gateway:
        """The Gateway, from the public governance API (imported here, as in ``shaper``)."""
        from ...governance import (
            CallbackSink,
            Gateway,
            Model,
            Price,
            Router,
            UsageMonitor,
        )

        wall_clock = self.target.config.wall_clock
        shapers = {
            name: Shaper(
                target.base_url,
                transport=target.shaper_transport(max_connections=DEFAULT_MAX_CONNECTIONS),
                wall_clock=wall_clock,
                seed=target.config.seed,
                hooks=(LoggingHook(), self._waits),
            )
            for name, target in ((PRIMARY, self.target), (FALLBACK, self.fallback))
        }
        free = Price(0.0, 0.0)
        models = (
            Model(PRIMARY, upstream=PRIMARY, context_window=CONTEXT_WINDOW, price=free,
                  path=MESSAGES_PATH),
            Model(FALLBACK, upstream=FALLBACK, context_window=CONTEXT_WINDOW, price=free,
                  path=CHAT_PATH),
        )
        monitor = UsageMonitor(sinks=(CallbackSink(self._alerted),), wall_clock=wall_clock)
        return Gateway(
            upstreams=shapers,
            router=Router(models=models, fallbacks={PRIMARY: (FALLBACK,)},
                          default_model=PRIMARY),
            monitor=monitor,
            wall_clock=wall_clock,
        )

    def _alerted(self, alert: Alert) -> None:
        self.alerts_at.append(asyncio.get_running_loop().time())
        self.alert_kinds.append(alert.kind)

    @property
    def gateway(self) -> Gateway:
        """The Gateway the calls go through."""
        return self._gateway

    async def __aenter__(self) -> Self:
        await self._gateway.__aenter__()
        return self

    async def complete(self, call: Call) -> None:
        """Ask for the primary; keep which model answered, if the caller can read it.

        Raises:
            WrongShapeError: the reply is not in :data:`CALLER_DIALECT`'s shape.
        """
        body: dict[str, Any] = {
            "model": PRIMARY, "messages": call.messages, "max_tokens": call.max_tokens
        }
        routed = await self._gateway.request(
            body, model=PRIMARY, priority=call.priority, deadline=call.deadline
        )
        code = MODELS.index(routed.model)
        shape = reply_dialect(routed.response.json())
        if shape != CALLER_DIALECT:
            self.wrong_shape[code] += 1
            raise WrongShapeError(
                f"The {routed.model} model's reply is in {shape or 'no known'} shape; the "
                f"caller sent {CALLER_DIALECT}'s and reads only that."
            )
        self.served_at.append(asyncio.get_running_loop().time())
        self.served_class.append(_CLASS_CODES[call.priority])
        self.served_model.append(code)

    async def aclose(self) -> None:
        """Close the Gateway (its Shapers and its monitor)."""
        await self._gateway.aclose()

    def queue_waits(self) -> Mapping[str, Sequence[float]]:
        """Each first attempt's wait from arrival to send, by class, on either upstream."""
        return self._waits.by_class()

    def sample(self) -> Mapping[str, float]:
        """The primary's concurrency limit and in flight (the plot's), and the fallback's."""
        upstreams = self._gateway.upstreams
        primary, fallback = upstreams[PRIMARY].statistics(), upstreams[FALLBACK].statistics()
        return {
            "limit": float(primary.limit),
            "inflight": float(primary.inflight),
            "limit_fallback": float(fallback.limit),
            "inflight_fallback": float(fallback.inflight),
        }

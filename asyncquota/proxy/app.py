"""The proxy's routes: OpenAI's and Anthropic's endpoints over a Gateway, and its health.

    POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses   OpenAI's
    POST /v1/messages                                                            Anthropic's
    GET  /v1/models      the configured models (Anthropic's list when anthropic-version is sent)
    GET  /healthz        alive                     GET /readyz   can serve
    GET  /metrics        Prometheus, one PrometheusHook per upstream Shaper

A model request goes: the key (401 unknown) → its ``X-AsyncQuota-*`` options (the tenant
is the key's; the priority at most the key's ``max_priority``; the deadline the client's,
else its SDK's read timeout, at most ``request_timeout``) → the body (size, JSON) → the
model it names, which must be configured and served at this endpoint (404) → the
Gateway (routing, fallback, translation, tiers, budget), ``request`` or ``stream`` as the
body's ``"stream"`` says. Only the configured upstreams are ever contacted, at their
models' own paths: nothing the client sends (path, headers, model) names another, and
of its headers only the providers' beta flags (``FORWARDED_HEADERS``: ``anthropic-beta``,
``openai-beta``) are passed on, never its key.

Every answer carries the tenant's own ``x-ratelimit-*`` headers and, when a model
answered, ``X-AsyncQuota-Model``; refusals are in the provider's error JSON
(:mod:`.replies`). ``/healthz``, ``/readyz`` and ``/metrics`` need no key: bind the proxy
where only what should see them can reach them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson
from aiohttp import web

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        gc_collector,
        generate_latest,
        platform_collector,
        process_collector,
    )
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "asyncquota's proxy needs prometheus_client: pip install 'asyncquota[proxy]'"
    ) from exc

from ..dialects import ANTHROPIC, OPENAI, dialect_of_path
from ..errors import QuotaError
from ..governance import Gateway, GovernanceConfig
from ..governance.config import ConfigError
from ..hooks import LoggingHook
from ..options import RequestOptions
from ..prometheus import PrometheusHook, watch_gateway
from ..signals import Provider
from ..transport import Transport
from .auth import ApiKey, Keys, presented_key
from .config import ProxySettings
from .limits import read_json, request_options
from .replies import ProxyError, error_body, rate_headers, refusal_of
from .streaming import relay

__all__ = ["ENDPOINTS", "PROXY_KEY", "Proxy", "make_app"]

logger = logging.getLogger("asyncquota.proxy")

ENDPOINTS: Mapping[str, Provider] = {
    "/v1/chat/completions": OPENAI,
    "/v1/completions": OPENAI,
    "/v1/embeddings": OPENAI,
    "/v1/responses": OPENAI,
    "/v1/messages": ANTHROPIC,
}
"""The model endpoints, and the dialect each speaks (its bodies and its errors)."""

READY_CHECK_TIMEOUT = 1.0
"""Seconds /readyz waits for the counter store before it calls it unreachable."""

_JSON = "application/json"


FORWARDED_HEADERS = ("anthropic-beta", "openai-beta")
"""The client headers passed on to the upstream: the providers' opt-ins to beta features
(Anthropic's prompt caching and tools betas, OpenAI's assistants). Nothing else a client
sends reaches an upstream."""


@dataclass(frozen=True, slots=True)
class _Call:
    """A model request, read: whose, in which dialect, which model, what it may claim."""

    dialect: Provider
    key: ApiKey
    body: dict[str, Any]
    model: str | None
    options: RequestOptions  # the key's tenant, its priority capped by the key's
    headers: Mapping[str, str]  # the client's FORWARDED_HEADERS


class Proxy:
    """A Gateway behind OpenAI's and Anthropic's HTTP APIs: what the routes share.

    Args:
        gateway: the gateway requests go through (the proxy starts and closes it).
        settings: the ``[proxy]`` table.
        keys: the accepted client keys.
        registry: the Prometheus registry ``/metrics`` serves.
        wall_clock: Unix time, for the ``x-ratelimit-reset-*`` durations.

    Use :meth:`from_config` to build it all from the TOML file's parts.
    """

    def __init__(
        self,
        gateway: Gateway,
        settings: ProxySettings,
        keys: Keys,
        *,
        registry: CollectorRegistry,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.gateway = gateway
        self.settings = settings
        self.keys = keys
        self.registry = registry
        self._wall_clock = wall_clock
        self._families = {model.name: _family(model.path) for model in gateway.router.models}

    @classmethod
    def from_config(
        cls,
        settings: ProxySettings,
        config: GovernanceConfig,
        *,
        environ: Mapping[str, str] | None = None,
        transports: Mapping[str, Transport] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> Proxy:
        """The gateway of ``config``, its Shapers reporting to a registry of the proxy's own.

        Raises:
            ConfigError: the configuration is invalid, or a model's fallback serves
                another endpoint than the model.
            ValueError: an environment variable the configuration names is not set.
        """
        _families_of(config)  # checked before anything is built
        keys = Keys.from_specs(settings.keys, environ)
        registry = CollectorRegistry()
        process_collector.ProcessCollector(registry=registry)
        platform_collector.PlatformCollector(registry=registry)
        gc_collector.GCCollector(registry=registry)
        hooks = {
            spec.name: PrometheusHook(spec.name, registry=registry) for spec in config.upstreams
        }
        gateway = Gateway.from_config(
            config,
            transports=transports,
            environ=environ,
            wall_clock=wall_clock,
            hooks={name: [hook, LoggingHook()] for name, hook in hooks.items()},
        )
        for name, shaper in gateway.upstreams.items():
            hooks[name].watch(shaper)
        watch_gateway(gateway, registry=registry)
        return cls(gateway, settings, keys, registry=registry, wall_clock=wall_clock)

    def reload(
        self,
        settings: ProxySettings,
        config: GovernanceConfig,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Apply a changed file: the gateway's part (``Gateway.reload``) and the keys.

        The body, header and time limits are the server's, set at its start: a change
        to them is logged and waits for a restart. Everything is checked first; on any
        error nothing changes.

        Raises:
            ConfigError, ValueError: as ``Gateway.reload`` and ``Keys.from_specs``.
        """
        keys = Keys.from_specs(settings.keys, environ)
        families = _families_of(config)
        self.gateway.reload(config)
        self.keys, self._families = keys, families
        kept = ("max_body_bytes", "max_header_bytes", "request_timeout", "shutdown_grace")
        changed = [name for name in kept if getattr(settings, name) != getattr(self.settings, name)]
        if changed:
            logger.warning(
                "proxy.%s changed: restart the proxy to apply it.", ", proxy.".join(changed)
            )
        logger.info("The proxy's keys were reloaded: %d keys.", len(keys))

    # ------------------------------------------------------------------ model requests

    def endpoint(self, endpoint: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """The handler of one model endpoint (see the module)."""
        dialect = ENDPOINTS[endpoint]

        async def handle(request: web.Request) -> web.StreamResponse:
            if request.method != "POST":
                error = ProxyError(405, f"Use POST on {endpoint}.")
                return _refuse(dialect, error, {"Allow": "POST"})
            return await self._model_request(request, endpoint, dialect)

        return handle

    async def _model_request(
        self, request: web.Request, endpoint: str, dialect: Provider
    ) -> web.StreamResponse:
        ends = asyncio.get_running_loop().time() + self.settings.request_timeout
        call: _Call | None = None
        try:
            async with asyncio.timeout_at(ends) as scope:
                call = await self._read(request, endpoint, dialect)
                if call.body.get("stream") is True:
                    return await self._stream(request, call, scope, ends)
                return await self._request(call)
        except ProxyError as exc:
            return _refuse(dialect, exc, {})
        except QuotaError as exc:
            assert call is not None
            headers = await self._rate_headers(call.key, call.model)
            return _refuse(dialect, refusal_of(exc), headers)
        except TimeoutError:
            return _refuse(dialect, _timed_out(self.settings.request_timeout), {})

    async def _read(self, request: web.Request, endpoint: str, dialect: Provider) -> _Call:
        key = self.keys.find(presented_key(request.headers))
        if key is None:
            raise ProxyError(
                401, "The API key is missing or not one this proxy knows: send it as "
                "Authorization: Bearer <key> or x-api-key: <key>.", code="invalid_api_key",
            )
        options = request_options(request.headers, cap=self.settings.request_timeout)
        if options.tenant is not None and str(options.tenant) != key.tenant:
            raise ProxyError(
                403, f"The key {key.name!r} is for tenant {key.tenant!r}; it may not act for "
                "another tenant.", code="permission_denied",
            )
        body = await read_json(request, self.settings.max_body_bytes)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ProxyError(400, "The body's model must be a string.", code="invalid_model")
        self._check_model(model, endpoint)
        return _Call(
            dialect=dialect,
            key=key,
            body=body,
            model=model,
            headers={
                name: request.headers[name]
                for name in FORWARDED_HEADERS
                if name in request.headers
            },
            options=replace(
                options,
                tenant=key.tenant,
                # A smaller rank is more important: the key's is the most it may claim.
                priority=max(options.priority, key.max_priority),
            ),
        )

    def _check_model(self, model: str | None, endpoint: str) -> None:
        """The model is configured and served at this endpoint (or, unnamed, a chat)."""
        family = _family(endpoint)
        if model is None:
            if family != "chat":
                raise ProxyError(400, f"{endpoint} needs the body's model.", code="invalid_model")
            return
        served = self._families.get(model)
        if served is None:
            names = ", ".join(sorted(self._families))
            raise ProxyError(
                404, f"The model {model!r} is not served here; the models are: {names}.",
                code="model_not_found",
            )
        if served != family:
            raise ProxyError(
                404, f"The model {model!r} is not served at {endpoint} "
                f"(it serves {'chats' if served == 'chat' else served}).",
                code="model_not_found",
            )

    async def _request(self, call: _Call) -> web.Response:
        routed = await self.gateway.request(
            call.body,
            model=call.model,
            dialect=call.dialect,
            options=call.options,
            headers=call.headers or None,
        )
        headers = await self._rate_headers(call.key, routed.model)
        headers["X-AsyncQuota-Model"] = routed.model
        return web.Response(
            status=routed.response.status,
            body=routed.response.body,
            content_type=_JSON,
            headers=headers,
        )

    async def _stream(
        self, request: web.Request, call: _Call, scope: asyncio.Timeout, ends: float
    ) -> web.StreamResponse:
        stream = self.gateway.stream(
            call.body,
            model=call.model,
            dialect=call.dialect,
            options=call.options,
            headers=call.headers or None,
        )
        async with stream:
            headers = await self._rate_headers(call.key, stream.model)
            headers["X-AsyncQuota-Model"] = stream.model
            # From the headers on, the time limit is the stream's: it ends the stream with
            # an error event rather than this scope's 504, which could not be sent.
            scope.reschedule(None)
            return await relay(
                request,
                stream,
                dialect=call.dialect,
                headers=headers,
                ends=ends,
                timed_out=_timed_out(self.settings.request_timeout),
            )

    async def _rate_headers(self, key: ApiKey, model: str | None) -> dict[str, str]:
        """The tenant's own ``x-ratelimit-*`` for the model (none when it cannot say)."""
        if model is None or model not in self._families:
            return {}
        try:
            status = await self.gateway.quota_status(key.tenant, model)
        except QuotaError:  # the store cannot say: the reply goes without
            return {}
        return rate_headers(status.models.get(model, ()), self._wall_clock())

    # ------------------------------------------------------------------ the rest

    async def models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: the configured models, in the caller's SDK's shape."""
        anthropic = "anthropic-version" in request.headers
        dialect = ANTHROPIC if anthropic else OPENAI
        if self.keys.find(presented_key(request.headers)) is None:
            return _refuse(dialect, ProxyError(
                401, "The API key is missing or not one this proxy knows.", code="invalid_api_key"
            ), {})
        models = self.gateway.router.models
        data: dict[str, Any]
        if anthropic:
            listed = [
                {"type": "model", "id": m.name, "display_name": m.name,
                 "created_at": "1970-01-01T00:00:00Z"}
                for m in models
            ]
            data = {
                "data": listed, "has_more": False,
                "first_id": listed[0]["id"] if listed else None,
                "last_id": listed[-1]["id"] if listed else None,
            }
        else:
            data = {
                "object": "list",
                "data": [
                    {"id": m.name, "object": "model", "created": 0, "owned_by": m.upstream}
                    for m in models
                ],
            }
        return web.Response(body=orjson.dumps(data), content_type=_JSON)

    async def healthz(self, request: web.Request) -> web.Response:
        """``GET /healthz``: the process answers."""
        return web.Response(body=b'{"status":"ok"}', content_type=_JSON)

    async def readyz(self, request: web.Request) -> web.Response:
        """``GET /readyz``: 503 while every upstream cools down (a confirmed cooldown: not a
        Retry-After's hold its probe may end in ms) or the store cannot be read."""
        problems = []
        upstreams = self.gateway.upstreams
        if upstreams and all(shaper.confirmed_cooldown() > 0 for shaper in upstreams.values()):
            problems.append("every upstream is cooling down")
        try:
            async with asyncio.timeout(READY_CHECK_TIMEOUT):
                await self.gateway.quota_status()
        except (QuotaError, TimeoutError):
            problems.append("the counter store cannot be read")
        body = {"status": "unready" if problems else "ready", "problems": problems}
        return web.Response(
            status=503 if problems else 200, body=orjson.dumps(body), content_type=_JSON
        )

    async def metrics(self, request: web.Request) -> web.Response:
        """``GET /metrics``: the registry, in Prometheus's text format."""
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def not_found(self, request: web.Request) -> web.Response:
        """Any other path: 404 in the shape of the API the path looks like."""
        dialect = ANTHROPIC if request.path.startswith("/v1/messages") else OPENAI
        return _refuse(dialect, ProxyError(
            404, f"There is no {request.method} {request.path} here; the endpoints are: "
            f"{', '.join(ENDPOINTS)}, /v1/models.", code="not_found",
        ), {})


PROXY_KEY = web.AppKey("proxy", Proxy)
"""Where the app keeps its :class:`Proxy`: ``app[PROXY_KEY]``."""


def make_app(proxy: Proxy) -> web.Application:
    """An aiohttp app serving ``proxy``; it starts the gateway and closes it on cleanup."""
    # The body limit is read() by hand (limits.read_json): aiohttp's own answers in text.
    app = web.Application(client_max_size=proxy.settings.max_body_bytes + 1)
    app[PROXY_KEY] = proxy
    for endpoint in ENDPOINTS:
        app.router.add_route("*", endpoint, proxy.endpoint(endpoint))
    app.router.add_get("/v1/models", proxy.models)
    app.router.add_get("/healthz", proxy.healthz)
    app.router.add_get("/readyz", proxy.readyz)
    app.router.add_get("/metrics", proxy.metrics)
    app.router.add_route("*", "/{tail:.*}", proxy.not_found)

    async def gateway_context(app: web.Application) -> Any:
        async with proxy.gateway:
            yield

    app.cleanup_ctx.append(gateway_context)
    return app


def _timed_out(limit: float) -> ProxyError:
    return ProxyError(
        504, f"The request took longer than the proxy's request_timeout ({limit:g} s).",
        code="request_timeout", should_retry=False,
    )


def _refuse(dialect: Provider, error: ProxyError, headers: Mapping[str, str]) -> web.Response:
    return web.Response(
        status=error.status,
        body=error_body(dialect, error),
        content_type=_JSON,
        headers={**headers, **error.headers()},
    )


def _family(path: str) -> str:
    """``"chat"`` for the chat endpoints (either dialect, translated), else the path."""
    path = path.partition("?")[0].rstrip("/")
    if dialect_of_path(path) is not None:
        return "chat"
    for endpoint in ENDPOINTS:
        if path.endswith(endpoint):
            return endpoint
    return path


def _families_of(config: GovernanceConfig) -> dict[str, str]:
    """Each model's endpoint family, checked: a fallback serves what its model serves.

    Raises:
        ConfigError: a model falls back to one that serves another endpoint.
    """
    families = {model.name: _family(model.path) for model in config.models}
    for name, chain in config.fallbacks.items():
        for other in chain:
            if families[other] != families[name]:
                raise ConfigError(
                    f"models.{name}.fallbacks names {other}, which serves {families[other]}, "
                    f"not {families[name]}: the proxy cannot send it the same request."
                )
    return families


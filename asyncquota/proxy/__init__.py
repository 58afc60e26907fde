"""An OpenAI- and Anthropic-compatible HTTP proxy over a Gateway: any client, any language.

    asyncquota proxy --config gateway.toml --port 8080

A service in Node, Go or Python points its SDK's base URL at the proxy and its API key at
a proxy key; the proxy routes, queues, paces and retries through the Gateway (tiers,
budget, fallback, translation) and answers in the provider's own shapes. One module a job::

    config.py     the [proxy] table of the gateway's TOML file
    auth.py       client keys, compared as SHA-256 digests in constant time
    limits.py     body size, JSON, the request's options and deadline
    replies.py    refusals in the provider's error JSON, retry and rate-limit headers
    streaming.py  a routed stream written chunk by chunk, ended on disconnect
    app.py        the routes (Proxy, make_app)
    server.py     serving it: SIGHUP reload, SIGTERM drain

Needs the ``proxy`` extra (``pip install 'asyncquota[proxy]'``) for ``/metrics``.
"""

from .app import ENDPOINTS, Proxy, make_app
from .auth import ApiKey, Keys
from .config import KeySpec, ProxySettings, load, parse_proxy
from .server import run, serve

__all__ = [
    "ENDPOINTS",
    "ApiKey",
    "KeySpec",
    "Keys",
    "Proxy",
    "ProxySettings",
    "load",
    "make_app",
    "parse_proxy",
    "run",
    "serve",
]

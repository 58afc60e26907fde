"""The proxy's ``[proxy]`` table, read from the gateway's own TOML file.

One file configures both: the gateway's sections (see :mod:`asyncquota.governance.config`)
and this one, which ``parse_config`` would refuse as unknown, so it is taken out first::

    [proxy]
    max_body_bytes = 4194304       # the largest request body (default 4 MiB)
    max_header_bytes = 8190        # the longest header line (default 8190)
    request_timeout = 600.0        # seconds a request may take in all, a stream included
    shutdown_grace = 30.0          # seconds in-flight requests get on SIGTERM
    [[proxy.keys]]
    name = "acme-web"              # how logs and errors name the key (never the key)
    key_env = "ACME_PROXY_KEY"     # or key_sha256 = "<hex>": no key is written in the file
    tenant = "acme"                # whose tier and budget its requests spend
    max_priority = "interactive"   # the most a request of this key may claim (default)

Parsing only checks (no environment variable is read: :mod:`.auth` does that), and names
what is wrong by its path in the file, as the governance configuration does.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..governance.config import ConfigError, GovernanceConfig, parse_config
from ..priority import Priority, coerce_priority

__all__ = ["KeySpec", "ProxySettings", "load", "parse_proxy"]

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_HEADER_BYTES = 8190
REQUEST_TIMEOUT = 600.0
SHUTDOWN_GRACE = 30.0

_FIELDS = ("max_body_bytes", "max_header_bytes", "request_timeout", "shutdown_grace", "keys")
_KEY_FIELDS = ("name", "key_env", "key_sha256", "tenant", "max_priority")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySpec:
    """One client key, as the file names it.

    Attributes:
        name: how logs and errors name it.
        key_env: the environment variable holding it, or None.
        key_sha256: its SHA-256 digest in hex, or None (exactly one of the two is set).
        tenant: the tenant its requests are for.
        max_priority: the most important class its requests may claim (an integer rank).
    """

    name: str
    tenant: str
    max_priority: int = Priority.INTERACTIVE
    key_env: str | None = None
    key_sha256: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    """The ``[proxy]`` table, checked.

    Attributes:
        max_body_bytes: the largest request body accepted (413 beyond).
        max_header_bytes: the longest request line or header field accepted.
        request_timeout: seconds one request may take in all, body, queue and stream
            included; also the longest deadline a client may ask for.
        shutdown_grace: seconds in-flight requests get to finish on SIGTERM.
        keys: the client keys.
    """

    max_body_bytes: int = MAX_BODY_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES
    request_timeout: float = REQUEST_TIMEOUT
    shutdown_grace: float = SHUTDOWN_GRACE
    keys: tuple[KeySpec, ...] = ()


def load(path: str | Path) -> tuple[ProxySettings, GovernanceConfig]:
    """Read the TOML file at ``path``: the ``[proxy]`` table, and the gateway's sections.

    Raises:
        ConfigError: the file is not valid UTF-8 TOML, or either part is invalid (the
            message names the field).
        OSError: the file cannot be read.
    """
    file = Path(path)
    try:
        data = tomllib.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file} is not UTF-8 text: {exc.reason} at byte {exc.start}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file} is not valid TOML: {exc}.") from None
    except RecursionError:
        raise ConfigError(f"{file} nests arrays or tables too deeply to be read.") from None
    if "proxy" not in data:
        raise ConfigError(f"{file} has no [proxy] table: the proxy needs at least its keys.")
    settings = parse_proxy(data.pop("proxy"))
    return settings, parse_config(data, base_dir=file.absolute().parent)


def parse_proxy(table: object) -> ProxySettings:
    """Check a parsed ``[proxy]`` table.

    Raises:
        ConfigError: anything invalid, named by its path (``proxy.keys[1].tenant``).
    """
    data = _table(table, "proxy", _FIELDS)
    keys = data.get("keys")
    if not isinstance(keys, list) or not keys:
        raise ConfigError(
            "proxy.keys must list at least one key ([[proxy.keys]] tables): a proxy "
            "without keys would refuse every request."
        )
    specs = tuple(_key(item, f"proxy.keys[{index}]") for index, item in enumerate(keys))
    for what in ("name", "key_env", "key_sha256"):
        seen: set[str] = set()
        for index, spec in enumerate(specs):
            value = getattr(spec, what)
            if value is not None and value.lower() in seen:
                raise ConfigError(f"proxy.keys[{index}].{what} repeats an earlier key's.")
            if value is not None:
                seen.add(value.lower())
    return ProxySettings(
        max_body_bytes=_integer(data, "max_body_bytes", MAX_BODY_BYTES, 1),
        max_header_bytes=_integer(data, "max_header_bytes", MAX_HEADER_BYTES, 256),
        request_timeout=_seconds(data, "request_timeout", REQUEST_TIMEOUT),
        shutdown_grace=_seconds(data, "shutdown_grace", SHUTDOWN_GRACE),
        keys=specs,
    )


def _key(item: object, path: str) -> KeySpec:
    data = _table(item, path, _KEY_FIELDS)
    name, tenant = _string(data, "name", path), _string(data, "tenant", path)
    key_env, digest = data.get("key_env"), data.get("key_sha256")
    if (key_env is None) == (digest is None):
        raise ConfigError(f"{path} needs exactly one of key_env and key_sha256.")
    if key_env is not None and not (isinstance(key_env, str) and _ENV_NAME.fullmatch(key_env)):
        # Not shown: a key pasted where its variable's name belongs is still a key.
        raise ConfigError(
            f"{path}.key_env must name an environment variable (letters, digits and _); "
            "the value given is not shown in case it is a secret."
        )
    if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise ConfigError(
            f"{path}.key_sha256 must be the key's SHA-256 digest, 64 hex digits "
            "(sha256sum of the key); the value given is not shown in case it is the key."
        )
    priority: object = data.get("max_priority", "interactive")
    try:
        if not isinstance(priority, str | int):
            raise TypeError(f"not {type(priority).__name__}")
        rank = coerce_priority(priority)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}.max_priority: {exc}") from None
    return KeySpec(
        name=name,
        tenant=tenant,
        max_priority=rank,
        key_env=key_env,
        key_sha256=None if digest is None else digest.lower(),
    )


def _table(value: object, path: str, fields: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path} must be a table, not {type(value).__name__}.")
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(fields)}."
            raise ConfigError(f"{path}.{key} is not a known field; {hint}")
    return value


def _string(data: Mapping[str, Any], field: str, path: str) -> str:
    value = data.get(field)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}.{field} must be a non-empty string.")
    return value


def _integer(data: Mapping[str, Any], field: str, default: int, minimum: int) -> int:
    value = data.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"proxy.{field} must be an integer >= {minimum}, not {value!r}.")
    return value


def _seconds(data: Mapping[str, Any], field: str, default: float) -> float:
    value = data.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        math.isfinite(value) and value > 0
    ):
        raise ConfigError(f"proxy.{field} must be a number of seconds > 0, not {value!r}.")
    return float(value)

"""Who is calling: the client's key, found among the configured ones in constant time.

A client presents its key as OpenAI's SDK does (``Authorization: Bearer <key>``) or as
Anthropic's does (``x-api-key: <key>``). The proxy keeps no key in clear: each configured
key is held as its SHA-256 digest (read from the environment and hashed at start, or
given as a digest in the file), the presented key is hashed, and the digest is compared
with every configured one by ``hmac.compare_digest``, so neither the comparison nor the
number of comparisons depends on which key, if any, matched. Keys are never logged: a
key is named by its configured ``name``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .config import KeySpec

__all__ = ["ApiKey", "Keys", "presented_key"]


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A client key the proxy accepts, and what it may do.

    Attributes:
        name: how logs and errors name it.
        tenant: the tenant its requests are for.
        max_priority: the most important class (an integer rank) its requests may claim.
    """

    name: str
    tenant: str
    max_priority: int
    digest: bytes = field(repr=False)


class Keys:
    """The accepted keys; :meth:`find` tells which one a request presented."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._keys = tuple(keys)

    @classmethod
    def from_specs(
        cls, specs: Sequence[KeySpec], environ: Mapping[str, str] | None = None
    ) -> Keys:
        """The keys the configuration names, those in ``key_env`` read from ``environ``.

        Raises:
            ValueError: a ``key_env`` variable is not set (named; its value never shown).
        """
        env = os.environ if environ is None else environ
        keys = []
        for spec in specs:
            if spec.key_env is not None:
                secret = env.get(spec.key_env)
                if not secret:
                    raise ValueError(
                        f"The proxy key {spec.name!r} names the environment variable "
                        f"{spec.key_env!r}, which is not set."
                    )
                digest = hashlib.sha256(secret.encode()).digest()
            else:
                assert spec.key_sha256 is not None
                digest = bytes.fromhex(spec.key_sha256)
            keys.append(ApiKey(spec.name, spec.tenant, spec.max_priority, digest))
        return cls(keys)

    def find(self, presented: str | None) -> ApiKey | None:
        """The key whose digest is that of ``presented`` (None: no key, or none matches)."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for key in self._keys:  # every key compared: the time says nothing of which one
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"<Keys {', '.join(key.name for key in self._keys)}>"


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents: ``Authorization: Bearer <key>``, else ``x-api-key``."""
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return credential.strip()
    key = headers.get("x-api-key")
    return key.strip() if key else None

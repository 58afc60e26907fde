"""URLs and request lines: scrubbed before they are shown, checked before they are sent.

Some upstreams take the API key in the query string (Gemini's ``?key=``), and a base URL
may carry a password (``https://user:pw@proxy``). Whatever shows a URL to a person (an
error message, a log line, an event, a ``repr``) passes it through :func:`redact_url`
(one URL) or :func:`redact_text` (free text that may contain URLs) first, so a key is
scrubbed in one place rather than remembered at each call site.

The other direction is what a caller may ask to send. :func:`join_path` puts a request
path under the configured base URL and refuses any path that would leave it (another
host, a scheme, ``..`` past the base path, in plain or percent-encoded dots);
:func:`check_method` and :func:`check_header` refuse what would split or forge a request
line (CR, LF, NUL and the other control characters). Each raises ``ValueError`` whose
message never repeats a secret.

Everything here is pure and synchronous; the ``redact_*`` functions never raise.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping

__all__ = [
    "REDACTED",
    "check_header",
    "check_headers",
    "check_method",
    "join_path",
    "redact_text",
    "redact_url",
]

REDACTED = "***"
"""What stands for a query value or a userinfo in a scrubbed URL."""

_BARE_TOKEN = 12  # in free text, a nameless query item this long may be a key

# The authority's userinfo: everything up to its last "@" (a password may hold an
# unencoded "@", which parsers split at the last one).
_USERINFO = re.compile(r"(//)[^/?#\s]*@")
# In free text, a token that may be a URL or a path with a query: a run of non-space
# characters holding "?" or "://", or a path ("/...") with a fragment.
_URLISH = re.compile(r"\S*(?:\?|://)\S*|/\S*#\S*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # a tab is allowed in a value
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
_BASE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*)([^?#]*)")
# Percent-encoded characters that some servers decode before they normalise a path.
_ENCODED_SEPARATOR = re.compile(r"%(?:2[eEfF]|5[cC])")
_DECODED = {"%2e": ".", "%2f": "/", "%5c": "\\"}


def _redact_parameters(text: str, bare_min: int) -> str:
    """``a=1&b=2`` → ``a=***&b=***``; an item without ``=`` of ``bare_min`` or more
    characters is a value too (``?sk-123`` → ``?***``)."""
    items = []
    for item in text.split("&"):
        name, equals, _ = item.partition("=")
        if equals:
            items.append(f"{name}={REDACTED}")
        else:
            items.append(REDACTED if item and len(item) >= bare_min else item)
    return "&".join(items)


def redact_url(url: str) -> str:
    """``url`` with every query and fragment value and its userinfo replaced by ``***``.

    ``https://u:pw@host/v1/x?key=AIza&alt=sse`` → ``https://***@host/v1/x?key=***&alt=***``.
    Parameter names stay, so a reader still sees which ones were sent. Works on absolute
    URLs and on bare paths (``/x?key=1``); any string is accepted, nothing raises, and a
    string without ``?``, ``#`` or ``@`` is returned as it is.
    """
    if not isinstance(url, str):
        url = str(url)
    if "?" not in url and "#" not in url and "@" not in url:
        return url  # the common case (every event's path): nothing to scrub
    return _redact(url, 1)


def _redact(url: str, bare_min: int) -> str:
    if "?" not in url and "#" not in url and "@" not in url:
        return url
    fragment_at = url.find("#")
    query_at = url.find("?", 0, fragment_at if fragment_at != -1 else len(url))
    head_end = query_at if query_at != -1 else fragment_at if fragment_at != -1 else len(url)
    shown = _USERINFO.sub(rf"\g<1>{REDACTED}@", url[:head_end])
    if query_at != -1:
        query_end = fragment_at if fragment_at != -1 else len(url)
        shown += "?" + _redact_parameters(url[query_at + 1 : query_end], bare_min)
    if fragment_at != -1:
        shown += "#" + _redact_parameters(url[fragment_at + 1 :], bare_min)
    return shown


def redact_text(text: str, *urls: str) -> str:
    """``text`` with every URL or path in it scrubbed as :func:`redact_url` does.

    For messages built from other libraries' exceptions and from callers' paths: each
    whitespace-separated token holding a query, a fragment or a userinfo is scrubbed (a
    nameless item only from 12 characters on: prose asks questions too). The
    secrets of ``urls`` (their query values and userinfo) are also cut wherever they
    appear on their own, in case a library quoted them in another spelling. Never raises.
    """
    if not isinstance(text, str):
        text = str(text)
    for url in urls:
        for secret in sorted(_secrets(url), key=len, reverse=True):
            text = text.replace(secret, REDACTED)
    if "?" not in text and "#" not in text and "@" not in text:
        return text
    # In prose, "?" also ends questions ("gpt-4o?"): a bare item there is scrubbed only
    # when it is long enough to be a token.
    return _URLISH.sub(lambda match: _redact(match.group(), _BARE_TOKEN), text)


def _secrets(url: str) -> set[str]:
    """The parts of ``url`` that may be credentials: query and fragment values, userinfo."""
    secrets: set[str] = set()
    if not isinstance(url, str):
        return secrets
    match = _USERINFO.search(url.partition("?")[0].partition("#")[0])
    if match is not None:
        userinfo = match.group()[2:-1]
        secrets.add(userinfo)
        secrets.update(userinfo.split(":"))
    tail = url.partition("?")[2] or url.partition("#")[2]
    for item in re.split(r"[&#]", tail):
        value = item.partition("=")[2] if "=" in item else item
        secrets.add(value)
    # Short values ("1", "sse", "true") are not secrets, and cutting them would maim text.
    return {secret for secret in secrets if len(secret) >= 4}


def _dot(segment: str) -> str | None:
    """``"."`` or ``".."`` if the segment is one, in plain or percent-encoded dots."""
    if "%" in segment:
        segment = re.sub(r"%2[eE]", ".", segment)
    return segment if segment in (".", "..") else None


def _climbs(segments: Iterable[str]) -> tuple[list[str], bool]:
    """RFC 3986 ``remove_dot_segments`` over a path's segments, and whether it climbed out.

    Returns the kept segments (a trailing ``""`` when the path ends in ``/``, ``.`` or
    ``..``) and True when a ``..`` would have gone above the first segment.
    """
    kept: list[str] = []
    climbed = False
    items = list(segments)
    for index, segment in enumerate(items):
        dot = _dot(segment)
        last = index == len(items) - 1
        if dot == "..":
            if kept:
                kept.pop()
            else:
                climbed = True
        elif dot is None:
            kept.append(segment)
        if dot is not None and last:
            kept.append("")
    return kept, climbed


@functools.lru_cache(maxsize=64)
def _split_base(base_url: str) -> tuple[str, str]:
    match = _BASE.fullmatch(base_url)
    if match is None or _CONTROL.search(base_url):
        raise ValueError(
            f"The base URL {redact_url(base_url)!r} is not an absolute URL without a query "
            "(scheme://host/optional/path)."
        )
    origin, path = match.groups()
    return origin, path.rstrip("/")


def join_path(base_url: str, path: str) -> str:
    """The URL of ``path`` under ``base_url``: the base's path, then ``path``, dots resolved.

    ``join_path("https://h/v1", "/chat/completions?x=1")`` →
    ``"https://h/v1/chat/completions?x=1"``. Dot segments are resolved as RFC 3986
    ``remove_dot_segments`` does (``%2e`` counts as a dot), so ``/a/../b`` becomes ``/b``;
    the query is kept as it is.

    Raises:
        ValueError: ``path`` does not start with ``/``, starts with ``//`` (another host),
            contains a control character (CR, LF, NUL, ...) or a backslash, or climbs
            above the base path with ``..`` (also when ``%2f``/``%5c`` are read as
            separators, as some servers do); or ``base_url`` is not an absolute URL
            without a query. The message shows both scrubbed.
    """
    if not isinstance(path, str):
        raise ValueError(f"A request path must be a string, not {type(path).__name__}.")
    origin, base_path = _split_base(base_url)
    if not path.startswith("/") or path.startswith("//"):
        raise ValueError(
            f"A request path must start with a single '/' and stay under {redact_url(base_url)}, "
            f"not {redact_url(path)!r}."
        )
    if _CONTROL.search(path):
        raise ValueError(
            f"The request path {redact_url(path)!r} contains a control "
            "character (CR, LF, NUL, ...); a path may not."
        )
    if "\\" in path:
        raise ValueError(
            f"The request path {redact_url(path)!r} contains a backslash, which some servers "
            "read as '/'; encode it as %5C if it is meant."
        )
    where, mark, query = path.partition("?")
    if "#" in where:
        where, hashmark, fragment = where.partition("#")
        query, mark = hashmark + fragment, ""
    if "." in where or "%" in where:
        # The path as a lenient server would read it must not climb out either.
        lenient = _ENCODED_SEPARATOR.sub(lambda m: _DECODED[m.group().lower()], where).replace(
            "\\", "/"
        )
        kept, climbed = _climbs(where.split("/")[1:])
        if climbed or _climbs(lenient.split("/")[1:])[1]:
            raise ValueError(
                f"The request path {redact_url(path)!r} climbs above the base path "
                f"{base_path or '/'!r} with '..'; it must stay under {redact_url(base_url)}."
            )
        where = "/" + "/".join(kept)
    return f"{origin}{base_path}{where}{mark}{query}"


def check_method(method: str) -> str:
    """``method`` if it is an HTTP token (``GET``, ``POST``, ...), else ValueError.

    Raises:
        ValueError: not a string, empty, or holding anything but token characters (a
            space, CR, LF, NUL, ...): it would split the request line.
    """
    if type(method) is str and method in _METHODS:  # the usual ones: tokens, no regex
        return method
    if not isinstance(method, str) or not _TOKEN.fullmatch(method):
        shown = repr(method) if isinstance(method, str) else type(method).__name__
        raise ValueError(
            f"The HTTP method {shown} is not a token (letters, digits and !#$%&'*+-.^_`|~)."
        )
    return method


def check_header(name: str, value: str) -> None:
    """Refuse a header that would split or forge the request.

    The name must be an HTTP token; the value may hold any character but CR, LF, NUL and
    the other control characters (a tab is allowed). The value is never repeated in the
    message: it may be a key.

    Raises:
        ValueError: a name or value that is not a string, an empty or malformed name, or
            a control character in the value.
    """
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        shown = repr(name) if isinstance(name, str) else type(name).__name__
        raise ValueError(
            f"The header name {shown} is not a token (letters, digits and !#$%&'*+-.^_`|~)."
        )
    if not isinstance(value, str):
        raise ValueError(
            f"The value of header {name!r} must be a string, not {type(value).__name__}."
        )
    found = _CONTROL_IN_VALUE.search(value)
    if found is not None:
        raise ValueError(
            f"The value of header {name!r} contains the control character "
            f"{found.group()!r} at position {found.start()}; a header value may not "
            "(it would split the request). The value is not shown in case it is a secret."
        )


def check_headers(headers: Mapping[str, str]) -> None:
    """:func:`check_header` on every item of ``headers``.

    Raises:
        ValueError: the first header that fails.
    """
    for name, value in headers.items():
        check_header(name, value)

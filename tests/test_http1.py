"""HttpTransport (asyncquota.http1) against scripted upstreams on loopback, real time.

Every upstream here is a raw asyncio server on 127.0.0.1 (or ::1), port 0: it reads each
request head and answers bytes the test wrote, so every byte of a reply is in the test's
hands. Every wait is bounded (``LIMIT``), every server is closed, and every request
carries a key in its query and in its Authorization header, so each failure's message is
checked for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import random
import socket
import ssl
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import uvloop
from multidict import CIMultiDict, CIMultiDictProxy

from asyncquota import TransportError
from asyncquota.http1 import HttpTransport
from asyncquota.transport import MAX_BODY_BYTES, Request, Response, SSEEvent

pytestmark = pytest.mark.looptime(False)

LIMIT = 3.0
"""The longest any wait in this file may take, in real seconds: no test can hang."""

SECRET = "sk-secret"
"""What every request carries in its query and its Authorization header, as API keys are."""

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"


# --- The scripted upstream --------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the upstream read it."""

    method: str
    target: str
    version: str
    headers: CIMultiDict[str]
    body: bytes
    connection: int  # which accepted connection carried it: 1 for the first

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


Then = Literal["keep", "close", "reset", "linger"]
"""After a reply: read the next request, close, reset (TCP RST), or wait for the client to go."""

Answer = Callable[["Conn", Seen], Awaitable[bool]]
"""How an upstream answers one request; True reads the next request on the connection."""


class Conn:
    """The upstream's side of one connection."""

    def __init__(
        self,
        upstream: Upstream,
        number: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.upstream = upstream
        self.number = number
        self.reader = reader
        self.writer = writer
        self.served = 0
        self.left = False
        self._retired = False

    async def read_request(self) -> Seen | None:
        """The next request, or None when the client hung up."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            self.upstream.received += exc.partial
            return None
        except ConnectionError:
            return None
        self.upstream.received += head
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.add(name, value.strip())
        body = await self.reader.readexactly(int(headers.get("Content-Length", "0")))
        self.upstream.received += body
        self.served += 1
        return Seen(method, target, version, headers, body, self.number)

    async def send(self, data: bytes) -> bool:
        """Write ``data``; False when the client has already gone."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            return False
        return True

    async def reply(self, data: bytes, then: Then = "keep") -> bool:
        """Write a scripted reply, then do ``then``; True to read the next request."""
        await self.send(data)
        if then == "reset":
            self.reset()
        elif then == "linger":
            await self.client_leaves()
        return then == "keep"

    def reset(self) -> None:
        """Close with a TCP RST (linger 0): a reset, not an orderly goodbye."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()
        self.retire()

    async def client_leaves(self) -> bool:
        """Read (and drop) whatever comes until the client closes or resets the connection."""
        try:
            async with asyncio.timeout(LIMIT):
                while data := await self.reader.read(65536):
                    self.upstream.received += data
        except TimeoutError:
            self.upstream.errors.append(f"the client never left connection {self.number}")
            return False
        except ConnectionError:
            pass
        self.hung_up()
        return True

    async def wait(self, event: asyncio.Event, what: str) -> bool:
        """Wait (bounded) for ``event``; a wait that runs out is noted as the upstream's error."""
        try:
            async with asyncio.timeout(LIMIT):
                await event.wait()
        except TimeoutError:
            self.upstream.errors.append(f"{what} never happened")
            return False
        return True

    def hung_up(self) -> None:
        if not self.left:
            self.left = True
            self.upstream.hangups += 1
            self.retire()

    def retire(self) -> None:
        """Count this connection as closed from now on (once)."""
        if not self._retired:
            self._retired = True
            self.upstream.open -= 1


class Upstream:
    """What a scripted server saw: requests, bytes, connections (open, peak) and hang-ups.

    ``errors`` collects what went wrong on its side (a bounded wait that ran out, a request
    it could not parse); leaving ``upstream()`` asserts there was none.
    """

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.url = ""
        self.requests: list[Seen] = []
        self.received = bytearray()
        self.errors: list[str] = []
        self.accepted = 0
        self.open = 0
        self.peak = 0
        self.hangups = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.append(writer)
        self.accepted += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        conn = Conn(self, self.accepted, reader, writer)
        try:
            while True:
                seen = await conn.read_request()
                if seen is None:
                    conn.hung_up()
                    return
                self.requests.append(seen)
                if not await self.answer(conn, seen):
                    return
        except asyncio.CancelledError:
            # Only ``stop`` cancels a handler; ending quietly keeps asyncio's stream callback
            # from logging the cancellation as an error.
            pass
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.retire()
            if not writer.is_closing():
                writer.close()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.transport.abort()


@contextlib.asynccontextmanager
async def upstream(
    answer: Answer, *, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
) -> AsyncIterator[Upstream]:
    """A scripted server on ``host``, a free port; yields what it sees (``.url`` its base)."""
    seen = Upstream(answer)
    server = await asyncio.start_server(seen.serve, host, 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    seen.url = f"{'https' if tls else 'http'}://{shown}:{port}"
    try:
        yield seen
        # Whatever the test checked, the upstream's own waits and parsing went as scripted.
        assert seen.errors == []
    finally:
        server.close()
        await seen.stop()
        await server.wait_closed()


def replying(*replies: bytes, then: Then = "keep") -> Answer:
    """Answer the n-th request with ``replies[n]`` (the last one again once they run out)."""

    async def answer(conn: Conn, seen: Seen) -> bool:
        index = min(len(conn.upstream.requests), len(replies)) - 1
        return await conn.reply(replies[index], then)

    return answer


def reply(body: bytes = b"", *headers: str, status: str = "200 OK") -> bytes:
    """An HTTP/1.1 reply framed by Content-Length, with ``headers`` as written."""
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


# --- The client's side ------------------------------------------------------------------------


def request(
    base: str,
    path: str = "/v1/x",
    method: str = "GET",
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float | None = LIMIT,
    key: bool = True,
) -> Request:
    """A request to ``base + path`` carrying the key in its query and Authorization header."""
    url = base + path
    given = dict(headers or {})
    if key:
        url += ("&" if "?" in path else "?") + f"key={SECRET}"
        given.setdefault("Authorization", f"Bearer {SECRET}")
    return Request(method, url, given, body, timeout)


async def failure(attempt: Awaitable[object]) -> TransportError:
    """The TransportError ``attempt`` ends in; its message must not show the key."""
    with pytest.raises(TransportError) as caught:
        await asyncio.wait_for(attempt, LIMIT)
    shown = str(caught.value) + repr(caught.value)
    assert SECRET not in shown
    return caught.value


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (at most LIMIT) for state that other tasks or the kernel change."""
    try:
        async with asyncio.timeout(LIMIT):
            # Polled: the pool's counters and the kernel's FIN have no event to wait on.
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {LIMIT} s") from None


def pool(transport: HttpTransport) -> dict[str, int]:
    stats = transport.statistics()
    return {
        "in_flight": stats.in_flight,
        "in_use": stats.connections_in_use,
        "open": stats.connections_open,
        "failures": stats.failures,
    }


def idle(open_: int, failures: int = 0) -> dict[str, int]:
    """What ``pool`` shows once every attempt has ended."""
    return {"in_flight": 0, "in_use": 0, "open": open_, "failures": failures}


MakeTransport = Callable[..., HttpTransport]


@pytest.fixture
async def make() -> AsyncIterator[MakeTransport]:
    """Builds transports, and closes each at the end of the test."""
    made: list[HttpTransport] = []

    def make_transport(**options: Any) -> HttpTransport:
        transport = HttpTransport(**options)
        made.append(transport)
        return transport

    yield make_transport
    for transport in made:
        await transport.aclose()


# --- A request goes out as written ------------------------------------------------------------


async def test_a_get_keeps_its_query_names_host_and_port_and_returns_status_headers_and_body(
    make: MakeTransport,
) -> None:
    answer = replying(
        reply(
            b'{"ok": true}',
            "X-RateLimit-Remaining-Requests:   41  ",
            "Set-Cookie: a=1",
            "Set-Cookie: b=2",
            status="201 Created",
        )
    )
    async with upstream(answer) as up:
        transport = make()
        response = await transport.send(
            request(up.url, "/v1/models/m:generate?alt=sse&q=a%20b%2Fc")
        )
        assert response.status == 201
        assert response.body == b'{"ok": true}'
        assert isinstance(response.headers, CIMultiDictProxy)
        assert response.headers["x-ratelimit-remaining-requests"] == "41"
        assert response.headers.getall("SET-COOKIE") == ["a=1", "b=2"]
        (seen,) = up.requests
        assert (seen.method, seen.version) == ("GET", "HTTP/1.1")
        assert seen.target == f"/v1/models/m:generate?alt=sse&q=a%20b%2Fc&key={SECRET}"
        assert seen.headers.getall("Host") == [up.url.removeprefix("http://")]
        assert seen.headers.getall("Authorization") == [f"Bearer {SECRET}"]
        assert seen.headers["Accept-Encoding"] == "gzip, deflate"
        assert "Content-Length" not in seen.headers
        assert seen.body == b""


async def test_a_post_sends_its_body_with_its_own_length_never_the_callers_framing_headers(
    make: MakeTransport,
) -> None:
    async with upstream(replying(reply(b"{}"))) as up:
        transport = make()
        body = '{"messages": ["héllo"]}'.encode()
        headers = {
            "Content-Type": "application/json",
            "Content-Length": "999",
            "Transfer-Encoding": "chunked",
        }
        response = await transport.send(
            request(up.url, "/v1/chat", "POST", headers=headers, body=body)
        )
        assert response.status == 200
        (seen,) = up.requests
        assert seen.body == body
        assert seen.headers.getall("Content-Length") == [str(len(body))]
        assert "Transfer-Encoding" not in seen.headers
        assert seen.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("method", "lengths"),
    [("POST", ["0"]), ("PUT", ["0"]), ("PATCH", ["0"]), ("GET", []), ("DELETE", [])],
)
async def test_post_put_and_patch_without_a_body_say_content_length_zero_others_say_nothing(
    make: MakeTransport, method: str, lengths: list[str]
) -> None:
    async with upstream(replying(reply(b"ok"))) as up:
        response = await make().send(request(up.url, "/v1/x", method))
        assert response.body == b"ok"
        (seen,) = up.requests
        assert seen.method == method
        assert seen.headers.getall("Content-Length", []) == lengths


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Evil", f"{SECRET}\r\nX-Injected: 1"),
        ("X-Evil", f"{SECRET}\nX-Injected: 1"),
        ("X-Evil", f"{SECRET}\rX-Injected: 1"),
        ("X-Evil\r\nX-Injected", SECRET),
        ("X-Evil\nX-Injected", SECRET),
    ],
    ids=["crlf-in-value", "lf-in-value", "cr-in-value", "crlf-in-name", "lf-in-name"],
)
async def test_a_header_holding_cr_or_lf_is_refused_and_nothing_is_sent(
    make: MakeTransport, name: str, value: str
) -> None:
    async with upstream(replying(reply(b"ok"))) as up:
        transport = make()
        await failure(transport.send(request(up.url, headers={name: value})))
        await failure(transport.open_stream(request(up.url, headers={name: value})))
        assert bytes(up.received) == b""
        assert pool(transport)["in_flight"] == 0
        # The refusal spoiled nothing: the next request goes out as usual.
        assert (await transport.send(request(up.url))).body == b"ok"
        assert len(up.requests) == 1
        assert b"X-Injected" not in up.received


async def test_userinfo_in_the_url_becomes_basic_authorization_unless_the_request_has_its_own(
    make: MakeTransport,
) -> None:
    async with upstream(replying(reply(b"ok"))) as up:
        transport = make()
        with_userinfo = up.url.replace("http://", "http://me:hunter2@")
        await transport.send(request(with_userinfo, "/v1/x", key=False))
        await transport.send(request(with_userinfo, "/v1/x"))
        basic, own = up.requests
        expected = "Basic " + base64.b64encode(b"me:hunter2").decode()
        assert basic.headers.getall("Authorization") == [expected]
        assert own.headers.getall("Authorization") == [f"Bearer {SECRET}"]
        for seen in (basic, own):
            assert seen.headers["Host"] == up.url.removeprefix("http://")
            assert "hunter2" not in seen.target


def test_an_ipv6_literal_is_bracketed_in_the_host_header() -> None:
    # What is written, not a round trip: a CI machine may have no ::1 to serve on.
    from asyncquota.http1 import _encode, _Target

    for url, host in (
        ("http://[::1]:8080/v1?q=1", "[::1]:8080"),
        ("https://[2001:db8::7]/v1", "[2001:db8::7]"),
    ):
        head = _encode(Request("GET", url, {}, None, 1.0), _Target(url)).decode()
        assert head.split("\r\n")[1] == f"Host: {host}"
        assert head.startswith("GET /v1")


# --- HTTPS --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA, and a certificate it signed for 127.0.0.1 (made by the openssl CLI)."""
    where = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)

    ca_extensions = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign"]
    openssl(
        *("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2"),
        *("-subj", "/CN=asyncquota test CA", "-addext", ca_extensions[0]),
        *("-addext", ca_extensions[1]),
    )
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (where / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        *("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext"),
    )
    return Certificates(where / "ca.pem", where / "server.pem", where / "server.key")


def server_tls(certificates: Certificates) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert, certificates.key)
    return context


async def test_an_https_url_is_sent_over_tls_and_its_connection_kept(
    make: MakeTransport, certificates: Certificates
) -> None:
    async with upstream(replying(reply(b"secure")), tls=server_tls(certificates)) as up:
        assert up.url.startswith("https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=str(certificates.ca))
        transport = make(ssl_context=trusting)
        first = await transport.send(request(up.url, "/v1/x?alt=sse"))
        second = await transport.send(request(up.url))
        assert (first.body, second.body) == (b"secure", b"secure")
        assert up.requests[0].target == f"/v1/x?alt=sse&key={SECRET}"
        assert up.requests[0].headers["Host"] == up.url.removeprefix("https://")
        assert up.accepted == 1
        assert pool(transport) == idle(1)


async def test_an_https_upstream_whose_certificate_is_not_trusted_is_connect_failed(
    make: MakeTransport, certificates: Certificates
) -> None:
    async with upstream(replying(reply(b"secure")), tls=server_tls(certificates)) as up:
        transport = make()  # the system's trust store: our throwaway CA is not in it
        error = await failure(transport.send(request(up.url)))
        assert error.reason == "connect_failed"
        assert up.requests == []
        assert pool(transport) == idle(0, failures=1)


# --- Replies: framing, interim replies, bodiless replies, codings -----------------------------


async def test_a_chunked_body_with_extensions_and_trailers_is_joined_and_its_connection_kept(
    make: MakeTransport,
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n"
        b'6 ; other="quoted"\r\n world\r\n'
        b"A\r\n0123456789\r\n"
        b"0\r\nX-Checksum: abc\r\nX-Other: d\r\n\r\n"
    )
    async with upstream(replying(chunked, reply(b"second"))) as up:
        transport = make()
        first = await transport.send(request(up.url))
        second = await transport.send(request(up.url))
        assert first.body == b"hello world0123456789"
        assert second.body == b"second"
        assert [seen.connection for seen in up.requests] == [1, 1]
        assert pool(transport) == idle(1)


async def test_a_body_without_length_or_chunks_is_read_until_eof_and_its_connection_not_reused(
    make: MakeTransport,
) -> None:
    until_eof = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the very end"
    async with upstream(replying(until_eof, then="close")) as up:
        transport = make()
        first = await transport.send(request(up.url))
        second = await transport.send(request(up.url))
        assert first.body == second.body == b"until the very end"
        assert [seen.connection for seen in up.requests] == [1, 2]
        assert pool(transport) == idle(0)


async def test_interim_1xx_replies_are_skipped(make: MakeTransport) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        + reply(b"final", "X-Final: yes")
    )
    async with upstream(replying(interim, reply(b"second"))) as up:
        transport = make()
        first = await transport.send(request(up.url))
        assert (first.status, first.body, first.headers["x-final"]) == (200, b"final", "yes")
        assert (await transport.send(request(up.url))).body == b"second"
        assert [seen.connection for seen in up.requests] == [1, 1]


@pytest.mark.parametrize(
    ("method", "head"),
    [
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: "v1"\r\n\r\n'),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ],
    ids=["204", "304-with-length", "head-with-length", "head-chunked"],
)
async def test_204_304_and_replies_to_head_have_no_body_and_the_connection_serves_again(
    make: MakeTransport, method: str, head: bytes
) -> None:
    async with upstream(replying(head, reply(b"second"))) as up:
        transport = make()
        first = await transport.send(request(up.url, method=method))
        second = await transport.send(request(up.url))
        assert first.body == b""
        assert second.body == b"second"
        assert [seen.connection for seen in up.requests] == [1, 1]
        assert pool(transport) == idle(1)


def compress(coding: str, data: bytes) -> bytes:
    return gzip.compress(data) if coding == "gzip" else zlib.compress(data)


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_gzip_or_deflate_body_is_decompressed(
    make: MakeTransport, coding: str, framing: str
) -> None:
    text = b'{"text": "' + b"squeezed " * 2000 + b'"}'
    packed = compress(coding, text)
    if framing == "chunked":
        middle = len(packed) // 2
        raw = (
            (
                f"HTTP/1.1 200 OK\r\nContent-Encoding: {coding}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
            + chunk(packed[:middle])
            + chunk(packed[middle:])
            + LAST_CHUNK
        )
    else:
        raw = reply(packed, f"Content-Encoding: {coding}")
    async with upstream(replying(raw, reply(b"second"))) as up:
        transport = make()
        assert (await transport.send(request(up.url))).body == text
        assert (await transport.send(request(up.url))).body == b"second"
        assert up.requests[0].headers["Accept-Encoding"] == "gzip, deflate"
        assert [seen.connection for seen in up.requests] == [1, 1]


# --- Keep-alive ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "reused"),
    [
        (reply(b"first"), True),
        (reply(b"first", "Connection: keep-alive"), True),
        (reply(b"first", "Connection: close"), False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nfirst", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nfirst", True),
        (reply(b"first") + reply(b"stray"), False),
        (reply(b"first") + b"\r\n", False),
    ],
    ids=[
        "http11",
        "http11-keep-alive",
        "connection-close",
        "http10",
        "http10-keep-alive",
        "a-second-reply-after-the-end",
        "bytes-after-the-end",
    ],
)
async def test_a_connection_is_reused_only_after_a_complete_reply_that_allows_it(
    make: MakeTransport, first: bytes, reused: bool
) -> None:
    # The upstream keeps every connection open: closing one is the client's decision.
    async with upstream(replying(first, reply(b"second"))) as up:
        transport = make()
        assert (await transport.send(request(up.url))).body == b"first"
        assert (await transport.send(request(up.url))).body == b"second"
        assert [seen.connection for seen in up.requests] == ([1, 1] if reused else [1, 2])
        if not reused:
            await until(lambda: up.hangups == 1, "the client closed the spent connection")
        assert pool(transport) == idle(1)


async def test_a_pooled_connection_the_upstream_closes_while_idle_is_not_reused(
    make: MakeTransport,
) -> None:
    async with upstream(replying(reply(b"ok"), then="close")) as up:
        transport = make()
        assert (await transport.send(request(up.url))).body == b"ok"
        await until(lambda: pool(transport)["open"] == 0, "the client dropped the closed socket")
        assert (await transport.send(request(up.url))).body == b"ok"
        assert [seen.connection for seen in up.requests] == [1, 2]


async def test_an_idle_connection_is_closed_after_keepalive_seconds(make: MakeTransport) -> None:
    async with upstream(replying(reply(b"ok"))) as up:
        transport = make(keepalive=0.05)
        assert (await transport.send(request(up.url))).body == b"ok"
        await until(lambda: up.hangups == 1, "the client closed its idle connection")
        assert pool(transport) == idle(0)
        assert (await transport.send(request(up.url))).body == b"ok"
        assert [seen.connection for seen in up.requests] == [1, 2]


def holding(release: asyncio.Event) -> Answer:
    """Echo each request's path; hold the replies to ``/hold`` until ``release``."""

    async def answer(conn: Conn, seen: Seen) -> bool:
        if seen.path == "/hold":
            await conn.wait(release, "the release of /hold")
        return await conn.reply(reply(seen.path.encode()))

    return answer


async def test_callers_beyond_the_bound_wait_and_are_served_first_come_first_served(
    make: MakeTransport,
) -> None:
    release = asyncio.Event()
    async with upstream(holding(release)) as up:
        transport = make(max_connections=1)
        tasks = [asyncio.create_task(transport.send(request(up.url, "/hold")))]
        await until(lambda: len(up.requests) == 1, "the first request reached the upstream")
        for path in ("/a", "/b", "/c", "/d"):
            tasks.append(asyncio.create_task(transport.send(request(up.url, path))))
            await until(lambda: pool(transport)["in_flight"] == len(tasks), f"{path} is waiting")
        assert len(up.requests) == 1
        assert pool(transport)["open"] == 1
        release.set()
        replies = await asyncio.wait_for(asyncio.gather(*tasks), LIMIT)
        assert [r.body for r in replies] == [b"/hold", b"/a", b"/b", b"/c", b"/d"]
        assert [seen.path for seen in up.requests] == ["/hold", "/a", "/b", "/c", "/d"]
        assert up.accepted == 1


async def test_waiting_for_a_free_connection_is_bounded_by_the_request_timeout(
    make: MakeTransport,
) -> None:
    release = asyncio.Event()
    async with upstream(holding(release)) as up:
        transport = make(max_connections=1)
        holder = asyncio.create_task(transport.send(request(up.url, "/hold")))
        await until(lambda: len(up.requests) == 1, "the first request reached the upstream")
        error = await failure(transport.send(request(up.url, "/late", timeout=0.2)))
        assert error.reason == "timeout"
        assert [seen.path for seen in up.requests] == ["/hold"]
        release.set()
        assert (await asyncio.wait_for(holder, LIMIT)).body == b"/hold"
        assert pool(transport) == idle(1, failures=1)
        assert up.accepted == 1


async def test_two_thousand_requests_from_fifty_callers_share_four_connections_the_server_ends(
    make: MakeTransport,
) -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        last = conn.served == 7
        if last:
            conn.retire()  # closed from here on, before the client can learn of it
        await conn.send(reply(seen.path.encode(), *(["Connection: close"] if last else [])))
        return not last

    async with upstream(answer) as up:
        transport = make(max_connections=4)
        bodies: dict[str, bytes] = {}

        async def caller(number: int) -> None:
            for i in range(40):
                path = f"/n/{number}/{i}"
                response = await transport.send(Request("GET", up.url + path, timeout=10))
                bodies[path] = response.body

        async with asyncio.timeout(30):
            await asyncio.gather(*(caller(number) for number in range(50)))
        assert len(bodies) == 2000
        assert all(body == path.encode() for path, body in bodies.items())
        assert len(up.requests) == 2000
        assert up.peak <= 4
        # Every connection carried its 7 requests, but for the (at most 4) last ones.
        assert 2000 // 7 <= up.accepted <= 2000 // 7 + 4
        stats = transport.statistics()
        assert (stats.requests_sent, stats.failures, stats.in_flight) == (2000, 0, 0)
        assert stats.connections_in_use == 0
        assert stats.connections_open <= 4


# --- Failures -----------------------------------------------------------------------------------


async def test_a_refused_connection_is_connect_failed(
    make: MakeTransport, refusing_port: int
) -> None:
    transport = make()
    base = f"http://me:hunter2@127.0.0.1:{refusing_port}"
    for attempt in (transport.send, transport.open_stream):
        error = await failure(attempt(request(base, "/v1/x?alt=sse")))
        assert error.reason == "connect_failed"
        assert "hunter2" not in str(error)
    assert pool(transport) == idle(0, failures=2)


@contextlib.contextmanager
def swallowing_port() -> Any:
    """A loopback port whose connects hang: it listens, never accepts, its queue full.

    Linux drops a SYN to a full accept queue and the client keeps retrying it, as a
    broken route (an IPv6 address with no way there) does with every connect.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):  # the queue holds backlog + 1; one more to be sure
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_a_host_address_that_swallows_connects_is_passed_over_for_the_next(
    make: MakeTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host resolves to two addresses, as a name with IPv6 and IPv4 does; the first
    # swallows every connect. Tried one after another, the request would run out of its
    # time (LIMIT) inside the first connect (its timeout is ten times that).
    async with upstream(replying(reply(b"second address"))) as up:
        good = int(up.url.rsplit(":", 1)[1])
        with swallowing_port() as bad:
            loop = asyncio.get_running_loop()
            resolved = [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", bad)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", good)),
            ]
            asked: list[tuple[object, object]] = []

            async def getaddrinfo(host: object, port: object, **_: object) -> list[Any]:
                asked.append((host, port))
                return resolved

            monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
            transport = make(connect_timeout=10 * LIMIT)
            response = await asyncio.wait_for(
                transport.send(request(f"http://llm.example:{good}")), LIMIT
            )
        assert response.body == b"second address"
        assert asked == [("llm.example", good)]
        assert up.requests[0].headers["Host"] == f"llm.example:{good}"


@pytest.mark.parametrize(
    "sent",
    [
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhalf\r\n",
    ],
    ids=["nothing", "half-a-head", "half-a-body", "half-a-chunked-body"],
)
async def test_no_complete_reply_within_the_timeout_is_a_timeout_and_drops_the_connection(
    make: MakeTransport, sent: bytes
) -> None:
    async with upstream(replying(sent, then="linger")) as up:
        transport = make()
        error = await failure(transport.send(request(up.url, timeout=0.2)))
        assert error.reason == "timeout"
        await until(lambda: up.hangups == 1, "the client dropped the connection")
        assert pool(transport) == idle(0, failures=1)


async def test_a_stream_whose_head_does_not_come_in_time_is_a_timeout(
    make: MakeTransport,
) -> None:
    async with upstream(replying(b"HTTP/1.1 200 OK\r\n", then="linger")) as up:
        transport = make()
        error = await failure(transport.open_stream(request(up.url, timeout=0.2)))
        assert error.reason == "timeout"
        await until(lambda: up.hangups == 1, "the client dropped the connection")
        assert pool(transport) == idle(0, failures=1)


@pytest.mark.parametrize(
    ("sent", "then"),
    [
        (b"", "close"),
        (b"", "reset"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "close"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", "close"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", "reset"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n", "close"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npar", "close"),
    ],
    ids=[
        "closed-before-any-byte",
        "reset-before-any-byte",
        "closed-mid-head",
        "closed-mid-body",
        "reset-mid-body",
        "closed-between-chunks",
        "closed-mid-chunk",
    ],
)
async def test_a_connection_ending_before_the_reply_is_complete_is_connection_lost(
    make: MakeTransport, sent: bytes, then: Then
) -> None:
    async with upstream(replying(sent, then=then)) as up:
        transport = make()
        error = await failure(transport.send(request(up.url)))
        assert error.reason == "connection_lost"
        assert pool(transport) == idle(0, failures=1)


@pytest.mark.parametrize(
    "sent",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-No-Colon\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX Bad: 1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Long: first\r\n second\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Long: first\r\n\tX-Folded: second\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=[
        "not-http",
        "no-status-code",
        "status-code-not-a-number",
        "header-line-without-colon",
        "space-in-a-header-name",
        "obs-fold-space",
        "obs-fold-tab-with-a-colon",
        "chunk-size-not-hex",
        "two-content-lengths-that-disagree",
        "a-content-length-list-that-disagrees",
        "content-length-and-chunked",
    ],
)
async def test_a_reply_that_is_not_valid_http_is_bad_reply_and_drops_the_connection(
    make: MakeTransport, sent: bytes
) -> None:
    # The upstream keeps the connection open: the client must judge the bytes, not the EOF.
    async with upstream(replying(sent, then="linger")) as up:
        transport = make()
        error = await failure(transport.send(request(up.url)))
        assert error.reason == "bad_reply"
        await until(lambda: up.hangups == 1, "the client dropped the connection")
        assert pool(transport) == idle(0, failures=1)


async def test_a_declared_length_past_the_cap_fails_before_the_body_is_read(
    make: MakeTransport,
) -> None:
    # The body never comes: a client that waited for it would time out instead.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100001\r\n\r\n"
    async with upstream(replying(head, then="linger")) as up:
        transport = make(max_body_bytes=100_000)
        error = await failure(transport.send(request(up.url)))
        assert error.reason == "body_too_large"
        assert "100000" in str(error)
        await until(lambda: up.hangups == 1, "the client dropped the connection")
        assert pool(transport) == idle(0, failures=1)


def endless(framing: str) -> Answer:
    """A 200 whose body runs past any small cap (bounded: 2 MB), then waits for the client."""

    async def answer(conn: Conn, seen: Seen) -> bool:
        piece = b"x" * 16_384
        if framing == "gzip":
            bomb = gzip.compress(b"\0" * 2_000_000)
            await conn.send(reply(bomb, "Content-Encoding: gzip"))
        elif framing == "chunked":
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(128):
                if not await conn.send(chunk(piece)):
                    break
        else:
            await conn.send(b"HTTP/1.1 200 OK\r\n\r\n")
            for _ in range(128):
                if not await conn.send(piece):
                    break
        await conn.client_leaves()
        return False

    return answer


@pytest.mark.parametrize("framing", ["chunked", "until-eof", "gzip"])
async def test_a_body_past_the_cap_even_once_decompressed_is_body_too_large_and_dropped(
    make: MakeTransport, framing: str
) -> None:
    async with upstream(endless(framing)) as up:
        transport = make(max_body_bytes=100_000)
        error = await failure(transport.send(request(up.url)))
        assert error.reason == "body_too_large"
        await until(lambda: up.hangups == 1, "the client dropped the connection")
        assert pool(transport) == idle(0, failures=1)


@pytest.mark.parametrize("coding", ["identity", "gzip"])
async def test_a_body_exactly_at_the_cap_arrives_whole(make: MakeTransport, coding: str) -> None:
    body = b"z" * 100_000
    raw = (
        reply(body)
        if coding == "identity"
        else reply(gzip.compress(body), "Content-Encoding: gzip")
    )
    async with upstream(replying(raw)) as up:
        transport = make(max_body_bytes=100_000)
        assert (await transport.send(request(up.url))).body == body
        assert pool(transport) == idle(1)


async def test_a_closed_transport_sends_nothing_and_has_closed_its_idle_connections(
    make: MakeTransport,
) -> None:
    async with upstream(replying(reply(b"ok"))) as up:
        transport = make()
        assert not transport.closed
        assert (await transport.send(request(up.url))).body == b"ok"
        await transport.aclose()
        assert transport.closed
        await until(lambda: up.hangups == 1, "the idle connection was closed")
        for attempt in (transport.send, transport.open_stream):
            error = await failure(attempt(request(up.url)))
            assert error.reason == "closed"
        assert len(up.requests) == 1
        assert pool(transport)["in_flight"] == 0
        assert pool(transport)["open"] == 0


# --- Cancellation -------------------------------------------------------------------------------


async def test_cancelling_a_caller_mid_reply_closes_its_connection_and_frees_the_slot(
    make: MakeTransport,
) -> None:
    started = asyncio.Event()

    async def answer(conn: Conn, seen: Seen) -> bool:
        if seen.path == "/slow":
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nthe first part")
            started.set()
            await conn.client_leaves()
            return False
        return await conn.reply(reply(b"next"))

    async with upstream(answer) as up:
        transport = make(max_connections=1)
        caller = asyncio.create_task(transport.send(request(up.url, "/slow")))
        await asyncio.wait_for(started.wait(), LIMIT)
        assert pool(transport)["in_use"] == 1
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, LIMIT)
        await until(lambda: up.hangups == 1, "the upstream saw the cancelled caller leave")
        assert pool(transport) == idle(0)
        # The only slot is free again.
        assert (await transport.send(request(up.url, "/next"))).body == b"next"


@pytest.mark.parametrize("seed", range(4))
async def test_cancelling_callers_waiting_for_a_slot_at_random_leaks_no_slot(
    make: MakeTransport, seed: int
) -> None:
    rng = random.Random(seed)
    release = asyncio.Event()
    both_in = asyncio.Event()
    pairs = 0

    async def answer(conn: Conn, seen: Seen) -> bool:
        nonlocal pairs
        if seen.path == "/hold":
            await conn.wait(release, "the release of /hold")
        elif seen.path == "/pair":
            # Answered only while both requests are in: both slots must be free at once.
            pairs += 1
            if pairs == 2:
                both_in.set()
            await conn.wait(both_in, "a second /pair at once")
        return await conn.reply(reply(seen.path.encode()))

    async with upstream(answer) as up:
        transport = make(max_connections=2)
        holders = [asyncio.create_task(transport.send(request(up.url, "/hold"))) for _ in "ab"]
        await until(lambda: len(up.requests) == 2, "both holders reached the upstream")
        paths = [f"/w{i}" for i in range(12)]
        waiters = [asyncio.create_task(transport.send(request(up.url, p))) for p in paths]
        await until(lambda: pool(transport)["in_flight"] == 14, "every caller is waiting")
        doomed = rng.sample(range(12), 6)
        cancelled: set[int] = set()
        for index in doomed[:3]:  # while they wait
            if waiters[index].cancel():
                cancelled.add(index)
        release.set()
        for index in doomed[3:]:  # as slots are handed over, granted or not yet
            if waiters[index].cancel():
                cancelled.add(index)
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*holders, *waiters, return_exceptions=True), LIMIT
        )
        for outcome in outcomes[:2]:
            assert isinstance(outcome, Response) and outcome.body == b"/hold"
        for index, outcome in enumerate(outcomes[2:]):
            if index in cancelled:
                assert isinstance(outcome, asyncio.CancelledError)
            else:
                assert isinstance(outcome, Response) and outcome.body == paths[index].encode()
        stats = pool(transport)
        assert (stats["in_flight"], stats["in_use"], stats["failures"]) == (0, 0, 0)
        assert stats["open"] <= 2
        pair = await asyncio.gather(*(transport.send(request(up.url, "/pair")) for _ in "ab"))
        assert [response.body for response in pair] == [b"/pair", b"/pair"]
        assert up.peak <= 2


@pytest.mark.parametrize("closing", [False, True], ids=["connection-handed-on", "slot-handed-on"])
async def test_a_waiter_cancelled_just_as_it_is_handed_the_connection_gives_it_back(
    make: MakeTransport, closing: bool
) -> None:
    # With Connection: close the holder's socket goes, and the waiter is handed its slot.
    release = asyncio.Event()

    async def answer(conn: Conn, seen: Seen) -> bool:
        if seen.path == "/hold":
            await conn.wait(release, "the release of /hold")
            return await conn.reply(reply(b"first", *(["Connection: close"] if closing else [])))
        return await conn.reply(reply(seen.path.encode()))

    async with upstream(answer) as up:
        transport = make(max_connections=1)
        waiter: asyncio.Task[Response] | None = None

        async def hold_then_cancel_the_waiter() -> Response:
            response = await transport.send(request(up.url, "/hold"))
            # The waiter was handed the connection (or its slot) in this very step, and has
            # not run since: cancelled now, it must give back what it was handed.
            assert waiter is not None
            waiter.cancel()
            return response

        holder = asyncio.create_task(hold_then_cancel_the_waiter())
        await until(lambda: len(up.requests) == 1, "the first request reached the upstream")
        waiter = asyncio.create_task(transport.send(request(up.url, "/waiter")))
        await until(lambda: pool(transport)["in_flight"] == 2, "the waiter is waiting")
        release.set()
        assert (await asyncio.wait_for(holder, LIMIT)).body == b"first"
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiter, LIMIT)
        assert pool(transport) == idle(0 if closing else 1)
        assert (await transport.send(request(up.url, "/next"))).body == b"/next"
        assert [seen.path for seen in up.requests] == ["/hold", "/next"]


# --- Streams ------------------------------------------------------------------------------------


async def test_sse_events_reach_the_caller_as_the_upstream_sends_them(
    make: MakeTransport,
) -> None:
    got_first = asyncio.Event()

    async def answer(conn: Conn, seen: Seen) -> bool:
        await conn.send(SSE_HEAD + chunk(b"event: message_start\ndata: {}\n\n"))
        # The second event goes only once the caller has the first: no buffering to the end.
        await conn.wait(got_first, "the caller's signal that it got the first event")
        await conn.send(chunk(b'data: {"text": "hi"}\n\n') + LAST_CHUNK)
        return True

    async with upstream(answer) as up:
        transport = make()
        events: list[SSEEvent] = []
        async with await transport.open_stream(request(up.url, "/v1/chat", "POST")) as stream:
            assert stream.status == 200
            assert stream.headers["content-type"] == "text/event-stream"
            assert pool(transport) == {"in_flight": 1, "in_use": 1, "open": 1, "failures": 0}
            async for event in stream.events():
                events.append(event)
                got_first.set()
        assert events == [SSEEvent("message_start", "{}"), SSEEvent(None, '{"text": "hi"}')]
        assert stream.closed
        assert pool(transport) == idle(1)


async def test_an_error_reply_to_a_stream_is_read_whole_and_its_connection_kept(
    make: MakeTransport,
) -> None:
    refusal = reply(b'{"error": {"type": "rate_limit_error"}}', status="429 Too Many Requests")
    async with upstream(replying(refusal, reply(b"second"))) as up:
        transport = make()
        stream = await transport.open_stream(request(up.url, "/v1/chat", "POST"))
        assert stream.status == 429
        assert await stream.read() == b'{"error": {"type": "rate_limit_error"}}'
        assert stream.closed
        assert (await transport.send(request(up.url))).body == b"second"
        assert [seen.connection for seen in up.requests] == [1, 1]
        assert pool(transport) == idle(1)


async def test_leaving_a_stream_early_drops_its_connection(make: MakeTransport) -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        await conn.send(SSE_HEAD + chunk(b"data: tick\n\n") + chunk(b"data: tick\n\n"))
        await conn.client_leaves()
        return False

    async with upstream(answer) as up:
        transport = make()
        async with await transport.open_stream(request(up.url)) as stream:
            async for event in stream.events():
                assert event.data == "tick"
                break
        await until(lambda: up.hangups == 1, "the upstream saw the caller leave")
        assert pool(transport) == idle(0)


@pytest.mark.parametrize("then", ["close", "reset"])
async def test_a_stream_cut_mid_body_is_connection_lost_after_the_events_before_the_cut(
    make: MakeTransport, then: Then
) -> None:
    cut = SSE_HEAD + chunk(b"data: partial\n\n") + b"8\r\ndata"
    async with upstream(replying(cut, then=then)) as up:
        transport = make()
        stream = await transport.open_stream(request(up.url))
        received: list[str] = []

        async def read_all() -> None:
            async for event in stream.events():
                received.append(event.data)

        error = await failure(read_all())
        assert error.reason == "connection_lost"
        assert received == ["partial"]
        assert stream.closed
        assert pool(transport) == idle(0, failures=1)


async def test_a_stream_that_goes_silent_past_the_timeout_is_a_timeout(
    make: MakeTransport,
) -> None:
    async with upstream(replying(SSE_HEAD + chunk(b"data: one\n\n"), then="linger")) as up:
        transport = make()
        stream = await transport.open_stream(request(up.url, timeout=0.2))
        received: list[str] = []

        async def read_all() -> None:
            async for event in stream.events():
                received.append(event.data)

        error = await failure(read_all())
        assert error.reason == "timeout"
        assert received == ["one"]
        await until(lambda: up.hangups == 1, "the client dropped the connection")
        assert pool(transport) == idle(0, failures=1)


@pytest.mark.parametrize("reading", ["events", "read"])
async def test_a_streamed_event_or_body_past_the_cap_is_body_too_large_and_dropped(
    make: MakeTransport, reading: str
) -> None:
    async def answer(conn: Conn, seen: Seen) -> bool:
        await conn.send(SSE_HEAD + chunk(b"data: " + b"x" * 2000))  # an event that never ends
        await conn.client_leaves()
        return False

    async with upstream(answer) as up:
        transport = make(max_body_bytes=1000)
        stream = await transport.open_stream(request(up.url))

        async def read_all() -> None:
            if reading == "read":
                await stream.read()
            else:
                async for _ in stream.events():
                    pass

        error = await failure(read_all())
        assert error.reason == "body_too_large"
        assert stream.closed
        await until(lambda: up.hangups == 1, "the client dropped the connection")
        assert pool(transport) == idle(0, failures=1)


# --- The transport itself -----------------------------------------------------------------------


async def test_a_new_transport_shows_its_bound_and_an_empty_pool() -> None:
    transport = HttpTransport(max_connections=7)
    assert transport.max_connections == 7
    assert HttpTransport().max_connections == 100
    stats = transport.statistics()
    assert stats.connection_limit == 7
    assert (stats.requests_sent, stats.failures, stats.in_flight) == (0, 0, 0)
    assert (stats.connections_open, stats.connections_in_use) == (0, 0)
    assert not transport.closed
    await transport.aclose()
    assert transport.closed


def test_a_transport_can_be_built_outside_an_event_loop_and_used_in_one_later() -> None:
    transport = HttpTransport(max_connections=2, max_body_bytes=MAX_BODY_BYTES)

    async def main() -> bytes:
        async with upstream(replying(reply(b"later"))) as up:
            response = await transport.send(request(up.url))
        await transport.aclose()
        return response.body

    assert asyncio.run(main()) == b"later"


def test_a_round_trip_and_a_stream_work_on_uvloop() -> None:
    async def main() -> tuple[bytes, bytes, list[SSEEvent], bool]:
        answer = replying(
            reply(b"first"), reply(b"second"), SSE_HEAD + chunk(b"data: a\n\n") + LAST_CHUNK
        )
        async with upstream(answer) as up:
            transport = HttpTransport(max_connections=2)
            first = await transport.send(request(up.url))
            second = await transport.send(request(up.url))
            async with await transport.open_stream(request(up.url)) as stream:
                events = [event async for event in stream.events()]
            reused = [seen.connection for seen in up.requests] == [1, 1, 1]
            await transport.aclose()
        return first.body, second.body, events, reused

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        first, second, events, reused = runner.run(main())
    assert (first, second, events, reused) == (b"first", b"second", [SSEEvent(None, "a")], True)

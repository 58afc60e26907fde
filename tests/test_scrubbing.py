"""A key in a query string or a password in a base URL shows in no message, log, event or repr."""

import logging

import pytest

from asyncquota import (
    DeadlineExceededError,
    LoggingHook,
    MockTransport,
    QueueFullError,
    Request,
    ThrottledError,
    TransportError,
    UpstreamError,
)
from asyncquota.errors import StoreUnavailableError
from asyncquota.hooks import Admitted, Completed, Queued, Replied, Retried, Shed, Throttled
from asyncquota.outcomes import RequestOutcome

KEY = "AIzaSyD-KEY-0123456789"
PASSWORD = "hunter2-PASSWORD"
PATH = f"/v1beta/models/gemini:generateContent?key={KEY}&alt=sse"
URL = f"https://me:{PASSWORD}@proxy.example{PATH}"


def assert_clean(*texts: str) -> None:
    for text in texts:
        assert KEY not in text
        assert PASSWORD not in text


@pytest.mark.parametrize(
    "error",
    [
        ThrottledError(
            f"POST {PATH} got HTTP 429: the upstream is rate limiting.",
            status=429,
            body=f'{{"error": "Cannot POST {PATH}"}}',
            tenant="acme",
            retry_after=3.0,
        ),
        UpstreamError(f"POST {URL} got HTTP 500.", status=500, body=f"<h1>{URL}</h1>".encode()),
        DeadlineExceededError(f"POST {PATH} passed its deadline of 2 s while it waited."),
        TransportError(f"Could not connect to the upstream for POST {URL}.", reason="timeout"),
        QueueFullError(f"POST {PATH} was shed: the queue is full."),
        StoreUnavailableError(f"The store behind {URL} is unavailable.", path="/tmp/x.db"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_an_error_built_from_a_url_with_a_key_shows_it_nowhere(error):
    body = getattr(error, "body", "")
    assert_clean(str(error), repr(error), error.message, body, *map(str, error.args))
    assert "key=***" in str(error) or "***@" in str(error)


def test_the_scrubbed_message_keeps_what_a_reader_needs():
    error = ThrottledError(f"POST {PATH} got HTTP 429.", status=429)
    assert str(error) == "POST /v1beta/models/gemini:generateContent?key=***&alt=*** got HTTP 429."


async def test_a_transport_failure_names_the_url_scrubbed():
    def refuse(request: Request) -> None:
        raise ConnectionRefusedError(f"refused {request.url} (key {KEY})")

    with pytest.raises(TransportError) as caught:
        await MockTransport(refuse).send(Request("POST", URL))  # type: ignore[arg-type]
    assert_clean(str(caught.value), repr(caught.value))
    assert "https://***@proxy.example/v1beta/models/gemini:generateContent?key=***" in str(
        caught.value
    )


FIELDS = {"at": 1.0, "method": "POST", "path": PATH, "priority": 10, "tenant": "acme", "attempt": 1}
EVENTS = [
    Queued(**FIELDS, depth=3),
    Admitted(**FIELDS, waited=0.5),
    Throttled(**FIELDS, status=429, retry_after=2.0),
    Retried(**FIELDS, reason="rate_limited", delay=1.0),
    Shed(**FIELDS, reason="queue_full", retry_after=1.0),
    Replied(
        **FIELDS, status=429, seconds=0.2, stream=False, reserved_tokens=100, used_tokens=None
    ),
    Completed(**FIELDS, outcome=RequestOutcome.OK, reason="ok", status=200, latency=0.7),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda event: type(event).__name__)
def test_an_event_and_its_log_line_show_the_path_scrubbed(event, caplog):
    assert event.path == "/v1beta/models/gemini:generateContent?key=***&alt=***"
    assert_clean(repr(event))
    with caplog.at_level(logging.DEBUG, logger="asyncquota"):
        LoggingHook().on_event(event)
    assert caplog.records
    assert_clean(caplog.text)
    assert "key=***" in caplog.text


def test_an_event_without_a_query_keeps_its_path_object():
    path = "/v1/chat/completions"
    event = Admitted(**{**FIELDS, "path": path}, waited=0.0)
    assert event.path is path

"""URLs scrubbed before they are shown, paths and headers checked before they are sent."""

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncquota.urls import (
    check_header,
    check_headers,
    check_method,
    join_path,
    redact_text,
    redact_url,
)

SECRET = "AIzaSECRET42"
# Upper case, so that no parameter name (lower case) or URL part can contain one.
SECRETS = st.text(alphabet=string.ascii_uppercase + string.digits + "-_.~%", min_size=8).map(
    lambda text: "K" + text
)
NAMES = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=8)

# ---------------------------------------------------------------------------------------------
# redact_url / redact_text
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("/x?key=AIza", "/x?key=***"),
        ("https://u:pw@host/v1/x?key=AIza&alt=sse", "https://***@host/v1/x?key=***&alt=***"),
        ("https://host/v1/x?token", "https://host/v1/x?***"),
        ("https://host/cb#access_token=abc&state=1", "https://host/cb#access_token=***&state=***"),
        ("https://a@b@host/x", "https://***@host/x"),
        ("https://host/v1/chat/completions", "https://host/v1/chat/completions"),
        ("/plain/path", "/plain/path"),
        ("", ""),
        ("?", "?"),
    ],
)
def test_query_values_fragments_and_userinfo_are_scrubbed_and_the_rest_kept(url, shown):
    assert redact_url(url) == shown


@given(
    prefix=st.sampled_from(["https://api.example", "http://h:8080/v1", ""]),
    path=st.sampled_from(["/x", "/v1/models:generate", "/"]),
    names=st.lists(NAMES, min_size=1, max_size=3),
    secret=SECRETS,
    user=st.booleans(),
)
def test_a_secret_in_a_query_value_or_a_password_never_survives(prefix, path, names, secret, user):
    if user and prefix:
        prefix = prefix.replace("://", f"://me:{secret}@")
    query = "&".join(f"{name}={secret}" for name in names)
    url = f"{prefix}{path}?{query}"
    assert secret not in redact_url(url)
    message = f"POST {url} got HTTP 429: slow down ({url})."
    assert secret not in redact_text(message)


@given(text=st.text())
def test_scrubbing_any_text_never_raises(text):
    assert isinstance(redact_url(text), str)
    assert isinstance(redact_text(text, text), str)


def test_text_without_urls_is_left_alone_and_a_known_secret_is_cut_in_any_spelling():
    assert redact_text("Are you sure? Rate limit reached.") == "Are you sure? Rate limit reached."
    url = f"https://host/x?key={SECRET}"
    # A library may quote the value alone, outside any URL.
    assert redact_text(f"bad key '{SECRET}'", url) == "bad key '***'"


# ---------------------------------------------------------------------------------------------
# join_path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "path", "url"),
    [
        ("https://h", "/v1/chat/completions", "https://h/v1/chat/completions"),
        ("https://h/v1", "/chat/completions?x=1", "https://h/v1/chat/completions?x=1"),
        ("https://h/v1/", "/models", "https://h/v1/models"),
        ("https://h/v1", "/a/./b/../c", "https://h/v1/a/c"),
        ("https://h/v1", "/a/b/..", "https://h/v1/a/"),
        ("https://h/v1", "/a/%2e%2E/b", "https://h/v1/b"),
        ("https://h/v1", "/models/gemini-1.5:generate", "https://h/v1/models/gemini-1.5:generate"),
        ("https://h/v1", "/x?next=/../../admin", "https://h/v1/x?next=/../../admin"),
    ],
)
def test_a_path_is_joined_under_the_base_path_with_its_dots_resolved(base, path, url):
    assert join_path(base, path) == url


@pytest.mark.parametrize(
    "path",
    [
        "/../admin",
        "/a/../../admin",
        "/%2e%2e/admin",
        "/%2E./admin",
        "/.%2e/admin",
        "/a/..%2f..%2fadmin",
        "/a%2f..%2f..%2fadmin",
        "/a\\..\\..\\admin",
        "//evil.example/x",
        "http://evil.example/x",
        "evil.example/x",
        "",
        "/x\r\nHost: evil.example",
        "/x\x00",
        "/x?q=\n",
    ],
)
def test_a_path_that_leaves_the_base_or_forges_the_request_is_refused(path):
    with pytest.raises(ValueError, match="path") as caught:
        join_path("https://me:hunter22@h/v1", path)
    assert "hunter22" not in str(caught.value)


def test_the_refusal_never_repeats_a_key_from_the_query():
    with pytest.raises(ValueError) as caught:
        join_path("https://h/v1", f"/../admin?key={SECRET}")
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("base", ["not a url", "/v1", "https://h/v1?key=x", "https://h/\n"])
def test_a_base_url_that_is_not_absolute_or_carries_a_query_is_refused(base):
    with pytest.raises(ValueError, match="base URL"):
        join_path(base, "/x")


SEGMENTS = st.lists(
    st.sampled_from(["a", "b", ".", "..", "%2e%2e", "%2E", ".%2e", "", "v1.2", "%2f", "x%2f.."]),
    max_size=8,
)


@given(base_path=st.sampled_from(["", "/v1", "/api/v1/"]), segments=SEGMENTS, query=st.text())
def test_any_path_either_stays_under_the_base_path_or_is_refused(base_path, segments, query):
    base = f"https://h{base_path}"
    path = "/" + "/".join(segments) + ("?" + query if query else "")
    try:
        url = join_path(base, path)
    except ValueError:
        return
    under = f"https://h{base_path.rstrip('/')}/"
    assert url.startswith(under)
    where = url[len("https://h") :].partition("?")[0]
    # No dot segment is left for a server to resolve.
    assert not any(seg.lower() in (".", "..", "%2e%2e", "%2e", ".%2e") for seg in where.split("/"))


# ---------------------------------------------------------------------------------------------
# methods and headers
# ---------------------------------------------------------------------------------------------


def test_methods_and_headers_that_would_split_the_request_are_refused_without_the_value():
    assert check_method("POST") == "POST"
    for method in ("POST\r\n", "GET /admin", "", "PO\x00ST"):
        with pytest.raises(ValueError, match="method"):
            check_method(method)
    check_headers({"Authorization": "Bearer sk-1", "X-Tab": "a\tb"})
    with pytest.raises(ValueError) as caught:
        check_header("Authorization", f"Bearer {SECRET}\r\nX-Evil: 1")
    assert SECRET not in str(caught.value)
    assert "Authorization" in str(caught.value)
    for name in ("X-A\r\n", "", "X A", "X:A"):
        with pytest.raises(ValueError, match="header name"):
            check_header(name, "v")
    with pytest.raises(ValueError, match="string"):
        check_header("X-N", 5)  # type: ignore[arg-type]


@given(value=st.text())
def test_a_header_value_is_refused_exactly_when_it_holds_a_control_character(value):
    forbidden = any((ord(c) < 32 and c != "\t") or c == "\x7f" for c in value)
    try:
        check_header("X-Value", value)
    except ValueError:
        assert forbidden
    else:
        assert not forbidden


def test_prose_keeps_its_question_marks_and_a_long_nameless_token_is_still_cut():
    body = '{"message": "Did you mean gpt-4o?", "see": "/docs?page=2"}'
    shown = redact_text(body)
    assert '"Did you mean gpt-4o?"' in shown and "/docs?page=***" in shown
    assert redact_text("GET /x?sk-abcdefghijklmnop failed") == "GET /x?*** failed"
    assert redact_url("/x?tok") == "/x?***"  # a URL on its own: every value goes

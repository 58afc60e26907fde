import pytest

from asyncquota import (
    ClosedError,
    DeadlineUnreachableError,
    Priority,
    QueueFullError,
    QuotaError,
    QuotaExhaustedError,
    RejectedError,
    ThrottledError,
    UpstreamError,
    coerce_priority,
)
from asyncquota.errors import BODY_EXCERPT_CHARS


def test_every_error_is_a_quota_error_and_rejections_say_nothing_was_sent():
    for cls in (QueueFullError, DeadlineUnreachableError, ClosedError):
        assert issubclass(cls, RejectedError)
        assert issubclass(cls, QuotaError)
    for cls in (ThrottledError, QuotaExhaustedError):
        assert issubclass(cls, UpstreamError)
        assert not issubclass(cls, RejectedError)


def test_a_throttled_error_carries_what_a_chatbot_needs_to_answer_busy():
    err = ThrottledError(
        "The upstream is rate limiting; try again in 4 s.",
        status=429,
        body=b'{"error": {"type": "requests"}}',
        priority=Priority.INTERACTIVE,
        tenant="shop-42",
        retry_after=4.0,
    )
    assert err.reason == "rate_limited"
    assert err.retry_after == 4.0
    assert err.priority is Priority.INTERACTIVE
    assert err.tenant == "shop-42"
    assert err.status == 429
    assert '"requests"' in err.body
    assert "retry_after=4.000" in repr(err)
    assert str(err) == "The upstream is rate limiting; try again in 4 s."


def test_an_unnamed_rank_stays_an_integer_and_a_named_one_becomes_the_enum():
    assert QueueFullError("shed", priority=20).priority is Priority.BATCH
    assert QueueFullError("shed", priority=15).priority == 15


def test_an_error_body_is_cut_to_an_excerpt_and_garbage_bytes_do_not_raise():
    err = UpstreamError("bad", status=500, body=b"\xff\xfe" + b"x" * 10_000)
    assert len(err.body) == BODY_EXCERPT_CHARS + 1
    assert err.body.endswith("…")


def test_priority_names_integers_and_refusals():
    assert coerce_priority("interactive") == Priority.INTERACTIVE
    assert coerce_priority(" Batch ") == Priority.BATCH
    assert coerce_priority(Priority.CRITICAL) == 0
    assert coerce_priority(-5) == -5
    with pytest.raises(ValueError, match="Unknown priority class 'urgent'"):
        coerce_priority("urgent")
    with pytest.raises(TypeError):
        coerce_priority(True)
    with pytest.raises(TypeError):
        coerce_priority(1.5)  # type: ignore[arg-type]

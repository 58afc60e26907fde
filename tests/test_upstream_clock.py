"""The upstream's clock, learnt from its truncated ``Date`` headers (``UpstreamClock``)."""

import math

from hypothesis import given
from hypothesis import strategies as st

from asyncquota.testing.replies import date_header
from asyncquota.upstream_clock import UpstreamClock

EPOCH = 1_800_000_000.0


class Exchanges:
    """Our wall clock, and an upstream whose clock runs ``offset`` seconds ahead of it."""

    def __init__(self, offset: float) -> None:
        self.offset = offset
        self.wall = EPOCH
        self.clock = UpstreamClock(lambda: self.wall)

    def exchange(self, at: float, took: float = 0.0, stamped: float = 0.0) -> float:
        """A request sent at ``EPOCH + at``, answered ``took`` later, its Date taken
        ``stamped`` (a share of ``took``) into it; the clock's reading at the reply."""
        self.wall = EPOCH + at + stamped * took
        date = date_header(self.wall + self.offset)
        self.wall = EPOCH + at + took
        return self.clock.read(date, took)

    def truth(self) -> float:
        return self.wall + self.offset


def test_without_a_readable_date_our_own_clock_is_read_exactly():
    clock = UpstreamClock(lambda: EPOCH + 0.25)
    assert clock.read(None, 0.0) == EPOCH + 0.25
    assert clock.uncertainty == 0.0
    assert clock.read("yesterday at noon", 0.0) == EPOCH + 0.25
    assert clock.uncertainty == 0.0


def test_one_reply_reads_as_its_date_and_may_be_a_second_early():
    upstream = Exchanges(offset=3.7)
    reading = upstream.exchange(at=0.2)
    # The Date is the upstream's 3.9 s truncated: 3 s, at most a second early.
    assert reading == EPOCH + 3.0
    assert upstream.clock.uncertainty == 1.0


def test_replies_at_every_phase_of_the_second_close_in_on_the_upstreams_time():
    upstream = Exchanges(offset=3.7)
    for k in range(60):  # a reply every 37 ms, 2 ms each
        reading = upstream.exchange(at=0.037 * k, took=0.002, stamped=0.5)
        assert reading <= upstream.truth()  # never late: a date read against it is never early
    # Bounded by the replies stamped just after and just before a second of its turned.
    assert upstream.clock.uncertainty <= 0.037 + 0.002
    assert upstream.truth() - reading <= upstream.clock.uncertainty


def test_a_clock_that_steps_is_followed_from_the_next_reply():
    upstream = Exchanges(offset=0.4)
    for k in range(30):
        upstream.exchange(at=0.05 * k)
    assert upstream.clock.uncertainty <= 0.05
    upstream.offset = -5.2  # the upstream's clock (or ours) stepped back
    reading = upstream.exchange(at=1.52)
    assert upstream.truth() - 1.0 <= reading <= upstream.truth()
    for k in range(30):
        reading = upstream.exchange(at=1.55 + 0.05 * k)
    assert upstream.clock.uncertainty <= 0.05
    assert upstream.truth() - 0.05 <= reading <= upstream.truth()


def test_a_long_reply_bounds_only_as_much_as_it_knows():
    upstream = Exchanges(offset=0.0)
    for k in range(20):
        upstream.exchange(at=0.05 * k, took=0.001)
    # A streamed answer of 20 s whose Date was taken as it began: read at its end, the
    # upstream's time is 20 s past that Date. It narrows nothing, and the fast replies'
    # bounds still read the time.
    reading = upstream.exchange(at=1.0, took=20.0, stamped=0.0)
    assert upstream.truth() - 0.052 <= reading <= upstream.truth()
    assert upstream.clock.uncertainty <= 0.052  # a reply every 50 ms, 1 ms each


@given(
    offset=st.floats(-100.0, 100.0, allow_nan=False),
    exchanges=st.lists(
        st.tuples(
            st.floats(0.0, 3.0),  # the gap since the last exchange
            st.floats(0.0, 0.05),  # how long this one took
            st.floats(0.0, 1.0),  # when within it the Date was taken
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_the_reading_is_never_later_than_the_upstreams_time_nor_earlier_than_it_says(
    offset: float, exchanges: list[tuple[float, float, float]]
):
    upstream = Exchanges(offset=offset)
    at = 0.0
    for gap, took, stamped in exchanges:
        at += gap
        reading = upstream.exchange(at=at, took=took, stamped=stamped)
        truth = upstream.truth()
        assert reading <= truth + 1e-6
        assert truth - reading <= upstream.clock.uncertainty + took + 1e-6
        assert 0.0 <= upstream.clock.uncertainty <= 1.0
        assert math.isfinite(reading)
        at += took

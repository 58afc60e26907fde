"""Gates in virtual time: every timestamp below is exact loop time (looptime starts at 0)."""

import asyncio
import itertools
import math
import random

import pytest

from asyncquota.errors import QuotaError
from asyncquota.gates import _MEASURE_ROOM as ROOM  # how far past a measured refill
from asyncquota.gates import _MEASURE_ROOM_HELD as ROOM_HELD  # the same, a reserve held
from asyncquota.gates import (
    CooldownGate,
    GateStatistics,
    MirrorStatistics,
    RateGate,
    TokenBucket,
    TokenGate,
    WouldBlock,
)


def now() -> float:
    return asyncio.get_running_loop().time()


async def admission_times(gate: RateGate, count: int) -> list[float]:
    times = []
    for _ in range(count):
        await gate.acquire()
        times.append(now())
    return times


# TokenBucket: pure arithmetic ------------------------------------------------------------


def test_a_bucket_starts_full_and_refills_at_its_rate():
    bucket = TokenBucket(rate=2.0, burst=4.0, now=10.0)
    assert bucket.time_until(4, 10.0) == 0.0
    bucket.take(4, 10.0)
    assert bucket.level(10.0) == 0.0
    assert bucket.time_until(1, 10.0) == 0.5
    assert bucket.level(11.0) == 2.0
    assert bucket.level(100.0) == 4.0


def test_a_request_larger_than_the_burst_waits_for_a_full_bucket_then_goes_into_debt():
    bucket = TokenBucket(rate=1.0, burst=4.0, now=0.0)
    bucket.take(1, 0.0)
    assert bucket.time_until(10, 0.0) == 1.0  # until full, not forever
    bucket.take(10, 1.0)
    assert bucket.level(1.0) == -6.0
    assert bucket.time_until(1, 1.0) == 7.0


def test_a_refund_never_fills_above_the_burst():
    bucket = TokenBucket(rate=1.0, burst=4.0, now=0.0)
    bucket.take(3, 0.0)
    bucket.refund(2, 0.0)
    assert bucket.level(0.0) == 3.0
    bucket.refund(5, 0.0)
    assert bucket.level(0.0) == 4.0


def test_time_running_backwards_stands_still():
    bucket = TokenBucket(rate=1.0, burst=4.0, now=5.0)
    bucket.take(4, 5.0)
    assert bucket.level(3.0) == 0.0
    assert bucket.level(6.0) == 1.0


def test_a_bucket_stamped_at_minus_infinity_is_full_when_first_read():
    bucket = TokenBucket(rate=1.0, burst=4.0, now=-math.inf)
    assert bucket.level(123.0) == 4.0
    bucket.take(4, 123.0)
    assert bucket.level(124.0) == 1.0


def sends(bucket: TokenBucket, count: int, start: float = 0.0) -> list[float]:
    """When ``count`` one-unit sends go, each as early as the bucket allows."""
    t, times = start, []
    for _ in range(count):
        t += bucket.time_until(1, t)
        bucket.take(1, t)
        times.append(t)
    return times


def spacing(times: list[float]) -> list[float]:
    """The time between each send and the next."""
    return [later - earlier for earlier, later in itertools.pairwise(times)]


UNBOUNDED = dict(rate=1e9, burst=1e9)  # our own quota out of the way: the mirror alone rules


def test_two_left_of_61_with_a_reset_in_58_s_go_within_half_a_second_then_one_a_second():
    # 61 - 2 = 59 units refill in 58 s: remaining is floored, so one of them may be a
    # fraction; the rate that cannot be too high is (59 - 1) / 58, one a second.
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=2, reset_after=58.0, limit=61, now=0.0)
    assert bucket.mirror(0.0) == MirrorStatistics(level=2.0, rate=1.0, burst=61.0, lapses_at=None)
    # the last one left is the bucket's bottom: it goes at twice the refill (_BOTTOM_SPREAD)
    assert sends(bucket, 5) == [0.0, 0.5, 1.0, 2.0, 3.0]


def test_nothing_left_of_11_with_a_reset_in_1_s_then_ten_a_second():
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=0, reset_after=1.0, limit=11, now=0.0)
    assert bucket.time_until(1, 0.0) == pytest.approx(0.1)
    assert sends(bucket, 4) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # left alone, the mirror fills to the upstream's limit and no further
    assert bucket.mirror(30.0).level == 11.0
    # ten at once; the eleventh, the bottom, 1 / (2 * 10) s behind them; then the refill
    assert sends(bucket, 12, start=30.0)[-3:] == pytest.approx([30.0, 30.05, 30.1])


def test_a_reading_holds_sends_back_a_minute_at_most():
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    # "nothing left, full again in 1 000 h": a rate of one every 3.6 days
    bucket.sync(remaining=0, reset_after=3_600_000.0, limit=1000, now=0.0)
    assert bucket.time_until(1, 0.0) == pytest.approx(60.0)
    # evidence goes stale: a send goes, and its reply will say what is true by then
    assert bucket.time_until(1, 60.0) == 0.0


def test_the_largest_recent_reading_of_the_rate_wins_until_the_limit_changes():
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=0, reset_after=2.0, limit=21, now=0.0)  # (21 - 1) / 2 = 10/s
    # a reset rounded up to the second: this reading says 5/s, the other bound holds
    bucket.sync(remaining=10, reset_after=2.0, limit=21, now=0.5)
    assert bucket.mirror(0.5).rate == 10.0
    bucket.sync(remaining=0, reset_after=1.0, limit=11, now=1.0)  # a new limit: 10/s
    bucket.sync(remaining=0, reset_after=2.0, limit=21, now=1.0)  # and back: a fresh start
    assert bucket.mirror(1.0).rate == 10.0
    bucket.sync(remaining=0, reset_after=4.0, limit=21, now=2.0)  # a lower bound: kept out
    assert bucket.mirror(2.0).rate == 10.0
    # ten full refills later (20 s) a half-empty bucket's reading may replace it
    bucket.sync(remaining=0, reset_after=4.0, limit=21, now=30.0)
    assert bucket.mirror(30.0).rate == 5.0


def test_a_stale_rate_is_replaced_by_the_best_reading_of_its_memory_not_the_first():
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=0, reset_after=2.0, limit=21, now=0.0)  # 10/s
    # the upstream slowed down: readings of 5/s and 6.67/s, seconds-rounded, then 4/s
    bucket.sync(remaining=0, reset_after=4.0, limit=21, now=5.0)
    bucket.sync(remaining=0, reset_after=3.0, limit=21, now=10.0)
    bucket.sync(remaining=15, reset_after=0.6, limit=21, now=18.0)  # nearly full: rounding
    assert bucket.mirror(18.0).rate == 10.0  # still within its memory (10 refills: 21 s)
    bucket.sync(remaining=0, reset_after=5.0, limit=21, now=21.0)
    assert bucket.mirror(21.0).rate == pytest.approx(20 / 3)


def test_a_sync_lowers_the_mirror_but_never_raises_it():
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=5, reset_after=4.0, limit=10, now=0.0)  # 1 per second
    bucket.sync(remaining=3, reset_after=6.0, limit=10, now=0.0)
    assert bucket.mirror(0.0).level == 3.0
    bucket.sync(remaining=9, reset_after=1.0, limit=10, now=0.0)
    assert bucket.mirror(0.0).level == 3.0  # higher news is old news
    assert bucket.mirror(0.0).rate == 1.0  # the rate is learnt all the same


def test_sends_the_upstream_has_not_seen_stay_debited():
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=3, reset_after=6.0, limit=10, now=0.0)  # 1 per second
    for _ in range(3):
        bucket.take(1, 0.0)  # granted, not yet arrived
    # a reply that left the upstream before they arrived still says 3
    bucket.sync(remaining=3, reset_after=6.0, limit=10, now=0.0)
    assert bucket.time_until(1, 0.0) == 1.0
    assert bucket.mirror(0.0).level == 0.0


def test_the_bottom_of_a_mirror_goes_one_by_one_at_twice_its_refill():
    # 100 left of 200, refilling 200 a second: all but the bottom (a tenth of a second's
    # refill: 20) at once; the bottom one by one at twice the refill while the level
    # falls (by the refill's worth a second); then at the refill.
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=100, reset_after=0.495, limit=200, now=0.0)
    assert bucket.mirror(0.0).rate == pytest.approx(200.0)
    times = sends(bucket, 130)
    gaps = spacing(times)
    assert times[:79] == [0.0] * 79
    assert gaps[79:118] == pytest.approx([1 / 400] * 39)
    assert gaps[120:] == pytest.approx([1 / 200] * 9)


def test_what_a_reading_finds_at_the_bottom_goes_one_by_one():
    # The real-time matrix's row 9 on a busy machine: the mirror at its bottom, fast
    # readings re-anchored it a few units up and let 27 sends out within 50 ms, two of
    # them refused a millisecond apart: a second of penalty each. One by one, a send the
    # mirror let out early is refused alone, and its refusal is back before the next.
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=0, reset_after=0.995, limit=200, now=0.0)  # 200 a second
    mark = bucket.taken
    bucket.sync(
        remaining=5, reset_after=0.975, limit=200, now=0.001, sent_mark=mark, sent_age=0.001
    )
    assert bucket.mirror(0.001).level == pytest.approx(5.0)
    times = sends(bucket, 8, start=0.001)
    assert times == pytest.approx([0.001 + k / 400 for k in range(8)])


def test_a_grant_taken_before_the_first_headers_is_not_forgotten():
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.take(20, 0.0)  # 20 sent blind...
    bucket.take(1, 0.0)  # ...and one more granted, not yet sent
    # the first reply: the upstream saw 20 of its 20 and refilled 1 since
    bucket.sync(remaining=1, reset_after=1.8, limit=20, now=0.1)  # 10 per second
    assert bucket.mirror(0.1).level == pytest.approx(0.0)
    assert bucket.time_until(1, 0.1) == pytest.approx(0.1)


def test_a_refund_after_a_sync_is_counted_before_the_sync_lowers_the_mirror():
    # The reply's headers describe the upstream after it settled that request; the
    # caller settles its own reservation right after the sync.
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=100, reset_after=9.0, limit=1000, now=0.0)  # 100 per second
    bucket.take(100, 0.0)  # reserve 100; the upstream gives 60 back when it replies
    bucket.sync(remaining=60, reset_after=9.4, limit=1000, now=0.0)
    bucket.refund(60, 0.0)
    assert bucket.mirror(0.0).level == 60.0  # not 60 + 60


def test_a_later_refund_is_not_undone_by_an_older_reading():
    # Two reservations of 100 go out; each request uses 60. The first reply is read (its
    # headers count its own refund), the second is not: its refund comes after the reading.
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=500, reset_after=5.0, limit=1000, now=0.0)
    bucket.take(100, 0.0)
    bucket.take(100, 0.0)
    bucket.sync(remaining=340, reset_after=6.6, limit=1000, now=0.0)  # 500 - 100 - 60
    bucket.refund(40, 0.0)  # the first request's own: already in the 340
    bucket.refund(40, 0.0)  # the second's: the upstream has 380 now
    assert bucket.mirror(0.0).level == 380.0


def test_a_refund_refunds_the_mirror_up_to_its_burst():
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=8, reset_after=2.0, limit=10, now=0.0)
    bucket.take(5, 0.0)
    bucket.refund(4, 0.0)
    assert bucket.mirror(0.0).level == 7.0
    bucket.refund(50, 0.0)
    assert bucket.mirror(0.0).level == 10.0


def test_without_a_limit_what_is_left_lasts_until_the_reset_then_the_mirror_lapses():
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=2, reset_after=3.0, limit=None, now=0.0)
    assert bucket.mirror(0.0) == MirrorStatistics(level=2.0, rate=0.0, burst=2.0, lapses_at=3.0)
    assert sends(bucket, 4) == [0.0, 0.0, 3.0, 3.0]
    assert bucket.mirror(3.0) is None


def test_without_a_limit_nothing_left_closes_until_the_reset():
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=0, reset_after=3.0, limit=None, now=0.0)
    assert bucket.time_until(1, 0.0) == 3.0
    assert bucket.time_until(1, 3.0) == 0.0


def test_headers_without_a_reset_or_a_rate_start_no_mirror():
    bucket = TokenBucket(rate=1.0, burst=10.0, now=0.0)
    bucket.sync(remaining=0, reset_after=None, limit=None, now=0.0)
    bucket.sync(remaining=0, reset_after=0.0, limit=50, now=0.0)
    assert bucket.mirror(0.0) is None
    assert bucket.time_until(1, 0.0) == 0.0


def test_a_full_upstream_keeps_the_rate_last_learnt():
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=0, reset_after=18.0, limit=10, now=0.0)  # 0.5 per second
    bucket.sync(remaining=10, reset_after=0.0, limit=10, now=30.0)
    assert bucket.mirror(30.0) == MirrorStatistics(
        level=10.0, rate=0.5, burst=10.0, lapses_at=None
    )


def test_a_send_must_fit_our_own_bucket_as_well_as_the_mirror():
    bucket = TokenBucket(rate=1.0, burst=1.0, now=0.0)
    bucket.sync(remaining=50, reset_after=5.0, limit=100, now=0.0)
    assert sends(bucket, 3) == [0.0, 1.0, 2.0]


def test_a_reserve_keeps_seconds_of_the_refill_unspent_then_sends_go_at_the_rate():
    # 100 a second, a bucket of 100, 50 left: a tenth of a second of refill (10) is kept.
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=50, reset_after=0.5, limit=100, now=0.0)
    assert bucket.mirror(0.0).rate == pytest.approx(98.0)  # (100 - 50 - 1) / 0.5
    bucket.hold_back(10 / 98)
    times = sends(bucket, 65)
    gaps = spacing(times)
    # 50 - 10 - 9.8 (the bottom: a tenth of a second's refill above the reserve) at once
    assert times[:30] == [0.0] * 30
    # then one by one at twice the refill, the level falling a refill's worth a second,
    # until only the reserve is left; then one a refill: the rate is untouched
    assert gaps[29:48] == pytest.approx([1 / 196] * 19)
    assert gaps[49:] == pytest.approx([1 / 98] * 15)
    assert bucket.mirror(times[-1]).level == pytest.approx(10.0)


def test_a_reserve_never_exceeds_half_the_bucket():
    # Anthropic's per-minute ``limit`` over a bucket of a second's worth: the mirror's
    # burst says 6 000 while ``remaining`` never shows more than 100. A reserve read as a
    # share of that burst would keep every send back; as seconds of refill it does not.
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=5_000, reset_after=10.0, limit=6_000, now=0.0)  # ~100 a second
    bucket.sync(remaining=100, reset_after=59.0, limit=6_000, now=0.0)
    bucket.hold_back(0.1)
    assert bucket.time_until(1, 0.0) == 0.0
    # a tiny bucket (4) refilling fast: half of it at most, 2 of 4
    small = TokenBucket(now=0.0, **UNBOUNDED)
    small.sync(remaining=0, reset_after=0.04, limit=4, now=0.0)  # 75 a second
    small.hold_back(1.0)
    assert small.time_until(1, 0.0) == pytest.approx(3 / 75)  # 1 + 2 held back
    with pytest.raises(ValueError):
        small.hold_back(-0.1)


def test_a_reserve_is_at_most_half_of_what_the_upstream_showed_it_holds():
    # A per-minute ``limit`` (12 000) over a bucket of 200 a second, and only slow
    # replies (long streamed answers; a reserve keeps refusals, the fast ones, away): no
    # measurement bounds the rate read off the limit, 11 899 a second. A tenth of a
    # second of that, 1 190 units, against readings of 200 at most let sends out only
    # in the gaps between readings (the real-time matrix's row 14: 13-70 a second of
    # 200). Half the most the upstream said it had left under this limit is the bound.
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.hold_back(0.1)
    bucket.sync(remaining=100, reset_after=1.0, limit=12_000, now=0.0)
    bucket.sync(remaining=199, reset_after=1.0, limit=12_000, now=1.0)
    assert bucket.mirror(1.0).rate == pytest.approx(11_899.0)
    slow = {"limit": 12_000, "reset_after": 1.0, "now": 20.0, "sent_age": 10.0}
    bucket.sync(remaining=150, sent_mark=bucket.taken, **slow)
    assert bucket.time_until(1, 20.0) == 0.0
    # 100 left, 99.5 of them held back: one more is half a unit short. (The takes here
    # end with a tenth of a unit: the bottom's spread behind a take, _BOTTOM_SPREAD, is
    # then a twentieth of a unit's refill, shorter than what is asserted.)
    bucket.take(49.9, 20.0)
    bucket.take(0.1, 20.0)
    assert bucket.time_until(1, 20.0) == pytest.approx(0.5 / bucket.mirror(20.0).rate)
    # a new limit (the quota doubled) forgets the old bucket's top: the next reading is it
    bucket.sync(remaining=40, sent_mark=bucket.taken, **{**slow, "limit": 24_000})
    rate = bucket.mirror(20.0).rate
    assert bucket.time_until(1, 20.0) == pytest.approx(0.05 / rate)  # the spread alone
    bucket.take(19.9, 20.0)  # 20 left, 20 held back
    bucket.take(0.1, 20.0)
    assert bucket.time_until(1, 20.0) == pytest.approx(1 / rate)


def per_minute_bucket(*, reserve: float) -> TokenBucket:
    """Anthropic's ``limit`` per minute (6 000) over a bucket of 100 a second; two fast
    replies 1 s apart have measured the refill (the rate is bounded by twice it)."""
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.hold_back(reserve)
    bucket.sync(remaining=0, reset_after=1.0, limit=6_000, now=0.0, sent_mark=bucket.taken)
    bucket.take(100, 0.5)
    bucket.sync(remaining=0, reset_after=1.0, limit=6_000, now=1.0, sent_mark=bucket.taken)
    assert bucket.mirror(1.0).rate == pytest.approx((ROOM_HELD if reserve else ROOM) * 100.0)
    return bucket


def test_a_mirror_bounds_the_sends_while_a_reading_not_the_measured_refill_sets_its_rate():
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    assert not bucket.mirror_bounds()  # no mirror yet
    bucket.sync(remaining=40, reset_after=0.6, limit=100, now=0.0)
    assert bucket.mirror_bounds()  # 59 / 0.6 a second: a reading's lower bound of the refill
    # 6 000 a minute over a second's bucket: the readings say ~6 000 a second, and a
    # little over the refill measured between two of them is all that holds the mirror.
    assert not per_minute_bucket(reserve=0.0).mirror_bounds()


def test_a_held_reserve_gives_a_measured_refill_twice_the_room():
    # Kept from running its bucket dry (an upstream that punishes), a mirror costs no
    # refusal for sending past the refill measured, and refusals, which measure, are rare.
    bucket = per_minute_bucket(reserve=0.0)
    assert bucket.mirror(1.0).rate == pytest.approx(ROOM * 100.0)
    bucket.hold_back(0.1)
    bucket.sync(remaining=0, reset_after=1.0, limit=6_000, now=1.2)  # the next reading
    assert bucket.mirror(1.2).rate == pytest.approx(ROOM_HELD * 100.0)
    bucket.hold_back(0.0)
    bucket.sync(remaining=0, reset_after=1.0, limit=6_000, now=1.3)
    assert bucket.mirror(1.3).rate <= ROOM * 100.0 + 1e-6
    per_minute_bucket(reserve=0.1)  # measured while held: ROOM_HELD times (it asserts)


def sent_a_while(remaining: float, *, drained: bool = True, limit: int = 6_000) -> TokenBucket:
    """A per-minute bucket (top 100) sent at the mirror's rate for a reply's 10 s, then
    that slow reply's reading: ``remaining`` under ``limit`` at 11 s."""
    bucket = per_minute_bucket(reserve=0.0)
    bucket.sync(  # its top: 100, and the mirror's level
        remaining=100, reset_after=0.1, limit=6_000, now=1.0, sent_mark=bucket.taken
    )
    if drained:
        bucket.take(100, 1.0)  # the mirror had nothing left when the request went
    mark, level = bucket.taken, bucket.mirror(1.0).level + 1
    for second in range(2, 12):  # sent at the mirror's rate for the reply's 10 s
        bucket.take(ROOM * 100.0, float(second))
    bucket.sync(
        remaining=remaining,
        reset_after=0.1,
        limit=limit,
        now=11.0,
        sent_mark=mark,
        sent_age=10.0,
        sent_level=level,
    )
    return bucket


def test_a_slow_reply_at_the_top_the_upstream_has_shown_raises_a_measured_rate():
    # A per-minute ``limit`` (6 000) over a bucket of 100: two fast readings bounded the
    # rate at a little over the refill they measured, 100 a second. Measured in a cooldown's
    # wake it can be low for good: the real-time row 14 held the pace at 89 a second of
    # 200 all night while every reading showed its bucket full. The mirror's burst (the
    # limit) is never full; the most ``remaining`` the upstream has shown is.
    # Still at its top after all that: it refilled faster, the measured bound is refuted.
    assert sent_a_while(99).mirror(11.0).rate == pytest.approx(ROOM * 100.0 * 1.25)
    # Under its top, a level held steady proves only the rate we sent at.
    assert sent_a_while(60).mirror(11.0).rate == pytest.approx(ROOM * 100.0)
    # A mirror full at the send agreed with a reading taken then (a streamed reply's
    # headers leave at its start): no evidence. The real-time row 9 raised 95 a second
    # to 119 of 100 so, ran its bucket dry and bought 4 s of penalty.
    assert sent_a_while(99, drained=False).mirror(11.0).rate == pytest.approx(ROOM * 100.0)


def test_under_a_new_limit_a_first_reading_is_no_top_the_old_one_scaled_is():
    # A bucket of 100 seen full, then the quota doubles (limit 200). A slow reply's
    # reading of 11 under the new limit, its request sent at an empty mirror, is not a
    # full bucket: the old top scaled to the new limit (200) is what full means. Read as
    # full, it raised the rate a quarter (the real-time row 9: 94 to 117.5 a second, a
    # drained bucket run dry by sends the mirror let out, 3 s of penalty bought).
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=99, reset_after=0.01, limit=100, now=0.0, sent_mark=bucket.taken)
    bucket.sync(remaining=0, reset_after=1.0, limit=100, now=1.0, sent_mark=bucket.taken)
    mark, level = bucket.taken, bucket.mirror(1.0).level + 1
    for second in range(2, 9):
        bucket.take(150, float(second))  # more than the mirror's rate, for the reply's 7 s

    def slow_reading(remaining: float, now: float) -> float:
        bucket.sync(
            remaining=remaining,
            reset_after=2.0,  # 189 short, full again "in 2 s": 94 a second learnt
            limit=200,
            now=now,
            sent_mark=mark,
            sent_age=now - 1.0,
            sent_level=level,
        )
        return bucket.mirror(now).rate

    assert slow_reading(11, 8.0) == pytest.approx(94.0)
    # the old bucket's top, scaled to the new limit: full, and the rate is raised
    assert slow_reading(199, 8.5) == pytest.approx(1.25 * 94.0)


def learnt_at_half() -> TokenBucket:
    """A mirror that learnt 49 a second off one refusal's reading: half empty, "full in
    1 s" (a reset rounded up to the second, over a bucket refilling at 100)."""
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=50, reset_after=1.0, limit=100, now=0.0, sent_mark=bucket.taken)
    assert bucket.mirror(0.0).rate == pytest.approx(49.0)
    return bucket


def test_a_mirror_no_reading_verifies_is_probed_while_we_send_at_its_rate():
    # Replies that take seconds bring no reading: the door's silence is the evidence.
    bucket = learnt_at_half()
    assert not bucket.probe(49.0, 0.4)  # a reading less than half a second old
    assert not bucket.probe(40.0, 0.6)  # we sent under its rate: it held nothing back
    assert bucket.probe(49.0, 0.6)
    assert bucket.mirror(0.6).rate == pytest.approx(49.0 * 1.1)
    rates = []
    for step in range(2, 12):
        bucket.probe(bucket.mirror(0.0).rate, 0.6 + 0.5 * step)
        rates.append(bucket.mirror(0.0).rate)
    # Never beyond twice where probing began: a rounded reset halves a rate, no more.
    assert rates[-1] == pytest.approx(98.0)
    assert rates == sorted(rates)


def test_a_refusal_after_a_probe_takes_it_back_until_a_fast_reading():
    bucket = learnt_at_half()
    assert bucket.probe(49.0, 0.6)
    assert bucket.probe(53.9, 1.1)
    assert bucket.probe_refuted(1.2)
    assert bucket.mirror(1.2).rate == pytest.approx(53.9)  # the last rate that was silent
    assert not bucket.probe_refuted(1.3)
    assert not bucket.probe(60.0, 2.0)  # no more probing on the door's word alone
    # A slow reading (a streamed reply's headers, maybe from before the probe) is none.
    bucket.sync(
        remaining=80, reset_after=1.0, limit=100, now=3.0, sent_mark=bucket.taken, sent_age=5.0
    )
    assert not bucket.probe(60.0, 3.6)
    bucket.sync(remaining=80, reset_after=1.0, limit=100, now=4.0, sent_mark=bucket.taken)
    assert bucket.probe(60.0, 4.6)
    assert bucket.mirror(4.6).rate == pytest.approx(53.9 * 1.1)
    # A fast reading that shows the bucket empty (a 429's) refutes it as a refusal would.
    bucket.sync(remaining=0, reset_after=2.0, limit=100, now=4.7, sent_mark=bucket.taken)
    assert bucket.mirror(4.7).rate == pytest.approx(53.9)
    assert not bucket.probe(60.0, 5.3)


def test_a_fixed_window_or_a_measured_bound_is_not_probed_past():
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=5, reset_after=3.0, limit=None, now=0.0)  # a fixed window
    assert not bucket.probe(100.0, 1.0)
    # Two fast readings half a second apart measured a refill of 20 a second: the rate
    # is bounded a little over that, and the door's silence does not outweigh a measurement.
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=10, reset_after=1.0, limit=100, now=0.0, sent_mark=bucket.taken)
    bucket.take(10, 0.25)
    bucket.sync(remaining=10, reset_after=1.0, limit=100, now=0.5, sent_mark=bucket.taken)
    assert bucket.mirror(0.5).rate == pytest.approx(ROOM * 20.0)
    assert not bucket.probe(ROOM * 20.0, 1.1)
    assert bucket.mirror(1.1).rate == pytest.approx(ROOM * 20.0)


def test_a_reading_at_the_reply_does_not_count_what_we_took_while_it_came():
    # A mirror refilling about 200 a second, run dry by slow replies (streamed answers).
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=100, reset_after=0.5, limit=200, now=0.0, sent_mark=bucket.taken)
    mark = bucket.taken
    bucket.take(1, 9.99)  # long enough ago that the upstream counted it

    def slow_reading(remaining: float, now: float) -> float:
        bucket.sync(
            remaining=remaining, reset_after=0.02, limit=200, now=now,
            sent_mark=mark, sent_age=10.0, lag=0.005,
        )
        mirror = bucket.mirror(now)
        assert mirror is not None
        return mirror.level

    assert slow_reading(4, 10.0) == pytest.approx(4.0)
    bucket.take(2, 10.0005)  # granted off that reading
    # A second reply written as the first was, before those two reached the upstream:
    # its 4 left do not count them, and they are not granted again.
    assert slow_reading(4, 10.001) == pytest.approx(2.0)
    # Written after they were counted (they were sent longer than ``lag`` ago).
    assert slow_reading(2, 10.01) == pytest.approx(2.0)


def slow_reply_with_a_doubled_quota(bucket: TokenBucket) -> None:
    bucket.sync(
        remaining=150,
        reset_after=0.3,
        limit=12_000,
        now=20.0,
        sent_mark=bucket.taken,
        sent_age=10.0,
    )


def test_held_back_a_quota_that_doubles_lifts_the_refill_bound_off_slow_replies_alone():
    # A punishing upstream's bucket is never run dry: no refusal comes back fast to
    # measure the refill, and every success takes seconds (long answers). The bound
    # scales with the limit instead of holding the pace at the old quota.
    bucket = per_minute_bucket(reserve=0.1)
    slow_reply_with_a_doubled_quota(bucket)
    assert bucket.mirror(20.0).rate == pytest.approx(ROOM_HELD * 200.0)


def test_without_a_reserve_only_a_fast_reply_rescales_the_refill_bound():
    # Refusals at the edge go on measuring; a bound scaled off a slow reply would be
    # above the refill until they do.
    bucket = per_minute_bucket(reserve=0.0)
    slow_reply_with_a_doubled_quota(bucket)
    assert bucket.mirror(20.0).rate == pytest.approx(ROOM * 100.0)
    bucket.sync(remaining=0, reset_after=0.3, limit=12_000, now=21.0, sent_mark=bucket.taken)
    assert bucket.mirror(21.0).rate == pytest.approx(ROOM * 200.0)


def test_a_bound_raised_under_a_new_limit_is_not_scaled_to_it_again():
    # The refill bound measured under 6 000 a minute (100 a second); the quota doubles.
    # A slow reply shows the new bucket full although we sent at the bound: raised a
    # quarter, under the new limit. The first fast reply under it must not double that
    # bound as if it were still the old quota's (the real-time row 14: 168 to 336 a
    # second against a refill of 200, and refusals every 20 ms).
    # The new bucket, the old top scaled (200), full: the bound is raised.
    bucket = sent_a_while(199, limit=12_000)
    raised = 1.25 * ROOM * 100.0
    assert bucket.mirror(11.0).rate == pytest.approx(raised)
    bucket.sync(remaining=0, reset_after=1.0, limit=12_000, now=12.0, sent_mark=bucket.taken)
    assert bucket.mirror(12.0).rate == pytest.approx(raised)


def test_a_rate_the_upstream_was_seen_to_refill_at_least_raises_one_learnt_lower():
    # "0 of 100 left, full again in 2 s" (a reset rounded up to the second): 49.5 a second.
    bucket = TokenBucket(now=0.0, **UNBOUNDED)
    bucket.sync(remaining=0, reset_after=2.0, limit=100, now=0.0)
    assert bucket.mirror(0.0).rate == pytest.approx(49.5)
    assert bucket.at_least(77.0, 0.0)  # it took 77 a second more than its bucket held
    assert bucket.mirror(0.0).rate == pytest.approx(77.0)
    assert not bucket.at_least(60.0, 0.0)  # a lower floor lowers nothing
    assert bucket.mirror(0.0).rate == pytest.approx(77.0)
    assert bucket.time_until(1, 0.0) == pytest.approx(1 / 77)


def test_a_floor_raises_no_fixed_window_and_no_rate_past_the_measured_bound():
    window = TokenBucket(now=0.0, **UNBOUNDED)
    window.sync(remaining=2, reset_after=3.0, limit=None, now=0.0)
    window.at_least(100.0, 0.0)
    assert window.mirror(0.0).rate == 0.0  # what is left until the reset, as before
    bounded = per_minute_bucket(reserve=0.0)  # refill measured: at most 125 a second
    bounded.at_least(1_000.0, 1.0)
    assert bounded.mirror(1.0).rate == pytest.approx(ROOM * 100.0)


def test_a_negative_remaining_says_nothing_and_is_ignored():
    bucket = TokenBucket(rate=1.0, burst=10.0, now=0.0)
    bucket.sync(remaining=-1, reset_after=5.0, limit=None, now=0.0)
    assert bucket.level(0.0) == 10.0
    assert bucket.mirror(0.0) is None
    assert "mirror" not in repr(bucket)


def test_a_bucket_repr_shows_the_mirror():
    bucket = TokenBucket(rate=1.0, burst=10.0, now=0.0)
    bucket.sync(remaining=2, reset_after=4.0, limit=None, now=0.0)
    assert repr(bucket) == (
        "TokenBucket(rate=1, burst=10, level=10.000 at 0.000, mirror=2.000/2 at 0/s until 4.000)"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0.0, "burst": 1.0}, "rate must be a finite number greater than 0"),
        ({"rate": 1.0, "burst": -1.0}, "burst must be a finite number greater than 0"),
        ({"rate": math.inf, "burst": 1.0}, "rate must be a finite number"),
    ],
)
def test_a_bucket_validates_its_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenBucket(now=0.0, **kwargs)


def test_a_bucket_refuses_negative_amounts_and_bad_headers():
    bucket = TokenBucket(rate=1.0, burst=1.0, now=0.0)
    with pytest.raises(ValueError, match="amount must be a finite number of at least 0"):
        bucket.take(-1, 0.0)
    with pytest.raises(ValueError, match="reset_after"):
        bucket.sync(remaining=1, reset_after=-2.0, limit=None, now=0.0)
    with pytest.raises(ValueError, match="limit"):
        bucket.sync(remaining=1, reset_after=1.0, limit=0, now=0.0)


# RateGate --------------------------------------------------------------------------------


async def test_a_60_rpm_gate_admits_its_burst_at_once_then_one_per_second():
    gate = RateGate(per_minute=60, burst=3)
    assert await admission_times(gate, 6) == [0.0, 0.0, 0.0, 1.0, 2.0, 3.0]


async def test_the_default_burst_is_one_seconds_worth():
    assert RateGate(per_minute=60).statistics().burst == 1.0
    assert RateGate(per_minute=600).statistics().burst == 10.0
    assert await admission_times(RateGate(per_minute=120), 4) == [0.0, 0.0, 0.5, 1.0]


async def test_waiters_are_served_first_come_first_served_by_one_timer():
    gate = RateGate(per_minute=60, burst=1)
    order = []

    async def caller(name, amount):
        await gate.acquire(amount)
        order.append((name, now()))

    tasks = [asyncio.create_task(caller(n, a)) for n, a in [("a", 1), ("big", 2), ("c", 1)]]
    await asyncio.sleep(0)
    assert gate.statistics().waiters == 2
    assert not gate.try_acquire()  # may not jump the queue
    await asyncio.gather(*tasks)
    # "big" (above the burst) goes when the bucket is full, into debt; "c" waits its turn
    assert order == [("a", 0.0), ("big", 1.0), ("c", 3.0)]


async def test_reassigning_per_minute_keeps_the_level_and_wakes_the_waiter():
    gate = RateGate(per_minute=6, burst=1)  # one request per 10 s
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(1.0)
    gate.per_minute = 60  # 0.1 earned so far, the other 0.9 now takes 0.9 s
    await waiter
    assert now() == pytest.approx(1.9, abs=1e-6)
    assert gate.per_minute == 60


async def test_reassigning_per_minute_validates():
    gate = RateGate(per_minute=60)
    with pytest.raises(ValueError, match="per_minute must be a finite number greater than 0"):
        gate.per_minute = 0
    assert gate.per_minute == 60


async def test_a_gate_paced_by_headers_sends_what_is_left_then_at_the_upstreams_refill():
    gate = RateGate(per_minute=6000, burst=100)  # alone it would send 100 at once
    gate.sync(remaining=2, reset_after=58.0, limit=61)
    assert gate.statistics().mirror == MirrorStatistics(
        level=2.0, rate=1.0, burst=61.0, lapses_at=None
    )
    assert await admission_times(gate, 4) == [0.0, 0.5, 1.0, 2.0]  # the bottom: one by one


async def test_a_fixed_window_holds_the_waiter_until_its_reset():
    gate = RateGate(per_minute=6000, burst=100)
    gate.sync(remaining=1, reset_after=2.0)
    assert await admission_times(gate, 3) == [0.0, 2.0, 2.0]
    assert gate.statistics().mirror is None


async def test_a_sync_that_teaches_a_faster_refill_wakes_the_waiter_earlier():
    gate = RateGate(per_minute=6000, burst=100)
    gate.sync(remaining=0, reset_after=60.0, limit=61)  # 1 per second
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0.5)
    assert not waiter.done()
    gate.sync(remaining=0, reset_after=10.0, limit=61)  # 6 per second, from nothing left
    await waiter
    assert now() == pytest.approx(0.5 + 1 / 6, abs=1e-6)  # not at 1.0


async def test_rate_gate_statistics_and_repr_show_the_live_state():
    gate = RateGate(per_minute=60, burst=2)
    await gate.acquire(2)
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0.5)
    assert gate.statistics() == GateStatistics(
        per_minute=60, burst=2, level=0.5, waiters=1, mirror=None
    )
    assert repr(gate) == "<RateGate per_minute=60 level=0.500/2 waiters=1>"
    await waiter
    gate.sync(remaining=3, reset_after=2.0, limit=6)
    assert gate.statistics().mirror == MirrorStatistics(
        level=3.0, rate=1.0, burst=6.0, lapses_at=None
    )
    assert repr(gate) == (
        "<RateGate per_minute=60 level=0.000/2 waiters=0 mirror=3.000/6@1/s>"
    )


async def test_cancelling_the_head_lets_the_next_waiter_in_on_time():
    gate = RateGate(per_minute=60, burst=1)
    await gate.acquire()
    big = asyncio.create_task(gate.acquire(1))
    small = asyncio.create_task(gate.acquire(1))
    await asyncio.sleep(0.5)
    big.cancel()
    await small
    assert now() == 1.0


async def test_random_cancellation_leaks_no_unit_and_strands_no_waiter():
    rng = random.Random(20240601)
    gate = RateGate(per_minute=60, burst=3)
    admitted: list[float] = []
    tasks = []

    async def caller(amount: int) -> None:
        await gate.acquire(amount)
        admitted.append(amount)

    loop = asyncio.get_running_loop()
    for _ in range(60):
        # demand (about 2.5 units per second) outruns supply (1/s): the bucket stays
        # below its burst, so the ledger below is exact
        task = asyncio.create_task(caller(rng.choice([1, 1, 2, 4])))
        tasks.append(task)
        if rng.random() < 0.5:
            loop.call_later(rng.choice([0.0, 0.5, 1.0, 3.0, 10.0]), task.cancel)
        await asyncio.sleep(rng.choice([0.0, 0.5, 1.0]))
    done, pending = await asyncio.wait(tasks, timeout=1000)
    assert not pending
    cancelled = sum(1 for t in done if t.cancelled())
    assert 0 < cancelled < len(tasks)
    assert len(admitted) == len(tasks) - cancelled
    # what the bucket holds = burst + everything refilled - what the admitted kept
    t_end = now()
    assert gate.statistics().level == pytest.approx(3 + t_end - sum(admitted))
    assert gate.statistics().level < 3
    assert gate.statistics().waiters == 0
    assert "waiters=0" in repr(gate)


# TokenGate -------------------------------------------------------------------------------


async def test_a_reservation_reconciled_down_refunds_and_lets_the_next_in_earlier():
    gate = TokenGate(per_minute=6000, burst=100)  # 100 tokens per second
    first = await gate.reserve(100)
    second = asyncio.create_task(gate.reserve(100))
    await asyncio.sleep(0.2)
    first.reconcile(40)  # 20 refilled + 60 refunded: 20 short, 0.2 s away
    await second
    assert now() == pytest.approx(0.4, abs=1e-6)


async def test_a_reservation_reconciled_up_goes_into_debt_and_delays_the_next():
    gate = TokenGate(per_minute=6000, burst=100)
    first = await gate.reserve(100)
    second = asyncio.create_task(gate.reserve(100))
    await asyncio.sleep(0.2)
    first.reconcile(150)  # 20 refilled - 50 charged = -30: 130 short, 1.3 s away
    assert gate.statistics().level == pytest.approx(-30)
    await second
    assert now() == pytest.approx(1.5, abs=1e-6)


async def test_a_cancelled_reservation_gives_everything_back():
    gate = TokenGate(per_minute=6000, burst=100)
    reservation = await gate.reserve(80)
    assert gate.statistics().level == 20
    reservation.cancel()
    assert gate.statistics().level == 100
    assert reservation.ended and reservation.actual is None
    assert repr(reservation) == "<Reservation estimate=80 cancelled>"


async def test_a_waiter_granted_then_cancelled_before_it_ran_gives_its_tokens_back():
    gate = TokenGate(per_minute=60, burst=100)
    first = await gate.reserve(100)
    waiter = asyncio.create_task(gate.reserve(100))
    await asyncio.sleep(1.0)
    first.cancel()  # the refund grants the waiter synchronously...
    waiter.cancel()  # ...and it is cancelled before it could resume
    with pytest.raises(asyncio.CancelledError):
        await waiter
    stats = gate.statistics()
    assert stats.level == 100  # nothing kept by the cancelled waiter
    assert (stats.waiters, stats.open_reservations) == (0, 0)


async def test_a_reservation_ends_exactly_once():
    gate = TokenGate(per_minute=6000, burst=100)
    reservation = await gate.reserve(10)
    reservation.reconcile(12)
    assert repr(reservation) == "<Reservation estimate=10 reconciled actual=12>"
    with pytest.raises(RuntimeError, match="ends exactly once"):
        reservation.reconcile(12)
    with pytest.raises(RuntimeError, match="ends exactly once"):
        reservation.cancel()
    assert gate.statistics().level == pytest.approx(88)


async def test_reserve_nowait_refuses_with_would_block_which_is_not_a_quota_error():
    gate = TokenGate(per_minute=6000, burst=100)
    gate.reserve_nowait(70)
    with pytest.raises(WouldBlock, match=r"Reserving 50 tokens would wait 0\.200 s"):
        gate.reserve_nowait(50)
    assert issubclass(WouldBlock, RuntimeError)
    assert not issubclass(WouldBlock, QuotaError)
    assert gate.statistics().level == 30


async def test_an_estimate_above_the_burst_waits_for_a_full_bucket_then_goes_into_debt():
    gate = TokenGate(per_minute=6000, burst=100)
    await gate.reserve(50)
    await gate.reserve(250)  # waits 0.5 s for a full bucket, not forever
    assert now() == 0.5
    assert gate.statistics().level == -150
    await gate.reserve(100)
    assert now() == 3.0


async def test_token_estimates_are_validated():
    gate = TokenGate(per_minute=6000)
    with pytest.raises(ValueError, match="estimate must be at least 0 tokens"):
        await gate.reserve(-1)
    with pytest.raises(TypeError, match="integer number of tokens"):
        gate.reserve_nowait(1.5)  # type: ignore[arg-type]
    reservation = await gate.reserve(5)
    with pytest.raises(ValueError, match="actual must be at least 0 tokens"):
        reservation.reconcile(-3)
    assert not reservation.ended


async def test_token_gate_statistics_and_repr_count_open_reservations():
    gate = TokenGate(per_minute=6000, burst=100)
    a = await gate.reserve(30)
    await gate.reserve(20)
    stats = gate.statistics()
    assert (stats.open_reservations, stats.reserved, stats.level) == (2, 50, 50)
    a.cancel()
    assert repr(gate) == (
        "<TokenGate per_minute=6000 level=80.000/100 waiters=0 open_reservations=1 reserved=20>"
    )


async def test_random_cancellation_of_token_waiters_leaks_no_token():
    rng = random.Random(777)
    gate = TokenGate(per_minute=6000, burst=5000)  # 100 tokens per second
    drain = await gate.reserve(5000)
    drain.reconcile(5000)
    charged = [5000]
    tasks = []
    waiting: list[asyncio.Task[None]] = []

    async def request(estimate: int) -> None:
        me = asyncio.current_task()
        waiting.append(me)
        try:
            reservation = await gate.reserve(estimate)
        finally:
            waiting.remove(me)
        try:
            await asyncio.sleep(rng.choice([0.1, 0.5, 2.0]))
        except asyncio.CancelledError:
            reservation.cancel()  # never reached the upstream
            raise
        actual = rng.randint(0, 2 * estimate)
        reservation.reconcile(actual)  # may grant the next waiter synchronously...
        charged.append(actual)
        if waiting and rng.random() < 0.5:  # ...which is cancelled before it can resume
            waiting[0].cancel()

    loop = asyncio.get_running_loop()
    for _ in range(60):
        # demand (about 300 tokens per second) outruns supply, so the bucket never
        # refills to its burst and the ledger below stays exact
        task = asyncio.create_task(request(rng.choice([50, 100, 300, 600])))
        tasks.append(task)
        if rng.random() < 0.5:
            loop.call_later(rng.choice([0.0, 0.1, 0.5, 1.0, 4.0]), task.cancel)
        await asyncio.sleep(rng.choice([0.0, 0.5, 1.0]))
    done, pending = await asyncio.wait(tasks, timeout=10_000)
    assert not pending
    assert 0 < sum(1 for t in done if t.cancelled()) < len(tasks)
    stats = gate.statistics()
    assert (stats.waiters, stats.open_reservations, stats.reserved) == (0, 0, 0)
    assert stats.level == pytest.approx(5000 + 100 * now() - sum(charged))
    assert stats.level < 5000


# CooldownGate ----------------------------------------------------------------------------


async def test_an_open_cooldown_lets_everyone_through_at_once():
    gate = CooldownGate()
    await gate.wait()
    assert now() == 0.0
    assert gate.is_open() and gate.closed_until is None and gate.remaining() == 0.0


async def release_times(gate: CooldownGate, count: int) -> list[float]:
    async def waiter() -> float:
        await gate.wait()
        return now()

    return list(await asyncio.gather(*(waiter() for _ in range(count))))


async def test_a_retry_after_of_7s_holds_every_waiter_and_releases_them_over_the_ramp():
    gate = CooldownGate(ramp=1.0, rng=random.Random(5))
    gate.close_until(7.0)
    assert gate.closed_until == 7.0 and gate.remaining() == 7.0 and not gate.is_open()
    times = await release_times(gate, 20)
    assert all(7.0 <= t < 8.0 for t in times)
    assert len(set(times)) > 10  # not one stampede at a single instant
    assert gate.is_open() and gate.statistics().waiters == 0


async def test_the_ramp_is_deterministic_with_a_seeded_rng():
    one, two = (CooldownGate(ramp=2.0, rng=random.Random(99)) for _ in range(2))
    one.close_until(7.0)
    two.close_until(7.0)
    first, second = await asyncio.gather(release_times(one, 5), release_times(two, 5))
    assert first == second


async def test_a_cooldown_with_no_ramp_releases_everyone_at_the_instant():
    gate = CooldownGate(ramp=0.0)
    gate.close_until(7.0)
    assert await release_times(gate, 3) == [7.0, 7.0, 7.0]


async def test_an_extension_while_waiting_keeps_them_waiting():
    gate = CooldownGate(ramp=1.0, rng=random.Random(1))
    gate.close_until(7.0)

    async def extend() -> None:
        await asyncio.sleep(3.0)
        gate.close_until(10.0)

    extender = asyncio.create_task(extend())
    times = await release_times(gate, 10)
    await extender
    assert all(10.0 <= t < 11.0 for t in times)
    assert gate.statistics().closures == 1  # an extension is not a new closure


async def test_a_closure_during_the_ramp_holds_those_not_yet_released():
    gate = CooldownGate(ramp=1.0, rng=random.Random(3))
    gate.close_until(7.0)
    loop = asyncio.get_running_loop()
    loop.call_at(7.5, gate.close_until, 20.0)
    times = await release_times(gate, 20)
    early = [t for t in times if t < 7.5]
    assert early and all(7.0 <= t < 7.5 for t in early)
    assert all(20.0 <= t < 21.0 for t in times if t >= 7.5)
    assert gate.statistics().closures == 2


async def test_an_earlier_close_until_is_ignored():
    gate = CooldownGate(ramp=0.0)
    gate.close_until(7.0)
    gate.close_until(5.0)
    assert gate.closed_until == 7.0
    await gate.wait()
    assert now() == 7.0


async def test_a_close_until_in_the_past_does_not_close():
    gate = CooldownGate()
    await asyncio.sleep(5.0)
    gate.close_until(4.0)
    assert gate.is_open() and gate.statistics().closures == 0


async def test_cooldown_statistics_and_repr_show_the_live_state():
    gate = CooldownGate(ramp=0.5, rng=random.Random(0))
    gate.close_until(3.0)
    waiter = asyncio.create_task(gate.wait())
    await asyncio.sleep(1.0)
    assert gate.remaining() == 2.0
    assert gate.is_open(now=3.0)
    assert repr(gate) == "<CooldownGate closed_until=3.000 ramp=0.5 waiters=1 closures=1>"
    await waiter
    assert repr(gate) == "<CooldownGate open ramp=0.5 waiters=0 closures=1>"


def test_cooldown_validates_its_configuration():
    with pytest.raises(ValueError, match="ramp must be a finite number of at least 0"):
        CooldownGate(ramp=-1.0)
    with pytest.raises(ValueError, match="finite loop time"):
        CooldownGate().close_until(math.nan)


async def test_random_cancellation_of_cooldown_waiters_strands_no_one():
    rng = random.Random(4242)
    gate = CooldownGate(ramp=1.0, rng=random.Random(8))
    released: list[float] = []
    loop = asyncio.get_running_loop()

    async def waiter() -> None:
        await gate.wait()
        released.append(now())

    tasks = []
    gate.close_until(5.0)
    final = 5.0
    for step in range(40):
        task = asyncio.create_task(waiter())
        tasks.append(task)
        if rng.random() < 0.5:
            loop.call_later(rng.choice([0.0, 0.25, 1.0, 5.0]), task.cancel)
        if step == 20:
            final = now() + 6.0
            gate.close_until(final)
        await asyncio.sleep(rng.choice([0.0, 0.25]))
    done, pending = await asyncio.wait(tasks, timeout=100)
    assert not pending
    cancelled = sum(1 for t in done if t.cancelled())
    assert 0 < cancelled < len(tasks)
    assert len(released) == len(tasks) - cancelled
    assert all(final <= t < final + 1.0 for t in released)
    assert gate.is_open() and gate.statistics().waiters == 0


async def test_a_dispatcher_passing_for_many_is_spread_evenly_over_the_ramp():
    loop = asyncio.get_running_loop()
    gate = CooldownGate(ramp=1.0, rng=random.Random(3))
    gate.close_until(10.0)
    passes = []
    for _ in range(8):
        await gate.wait(spread=4)
        passes.append(loop.time())
    first = passes[0]
    assert 10.0 <= first < 11.0
    # a quarter of a second apart (four a ramp) from the first pass; the ramp's end frees all
    expected = [min(first + 0.25 * k, 11.0) for k in range(8)]
    assert passes == pytest.approx(expected)
    assert gate.settled(loop.time())


async def test_a_lead_sends_the_first_pass_alone_ahead_of_the_rest():
    # A window honoured in full (a punishing upstream), no ramp: the first pass after it
    # goes alone; the others wait the lead, time for its refusal to close the gate again.
    loop = asyncio.get_running_loop()
    gate = CooldownGate(ramp=0.0)
    gate.close_until(2.0, lead=0.01)
    assert await gate.wait(spread=10) == 0 and loop.time() == pytest.approx(2.0)
    assert not gate.settled(loop.time())
    await gate.wait(spread=10)
    assert loop.time() == pytest.approx(2.01)
    await gate.wait(spread=10)  # then the rest at once
    assert loop.time() == pytest.approx(2.01) and gate.settled(loop.time())
    # Refused, the first pass closes it again: nothing followed it.
    gate.close_until(4.0, lead=0.01)
    await gate.wait(spread=10)
    gate.close_until(5.0, lead=0.01)
    await gate.wait(spread=10)
    assert loop.time() == pytest.approx(5.0)


async def test_a_new_closure_during_the_ramp_restarts_the_spread():
    loop = asyncio.get_running_loop()
    gate = CooldownGate(ramp=1.0, rng=random.Random(3))
    gate.close_until(5.0)
    await gate.wait(spread=10)
    gate.close_until(loop.time() + 5.0)
    reopened = gate.closed_until
    await gate.wait(spread=10)
    assert reopened is not None and loop.time() >= reopened


async def test_a_hold_lets_one_probe_through_at_its_time_and_a_reopen_frees_the_rest():
    loop = asyncio.get_running_loop()
    gate = CooldownGate(ramp=0.0)
    gate.hold(7.0, probe_at=0.01)
    assert gate.probing and gate.closed_until == 7.0
    # A dispatcher waiting on the gate passes at 0.01, as the probe of this closure.
    probe = await gate.wait(spread=10)
    assert probe == gate.generation and loop.time() == pytest.approx(0.01)
    assert gate.probe_out and gate.statistics().probes == 1
    # Plain waiters keep waiting while the probe is out...
    others = asyncio.gather(*(gate.wait() for _ in range(3)))
    await asyncio.sleep(0.1)
    assert not others.done()
    # ...and all go the moment its success reopens the gate, well before 7 s.
    gate.reopen()
    assert await others == [0, 0, 0]
    assert loop.time() == pytest.approx(0.11)
    assert gate.is_open() and gate.statistics().reopened == 1


async def test_a_refused_probe_holds_on_and_the_next_goes_later_a_lost_one_at_once():
    loop = asyncio.get_running_loop()
    gate = CooldownGate(ramp=0.0)
    gate.hold(7.0, probe_at=0.01)
    first = await gate.wait(spread=10)
    gate.hold(7.0, probe_at=loop.time() + 0.02)  # refused: the next probe in 20 ms
    second = await gate.wait(spread=10)
    assert second == first and loop.time() == pytest.approx(0.03)
    gate.probe_lost(second)  # it ended with no answer: another may go now
    third = await gate.wait(spread=10)
    assert third == first and loop.time() == pytest.approx(0.03)
    # Honoured in full (a punishing upstream): no probe passes, the window ends it.
    gate.close_until(9.0)
    assert not gate.probing
    assert await gate.wait(spread=10) == 0 and loop.time() == pytest.approx(9.0)

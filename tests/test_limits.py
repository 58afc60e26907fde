"""Limit algorithms, driven with explicit timestamps: no event loop, no clock."""

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncquota.limits import AIMD, DEFAULT_RTT, LATENCY_WINDOW_MIN, Fixed, Gradient, Limit


def window(limit: Limit, now: float, rtt: float = 1.0) -> float:
    """One round trip of fully used successes (``limit`` of them, in flight == limit)."""
    for _ in range(limit.limit):
        limit.on_sample(now, rtt, limit.limit, False)
    return now + rtt


def cut(value: int, ratio: float = 0.5, min_limit: int = 1) -> int:
    return max(min_limit, math.floor(value * ratio))


# --- validation and representation ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_limit": 0}, "min_limit must be at least 1"),
        ({"min_limit": 10, "max_limit": 5, "initial": 7}, "must not be smaller than min_limit"),
        ({"initial": 2000}, "initial .* must lie between"),
        ({"backoff_ratio": 1.0}, "backoff_ratio must lie strictly between 0 and 1"),
        ({"backoff_ratio": 0}, "backoff_ratio"),
    ],
)
def test_both_adaptive_limits_refuse_bad_bounds_and_ratios(kwargs, message):
    for cls in (AIMD, Gradient):
        with pytest.raises(ValueError, match=message):
            cls(**kwargs)


def test_each_algorithm_refuses_its_own_bad_settings():
    with pytest.raises(ValueError, match="increase must be positive"):
        AIMD(increase=0)
    with pytest.raises(ValueError, match="idle_reset must be a positive number of seconds"):
        AIMD(idle_reset=-1)
    with pytest.raises(ValueError, match=r"smoothing must lie in \(0, 1\]"):
        Gradient(smoothing=0)
    with pytest.raises(ValueError, match="tolerance must be at least 1"):
        Gradient(tolerance=0.9)
    with pytest.raises(ValueError, match="baseline_window must be a positive"):
        Gradient(baseline_window=0)
    with pytest.raises(ValueError, match="integer of at least 1"):
        Fixed(0)
    with pytest.raises(ValueError, match="integer of at least 1"):
        Fixed(True)


def test_reprs_show_the_live_limit():
    aimd = AIMD(initial=8)
    assert repr(aimd) == "AIMD(limit=8, ssthresh=1000, min_limit=1, max_limit=1000)"
    aimd.on_sample(10.0, 1.0, 8, True)
    assert repr(aimd) == "AIMD(limit=4, ssthresh=4, min_limit=1, max_limit=1000)"
    gradient = Gradient(initial=5, max_limit=50)
    assert repr(gradient) == "Gradient(limit=5, baseline=None, min_limit=1, max_limit=50)"
    gradient.on_sample(1.0, 0.25, 0, False)
    assert repr(gradient) == "Gradient(limit=5, baseline=0.250, min_limit=1, max_limit=50)"
    assert repr(Fixed(7)) == "Fixed(7)"


def test_a_fixed_limit_never_moves():
    fixed = Fixed(7)
    assert fixed.on_sample(1.0, 0.1, 7, True) == 7
    assert fixed.on_sample(2.0, 0.1, 7, False) == 7
    assert fixed.limit == 7


# --- AIMD -------------------------------------------------------------------------------


def test_aimd_slow_start_doubles_the_limit_every_window_of_used_successes():
    aimd = AIMD(initial=10)
    now = window(aimd, 1.0)
    assert aimd.limit == 20
    window(aimd, now)
    assert aimd.limit == 40


def test_aimd_cuts_by_the_backoff_ratio_on_a_drop_and_stops_slow_start_there():
    aimd = AIMD(initial=40, backoff_ratio=0.75)
    assert aimd.on_sample(10.0, 2.0, 40, True) == 30
    assert aimd.ssthresh == 30


def test_aimd_grows_by_increase_per_window_after_the_first_drop():
    aimd = AIMD(initial=40, increase=2)
    aimd.on_sample(10.0, 2.0, 40, True)
    now = window(aimd, 11.0)
    assert aimd.limit == 22
    window(aimd, now)
    assert aimd.limit == 24


def test_aimd_an_unused_limit_does_not_grow():
    aimd = AIMD(initial=40)
    for i in range(1000):
        aimd.on_sample(float(i), 1.0, 19, False)
    assert aimd.limit == 40
    aimd.on_sample(1000.0, 1.0, 20, False)
    assert aimd.limit == 41


def test_aimd_replies_to_requests_sent_before_the_cut_are_echoes_of_the_same_episode():
    aimd = AIMD(initial=100)
    window(aimd, 0.0, rtt=2.0)  # smoothed round trip: 2 s
    aimd.on_sample(10.0, 2.0, 200, True)
    assert aimd.limit == 100
    # Sent at 9.5, before the cut at 10: already answered, however late it arrives.
    aimd.on_sample(30.0, 20.5, 100, True)
    assert aimd.limit == 100


def test_aimd_cuts_at_most_once_per_smoothed_round_trip():
    aimd = AIMD(initial=100)
    window(aimd, 0.0, rtt=2.0)
    aimd.on_sample(10.0, 2.0, 200, True)
    # Sent after the cut, but only 1.5 s later: the overload has not drained yet.
    aimd.on_sample(11.5, 0.5, 100, True)
    assert aimd.limit == 100
    # Sent after the cut and a full round trip on: a new episode.
    aimd.on_sample(12.0, 1.0, 100, True)
    assert aimd.limit == 50


def test_aimd_spaces_cuts_by_the_default_round_trip_before_any_success():
    aimd = AIMD(initial=100)
    aimd.on_sample(5.0, 0.1, 100, True)
    aimd.on_sample(5.0 + DEFAULT_RTT / 2, 0.1, 50, True)
    assert aimd.limit == 50
    aimd.on_sample(5.0 + DEFAULT_RTT, 0.1, 50, True)
    assert aimd.limit == 25


def test_aimd_re_enters_slow_start_after_a_quiet_spell_keeping_its_limit():
    aimd = AIMD(initial=64, idle_reset=30.0)
    aimd.on_sample(1.0, 1.0, 64, True)
    now = window(aimd, 2.0)
    assert (aimd.limit, aimd.ssthresh) == (33, 32)
    # The first request after the quiet spell was sent 30 s after the last reply.
    now += 30.0
    assert aimd.on_sample(now + 1.0, 1.0, 33, False) == 34
    assert aimd.ssthresh == 1000
    window(aimd, now + 2.0)
    assert aimd.limit == 68


def test_aimd_a_single_slow_reply_is_not_a_quiet_spell():
    aimd = AIMD(initial=2, idle_reset=30.0)
    aimd.on_sample(1.0, 1.0, 2, True)
    assert aimd.ssthresh == 1
    # A 45 s reply sent right after the previous one arrived: busy, not idle.
    aimd.on_sample(46.0, 45.0, 1, False)
    aimd.on_sample(91.0, 45.0, 1, False)
    assert aimd.ssthresh == 1
    assert aimd.limit == 2


def test_aimd_stays_between_min_and_max():
    aimd = AIMD(initial=3, min_limit=2, max_limit=10)
    now = 0.0
    for _ in range(5):
        now = window(aimd, now)
    assert aimd.limit == 10
    for _ in range(10):
        now += 5.0
        aimd.on_sample(now, 1.0, 10, True)
    assert aimd.limit == 2


# --- Gradient ---------------------------------------------------------------------------


def test_gradient_shrinks_when_replies_slow_down_and_recovers_when_they_speed_up():
    gradient = Gradient(initial=50, tolerance=2.0)
    gradient.on_sample(0.0, 1.0, 0, False)  # baseline: 1 s
    now = 1.0
    for _ in range(20):
        now += 0.1
        gradient.on_sample(now, 5.0, gradient.limit, False)
    slowed = gradient.limit
    assert slowed < 25
    for _ in range(20):
        now += 0.1
        gradient.on_sample(now, 1.2, gradient.limit, False)
    assert gradient.limit > slowed + 10


def test_gradient_baseline_does_not_creep_up_under_a_steady_moderate_load():
    gradient = Gradient(initial=50, tolerance=2.0, baseline_window=60.0)
    gradient.on_sample(0.0, 1.0, 0, False)
    # Ten minutes of replies at 1.8 s (within tolerance), with the limit fully used.
    for i in range(1, 6001):
        gradient.on_sample(i / 10, 1.8, gradient.limit, False)
    assert gradient.baseline == 1.0


def test_gradient_baseline_is_re_measured_when_the_upstream_itself_got_slower():
    gradient = Gradient(initial=50, tolerance=2.0, baseline_window=60.0)
    gradient.on_sample(0.0, 1.0, 0, False)
    # The first window still holds the fast reply; the second never comes near it.
    for i in range(1, 1200):
        gradient.on_sample(i / 10, 3.0 + (i % 7) / 10, 1, False)
    assert gradient.baseline == 1.0
    gradient.on_sample(120.0, 3.5, 1, False)
    assert gradient.baseline == 3.0


def test_gradient_baseline_falls_at_once_to_a_faster_reply():
    gradient = Gradient()
    gradient.on_sample(0.0, 1.0, 0, False)
    gradient.on_sample(0.5, 0.4, 0, False)
    assert gradient.baseline == 0.4


def test_gradient_an_unused_limit_does_not_move_whatever_the_latency():
    gradient = Gradient(initial=40)
    gradient.on_sample(0.0, 1.0, 0, False)
    for i in range(100):
        gradient.on_sample(1.0 + i, 9.0, 19, False)
    assert gradient.limit == 40


def test_gradient_cuts_once_per_congestion_episode_like_aimd():
    gradient = Gradient(initial=80)
    gradient.on_sample(0.0, 2.0, 0, False)
    for i in range(50):
        gradient.on_sample(10.0 + i / 100, 1.0, 80, True)
    assert gradient.limit == 40
    gradient.on_sample(13.0, 1.0, 40, True)
    assert gradient.limit == 20


# --- properties -------------------------------------------------------------------------

samples = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=100),  # time since the previous reply
        st.floats(min_value=0, max_value=200),  # round trip
        st.integers(min_value=0, max_value=3000),  # in flight
        st.booleans(),  # dropped
    ),
    max_size=200,
)


@st.composite
def bounds(draw: st.DrawFn) -> tuple[int, int, int]:
    min_limit = draw(st.integers(min_value=1, max_value=50))
    max_limit = draw(st.integers(min_value=min_limit, max_value=2000))
    initial = draw(st.integers(min_value=min_limit, max_value=max_limit))
    return initial, min_limit, max_limit


def feed(limit: Limit, sequence: list[tuple[float, float, int, bool]], now: float = 0.0) -> float:
    for gap, rtt, inflight, dropped in sequence:
        now += gap
        limit.on_sample(now, rtt, inflight, dropped)
    return now


@settings(deadline=None)
@given(bounds(), st.sampled_from([AIMD, Gradient]), samples)
def test_the_limit_always_stays_between_min_and_max(limits, cls, sequence):
    initial, min_limit, max_limit = limits
    algorithm = cls(initial=initial, min_limit=min_limit, max_limit=max_limit)
    now = 0.0
    for gap, rtt, inflight, dropped in sequence:
        now += gap
        returned = algorithm.on_sample(now, rtt, inflight, dropped)
        assert returned == algorithm.limit
        assert min_limit <= returned <= max_limit


@settings(deadline=None)
@given(
    st.sampled_from([AIMD, Gradient]),
    st.integers(min_value=1, max_value=1000),
    st.floats(min_value=0.05, max_value=0.95),
    st.floats(min_value=0.01, max_value=30),
    st.lists(st.tuples(st.floats(0, 1), st.floats(0.001, 60)), max_size=500),
)
def test_a_burst_of_drops_sent_before_the_first_cut_cuts_exactly_once(
    cls, initial, ratio, rtt, echoes
):
    algorithm = cls(initial=initial, backoff_ratio=ratio)
    first_cut = window(algorithm, 100.0, rtt)
    before = algorithm.limit
    algorithm.on_sample(first_cut, rtt, before, True)
    for offset, age in echoes:
        # Arrives within a round trip of the first cut, sent `age` seconds before it.
        arrival = first_cut + offset * rtt
        algorithm.on_sample(arrival, arrival - first_cut + age, before, True)
    assert algorithm.limit == cut(before, ratio)


@settings(deadline=None)
@given(
    st.floats(min_value=0.001, max_value=60),
    st.floats(min_value=0, max_value=1e6),
    st.floats(min_value=0.5, max_value=5),
)
def test_aimd_climbs_from_1_to_500_within_10_windows_when_never_dropped(rtt, start, increase):
    aimd = AIMD(initial=1, increase=increase)
    now = start
    windows = 0
    while aimd.limit < 500:
        now = window(aimd, now, rtt)
        windows += 1
        assert windows <= 10


@settings(deadline=None)
@given(
    bounds(),
    samples,
    st.lists(
        st.tuples(st.floats(0, 100), st.floats(0, 200), st.floats(0, 0.499)),
        max_size=100,
    ),
)
def test_aimd_does_not_change_while_less_than_half_the_limit_is_in_flight(limits, prefix, unused):
    initial, min_limit, max_limit = limits
    aimd = AIMD(initial=initial, min_limit=min_limit, max_limit=max_limit)
    now = feed(aimd, prefix)
    before = aimd.limit
    for gap, rtt, share in unused:
        now += gap
        assert aimd.on_sample(now, rtt, int(before * share), False) == before


def test_with_a_drop_tolerance_sporadic_failures_do_not_cut_but_a_wall_of_429s_does():
    limit = AIMD(initial=100, max_limit=100, drop_tolerance=0.03)
    now = 0.0
    for i in range(2000):  # one request in a hundred fails, spread out: the service's noise
        now += 0.01
        limit.on_sample(now, 0.3, inflight=100, dropped=i % 100 == 50)
    assert limit.limit == 100
    cuts_at = []
    for _ in range(30):  # then every reply is a 429: congestion, whatever the tolerance
        now += 0.01
        before = limit.limit
        if limit.on_sample(now, 0.3, inflight=100, dropped=True) < before:
            cuts_at.append(now)
    assert limit.limit == 50 and len(cuts_at) == 1  # one episode, one cut, within 30 drops


def test_failures_at_random_below_the_tolerance_never_cut_in_twenty_minutes_at_300_per_second():
    # Random, not evenly spread: bunches of 5 or 6 failures in 100 replies are common, and a
    # short memory of the share took each bunch for congestion (a cut every few seconds).
    rng = random.Random(7)
    limit = AIMD(initial=100, max_limit=100, drop_tolerance=0.03)
    for i in range(360_000):
        limit.on_sample(i / 300, 0.25, inflight=100, dropped=rng.random() < 0.01)
    assert limit.limit == 100


def test_a_wall_of_429s_from_the_start_cuts_after_about_twenty_drops():
    limit = AIMD(initial=100, max_limit=100, drop_tolerance=0.03)
    drops = 0
    while limit.limit == 100:
        drops += 1
        limit.on_sample(drops * 0.01, 0.3, inflight=100, dropped=True)
    assert drops == 21 and limit.limit == 50


def test_a_refusal_naming_a_concurrency_cap_cuts_at_once_whatever_the_tolerance():
    limit = AIMD(initial=100, max_limit=100, drop_tolerance=0.03)
    for i in range(100):  # a history of successes: the share of drops is nil
        limit.on_sample(i * 0.01, 0.3, inflight=100, dropped=False)
    assert limit.on_crowd(1.0, 0.002, inflight=100) == 50  # the first one cuts
    assert limit.ssthresh == 50
    # Its echoes within the round trip are one episode, as any drop's are; the next
    # crowd refusal a round trip on is another.
    assert limit.on_crowd(1.01, 0.002, inflight=51) == 50
    assert limit.on_crowd(1.35, 0.002, inflight=51) == 25


def test_a_crowd_refusal_leaves_the_limit_under_what_was_in_flight_within_its_episode():
    # The refusals come back at once, each freeing its slot: a cut that leaves the limit
    # above what was in flight sends into the cap again and again within one episode.
    limit = AIMD(initial=100, max_limit=100, drop_tolerance=0.03)
    assert limit.on_crowd(1.0, 0.002, inflight=40) == 39  # half of 100 is 50: too many
    assert limit.ssthresh == 39
    # an echo within the episode, with one fewer in flight: under that too
    assert limit.on_crowd(1.0, 0.002, inflight=39) == 38
    # never under the least limit
    assert limit.on_crowd(1.0, 0.002, inflight=1) == 1


def test_a_crowd_refusal_is_a_reply_so_no_quiet_spell_follows_it():
    limit = AIMD(initial=40, max_limit=100, drop_tolerance=0.03)
    limit.on_sample(0.3, 0.3, inflight=40, dropped=False)
    limit.on_crowd(25.0, 0.01, inflight=40)
    assert (limit.limit, limit.ssthresh) == (20, 20)
    # Sent 24.7 s after the last reply: no restart (idle_reset is 30 s), the threshold holds.
    limit.on_sample(50.0, 0.3, inflight=20, dropped=False)
    assert limit.ssthresh == 20


def test_without_a_drop_tolerance_every_episode_cuts_as_before():
    limit = AIMD(initial=100, max_limit=100)
    assert limit.on_sample(1.0, 0.3, inflight=100, dropped=True) == 50


def test_a_drop_tolerance_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="drop_tolerance"):
        AIMD(drop_tolerance=1.0)


# -- AIMD's latency brake -----------------------------------------------------------------


def run_windows(limit: AIMD, now: float, rtts: list[float], inflight: int) -> tuple[float, int]:
    """Feed one used success per round trip, a millisecond apart; the time and last limit."""
    answer = limit.limit
    for rtt in rtts:
        now += 0.001
        answer = limit.on_sample(now, rtt, inflight, False)
    return now, answer


def test_aimd_stops_growing_when_windows_of_replies_slow_down_and_comes_down_past_that():
    limit = AIMD(initial=100, max_limit=1000, latency_room=0.15)
    limit._ssthresh = 100.0  # congestion avoidance: one more per window of 100
    # The first window holds the first replies back of all sent at once, the shortest:
    # it is not read (against 0.20 s, the next window would be 50 % slower: a cut).
    now, answer = run_windows(limit, 0.0, [0.20] * 100, 100)
    assert answer == 101
    now, answer = run_windows(limit, now, [0.30] * 101, 101)  # the fastest window: 0.30
    assert answer == 102
    # 10 % slower: still within the room, grows.
    now, answer = run_windows(limit, now, [0.33] * 102, 102)
    assert answer == 103
    # 20 % slower: more in flight brings nothing; the limit holds.
    now, answer = run_windows(limit, now, [0.36] * 103 * 3, 103)
    assert answer == 103 and limit.limit == 103
    # 30 % slower (beyond one and a half times the room): a tenth off per window.
    now, answer = run_windows(limit, now, [0.39] * 103, 103)
    assert limit.limit == 92  # 103 * 0.9
    now, answer = run_windows(limit, now, [0.39] * 92, 92)
    assert limit.limit == 83  # 103 * 0.9 * 0.9
    # Back to the fast replies: it grows again.
    now, answer = run_windows(limit, now, [0.30] * 83, 83)
    assert limit.limit == 84


def test_aimd_reads_no_window_of_the_first_replies_nor_of_those_after_a_quiet_spell():
    limit = AIMD(initial=48, max_limit=100, latency_room=0.15, idle_reset=30.0)
    limit._ssthresh = 48.0
    size = max(48, LATENCY_WINDOW_MIN)
    now, _ = run_windows(limit, 0.0, [0.27] * size, 48)  # the survivors of the start
    now, _ = run_windows(limit, now, [0.34] * size * 4, 48)  # 26 % above them: unread
    assert limit.limit > 48  # grew all along: no brake, no tenth off
    # A minute without a reply: slow start again, up to 100, and the first window (100
    # replies) again holds the shortest.
    now, _ = run_windows(limit, now + 60.0, [0.20] * 100, 100)
    assert limit.limit == 100
    now, _ = run_windows(limit, now, [0.34] * 100 * 2, 100)
    assert limit.limit == 100  # read against 0.20 s: 81


def test_aimd_probes_a_lower_load_now_and_then_to_know_what_fast_is():
    # Sitting at 48 all along, its windows (of LATENCY_WINDOW_MIN replies, more than the
    # limit) have only each other to compare with: every 10 s one window runs at three
    # quarters of the limit.
    size = LATENCY_WINDOW_MIN
    limit = AIMD(initial=48, max_limit=48, latency_room=0.15)
    now, answer = 0.0, 48
    while answer == 48:
        now += 0.01
        answer = limit.on_sample(now, 0.6, 48, False)
    assert 10.0 <= now <= 10.0 + size * 0.01  # the first window to end 10 s on
    assert answer == 36 and limit.limit == 48  # probing: the capacity, not the limit
    now, answer = run_windows(limit, now, [0.3] * (size - 1), 36)
    assert answer == 36
    now, answer = run_windows(limit, now, [0.3], 36)  # the probe's window ends
    assert answer == 48
    # The probe's window was fast (a lower load): the windows at 48 are now slow, and the
    # limit comes down until they are not.
    _, answer = run_windows(limit, now, [0.6] * size, 48)
    assert answer == 43 and limit.limit == 43


def test_aimd_refuses_a_latency_room_that_is_not_positive():
    with pytest.raises(ValueError, match="latency_room must be positive or None"):
        AIMD(latency_room=0.0)


def test_aimd_reads_a_rise_of_a_few_milliseconds_as_our_own_loop_not_the_upstream():
    # An upstream that answers in 5 ms, a client busy enough that each reply is handled a
    # few ms later the more it has in flight: 60 % "slower", and none of it the upstream's.
    limit = AIMD(initial=32, max_limit=1000, latency_room=0.15)
    limit._ssthresh = 32.0
    size = max(32, LATENCY_WINDOW_MIN)
    now, _ = run_windows(limit, 0.0, [0.005] * size, 32)  # the first window: not read
    now, _ = run_windows(limit, now, [0.005] * size, 32)
    before = limit.limit
    now, _ = run_windows(limit, now, [0.008] * size * 3, 32)
    assert limit.limit > before  # still grows: no brake, no cut
    # The same shape at an LLM's scale (0.30 s → 0.48 s) is the upstream filling: it cuts.
    slow = AIMD(initial=32, max_limit=1000, latency_room=0.15)
    slow._ssthresh = 32.0
    now, _ = run_windows(slow, 0.0, [0.30] * size, 32)  # the first window: not read
    now, _ = run_windows(slow, now, [0.30] * size, 32)
    before = slow.limit
    now, _ = run_windows(slow, now, [0.48] * size, 32)
    assert slow.limit < before

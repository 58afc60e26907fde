import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncquota.backoff import RetryBudget, backoff_delay, retry_delay

bases = st.floats(min_value=1e-6, max_value=100.0)
attempts = st.integers(min_value=0, max_value=20_000)


@given(
    attempt=attempts,
    base=bases,
    extra=st.floats(min_value=0.0, max_value=1e6),
    seed=st.integers(),
)
def test_a_backoff_delay_stays_within_zero_and_the_capped_exponential(attempt, base, extra, seed):
    cap = base + extra
    delay = backoff_delay(attempt, base=base, cap=cap, rng=random.Random(seed))
    ceiling = cap if attempt > 2000 else min(cap, base * 2.0 ** min(attempt, 1000))
    assert 0.0 <= delay <= ceiling


def test_full_jitter_spreads_over_the_whole_interval_and_doubles_per_attempt():
    rng = random.Random(7)
    draws = [backoff_delay(3, base=0.5, cap=30.0, rng=rng) for _ in range(2000)]
    assert max(draws) < 4.0
    assert min(draws) < 0.1 and max(draws) > 3.9
    assert sum(draws) / len(draws) == pytest.approx(2.0, rel=0.05)


def test_a_huge_attempt_is_capped_without_overflow():
    rng = random.Random(1)
    assert backoff_delay(10_000, base=0.5, cap=30.0, rng=rng) <= 30.0
    assert backoff_delay(10_000, base=1e-300, cap=1e300, rng=rng) <= 1e300


def test_the_same_seed_gives_the_same_delays():
    a = [backoff_delay(n, rng=random.Random(42)) for n in range(5)]
    b = [backoff_delay(n, rng=random.Random(42)) for n in range(5)]
    assert a == b


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempt": -1}, "attempt must be at least 0"),
        ({"attempt": 0, "base": 0.0}, "base must be a finite number greater than 0"),
        ({"attempt": 0, "base": math.nan}, "base must be a finite number"),
        ({"attempt": 0, "base": 2.0, "cap": 1.0}, r"cap \(1.0\) must be at least base \(2.0\)"),
    ],
)
def test_backoff_refuses_nonsense_with_a_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        backoff_delay(**kwargs)


def test_backoff_refuses_a_non_integer_attempt():
    with pytest.raises(TypeError):
        backoff_delay(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        backoff_delay(True)


def test_a_retry_after_within_the_limit_is_honoured_plus_a_jitter_below_base():
    delays = [
        retry_delay(0, retry_after=7.0, max_retry_after=60.0, base=0.5, rng=random.Random(s))
        for s in range(50)
    ]
    assert all(d is not None and 7.0 <= d < 7.5 for d in delays)
    assert len(set(delays)) == 50


def test_a_retry_after_longer_than_the_limit_means_do_not_wait_here():
    assert retry_delay(0, retry_after=120.0, max_retry_after=60.0) is None
    assert retry_delay(0, retry_after=60.0, max_retry_after=60.0, rng=random.Random(0)) >= 60.0


def test_a_retry_after_in_the_past_counts_as_now():
    delay = retry_delay(2, retry_after=-3.0, max_retry_after=60.0, base=0.5, rng=random.Random(3))
    assert delay is not None and 0.0 <= delay < 0.5


def test_without_a_retry_after_it_is_the_backoff_with_the_same_draws():
    got = retry_delay(4, retry_after=None, max_retry_after=60.0, rng=random.Random(9))
    assert got == backoff_delay(4, rng=random.Random(9))


def test_retry_delay_validates_even_when_the_upstream_gave_a_time():
    with pytest.raises(ValueError, match="attempt must be at least 0"):
        retry_delay(-1, retry_after=1.0, max_retry_after=60.0)
    with pytest.raises(ValueError, match="max_retry_after"):
        retry_delay(0, retry_after=1.0, max_retry_after=-1.0)
    with pytest.raises(ValueError, match="retry_after must be a finite number"):
        retry_delay(0, retry_after=math.inf, max_retry_after=60.0)


# RetryBudget ------------------------------------------------------------------------------


def test_a_quiet_client_may_still_retry_up_to_the_floor():
    budget = RetryBudget(ratio=0.1, min_per_second=0.5, window=10.0)
    assert [budget.try_spend(1.0) for _ in range(6)] == [True] * 5 + [False]
    assert budget.available(1.0) == 0.0


def test_retries_are_a_tenth_of_recent_requests_plus_the_floor():
    budget = RetryBudget(ratio=0.1, min_per_second=0.1, window=10.0)
    for _ in range(100):
        budget.record_request(0.0)
    assert budget.available(0.0) == pytest.approx(11.0)
    spent = sum(budget.try_spend(0.5) for _ in range(20))
    assert spent == 11
    stats = budget.statistics(0.5)
    assert (stats.requests, stats.retries, stats.denied) == (100, 11, 9)


def test_counts_leave_the_window_slice_by_slice():
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0)
    for t in range(10):  # two requests in each one-second slice
        budget.record_request(float(t))
        budget.record_request(t + 0.5)
    assert budget.available(9.9) == pytest.approx(10.0)
    # at t=10 the slice [0, 1) has left the window; at t=15 the six slices [0, 6) have
    assert budget.available(10.0) == pytest.approx(9.0)
    assert budget.available(15.0) == pytest.approx(4.0)
    assert budget.available(100.0) == 0.0


def test_spent_retries_are_forgotten_with_their_slice():
    budget = RetryBudget(ratio=0.0, min_per_second=0.2, window=10.0)
    assert [budget.try_spend(0.0) for _ in range(3)] == [True, True, False]
    assert not budget.try_spend(9.9)
    assert budget.try_spend(10.0)


def test_time_running_backwards_stands_still():
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0)
    assert budget.try_spend(50.0)
    assert not budget.try_spend(3.0)
    assert budget.statistics(3.0).retries == 1


def test_the_budget_validates_its_configuration():
    with pytest.raises(ValueError, match="ratio must be a finite number of at least 0"):
        RetryBudget(ratio=-0.1)
    with pytest.raises(ValueError, match="window must be a finite number greater than 0"):
        RetryBudget(window=0.0)
    with pytest.raises(ValueError, match="min_per_second"):
        RetryBudget(min_per_second=math.inf)


def test_the_budget_repr_shows_the_live_counts():
    budget = RetryBudget(ratio=0.1, min_per_second=1.0, window=10.0)
    budget.record_request(0.0)
    budget.try_spend(0.0)
    assert repr(budget) == "<RetryBudget ratio=0.1 floor=10/10s requests=1 retries=1 denied=0>"


events = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=0.5), st.booleans()), max_size=300
)


@given(
    events=events,
    ratio=st.sampled_from([0.0, 0.1, 0.5]),
    min_per_second=st.sampled_from([0.0, 0.2, 1.0]),
)
def test_no_allowed_retry_ever_exceeds_ratio_times_requests_plus_the_floor(
    events, ratio, min_per_second
):
    """Checked against the raw event log, in real time, not against the budget's slices.

    The slices make the budget's window between ``window - width`` and ``window`` long, so
    at each allowed retry: retries in the last ``window - width`` seconds are at most
    ``ratio`` times the requests in the last ``window`` seconds, plus the floor.
    """
    window = 10.0
    width = window / RetryBudget.BUCKETS
    budget = RetryBudget(ratio=ratio, min_per_second=min_per_second, window=window)
    now = 0.0
    requests: list[float] = []
    retries: list[float] = []
    for gap, is_retry in events:
        now += gap
        if not is_retry:
            budget.record_request(now)
            requests.append(now)
        elif budget.try_spend(now):
            retries.append(now)
            recent_retries = sum(1 for t in retries if t > now - window + width + 1e-9)
            recent_requests = sum(1 for t in requests if t > now - window - 1e-9)
            assert recent_retries <= ratio * recent_requests + min_per_second * window + 1e-9


def _policy(**kwargs):
    from asyncquota import RetryBudget, RetryPolicy

    settings = {"max_attempts": 3, "max_retry_after": 60.0, "rng": random.Random(1)}
    settings.update(kwargs)
    budget = settings.pop("budget", RetryBudget(ratio=1.0, min_per_second=10))
    return RetryPolicy(budget=budget, **settings)


def test_a_retry_policy_ends_what_may_not_be_retried_or_has_no_attempt_left():
    policy = _policy()
    common = {"retry_after": None, "held": False, "deadline": None, "now": 0.0}
    assert policy.delay(1, retryable=False, **common) is None
    assert policy.delay(3, retryable=True, **common) is None  # the third of three failed
    assert 0 <= policy.delay(1, retryable=True, **common) < 0.5  # the first backoff


def test_a_held_retry_goes_back_in_line_at_once_and_its_own_wait_is_jittered():
    policy = _policy()
    # Congestion: the cooldown holds it for the Retry-After, so it re-queues now...
    assert policy.delay(1, retryable=True, retry_after=7, held=True, deadline=None, now=0) == 0
    # ...unless the cooldown outlasts its deadline or max_retry_after.
    assert policy.delay(1, retryable=True, retry_after=7, held=True, deadline=6, now=0) is None
    assert policy.delay(1, retryable=True, retry_after=61, held=True, deadline=None, now=0) is None
    # A 500's Retry-After is this request's own wait, plus a jitter below half a second.
    wait = policy.delay(1, retryable=True, retry_after=7, held=False, deadline=None, now=0)
    assert wait is not None and 7 <= wait < 7.5


def test_a_retry_policy_spends_the_budget_last_and_stops_when_it_is_spent():
    from asyncquota import RetryBudget

    budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=10)  # one retry per 10 s
    policy = _policy(budget=budget)
    args = {"retryable": True, "retry_after": None, "held": False, "now": 0.0}
    # A retry its deadline refuses does not spend the budget...
    assert policy.delay(1, deadline=0.0, **args) is None
    assert budget.statistics(0.0).retries == 0
    # ...the first that may go spends its one retry, the next finds none.
    assert policy.delay(1, deadline=None, **args) is not None
    assert policy.delay(1, deadline=None, **args) is None
    assert budget.statistics(0.0).denied == 1

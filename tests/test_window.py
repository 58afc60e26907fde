import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncquota.window import SlidingCount


def test_events_leave_the_window_a_whole_slice_at_a_time():
    count = SlidingCount(window=10.0, slices=10)
    for t in range(10):
        count.add(float(t))
        count.add(t + 0.5)
    assert count.total(9.9) == 20
    assert count.total(10.0) == 18  # the slice [0, 1) has left
    assert count.total(15.0) == 8
    assert count.rate(15.0) == pytest.approx(0.8)
    assert count.total(100.0) == 0


def test_the_first_event_after_a_long_silence_is_counted():
    count = SlidingCount(window=1.0)
    count.add(0.0)
    count.add(50.0, 3)
    assert count.total(50.0) == 3
    assert count.counted == 3


def test_time_running_backwards_stands_still():
    count = SlidingCount(window=10.0)
    count.add(50.0)
    count.add(3.0)
    assert count.total(50.0) == 2


@pytest.mark.parametrize(
    "kwargs", [{"window": 0}, {"window": float("nan")}, {"window": 1, "slices": 0}]
)
def test_nonsense_configuration_is_refused(kwargs):
    with pytest.raises(ValueError):
        SlidingCount(**kwargs)


@given(st.lists(st.floats(0, 100), max_size=60), st.floats(0, 120))
def test_the_total_is_the_events_of_the_window_give_or_take_one_slice(times, later):
    count = SlidingCount(window=10.0, slices=10)
    times = sorted(times)
    for t in times:
        count.add(t)
    now = max([later, *times])
    total = count.total(now)
    within = sum(1 for t in times if now - 9.0 < t <= now)  # surely still counted
    at_most = sum(1 for t in times if now - 11.0 < t <= now)  # at most one slice late
    assert within <= total <= at_most

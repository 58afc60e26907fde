"""The concurrency limiter, in virtual time: every timestamp below is exact."""

import asyncio
import random

import pytest

from asyncquota import QuotaError
from asyncquota.limiter import ConcurrencyLimiter, LimiterStatistics, Permit, WouldBlock
from asyncquota.limits import AIMD, Fixed

# Nothing here waits on I/O, so an idle loop is a deadlock (a lost permit, a stranded
# waiter): fail within half a second of real time instead of hanging.
pytestmark = pytest.mark.looptime(idle_step=0.05, idle_timeout=0.5)


class RecordingLimit:
    """A fake Limit that keeps every sample and answers with a scripted capacity."""

    def __init__(self, limit: int = 2) -> None:
        self.next_limit = limit
        self.samples: list[tuple[float, float, int, bool]] = []

    @property
    def limit(self) -> int:
        return self.next_limit

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> int:
        self.samples.append((now, rtt, inflight, dropped))
        return self.next_limit


async def waiting_task(limiter: ConcurrencyLimiter) -> asyncio.Task[Permit]:
    """Start an acquire() and let it reach its place in the queue."""
    task = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    return task


async def test_an_integer_limit_means_a_fixed_one_and_the_default_is_aimd():
    limiter = ConcurrencyLimiter(3)
    assert isinstance(limiter.limit, Fixed)
    assert limiter.capacity == 3
    default = ConcurrencyLimiter()
    assert isinstance(default.limit, AIMD)
    assert default.capacity == AIMD().limit
    with pytest.raises(ValueError, match="integer of at least 1"):
        ConcurrencyLimiter(0)


async def test_capacity_is_validated_and_growing_it_wakes_waiters_in_order():
    limiter = ConcurrencyLimiter(1)
    first = limiter.acquire_nowait()
    waiters = [await waiting_task(limiter) for _ in range(3)]
    with pytest.raises(WouldBlock, match="1 in flight of 1, 3 waiting"):
        limiter.acquire_nowait()
    with pytest.raises(ValueError, match="The capacity must be an integer of at least 1, not 0"):
        limiter.capacity = 0
    limiter.capacity = 3
    await asyncio.sleep(0)
    assert [task.done() for task in waiters] == [True, True, False]
    assert limiter.inflight == 3
    first.ignore()
    assert (await waiters[2]).acquired_at == 0.0
    for task in waiters:
        task.result().ignore()
    assert limiter.inflight == 0


async def test_acquire_nowait_refuses_with_a_control_flow_signal_when_full():
    limiter = ConcurrencyLimiter(1)
    permit = limiter.acquire_nowait()
    with pytest.raises(WouldBlock, match="1 in flight of 1, 0 waiting") as caught:
        limiter.acquire_nowait()
    assert isinstance(caught.value, RuntimeError)
    assert not isinstance(caught.value, QuotaError)
    permit.ignore()
    limiter.acquire_nowait().ignore()


async def test_waiters_are_served_first_come_first_served():
    limiter = ConcurrencyLimiter(1)
    order: list[int] = []

    async def worker(n: int) -> None:
        async with await limiter.acquire():
            order.append(n)
            await asyncio.sleep(1)

    tasks = [asyncio.create_task(worker(n)) for n in range(6)]
    await asyncio.gather(*tasks)
    assert order == list(range(6))
    assert asyncio.get_running_loop().time() == 6.0


async def test_each_ending_feeds_the_limit_exactly_once_with_rtt_and_inflight_at_release():
    recording = RecordingLimit(limit=3)
    limiter = ConcurrencyLimiter(recording)
    ok, throttled, cancelled = [await limiter.acquire() for _ in range(3)]
    await asyncio.sleep(2.5)
    ok.success()
    await asyncio.sleep(0.5)
    throttled.dropped()
    cancelled.ignore()
    assert recording.samples == [(2.5, 2.5, 3, False), (3.0, 3.0, 2, True)]
    assert (ok.outcome, throttled.outcome, cancelled.outcome) == ("success", "dropped", "ignore")
    stats = limiter.statistics()
    assert (stats.succeeded, stats.dropped, stats.ignored, stats.inflight) == (1, 1, 1, 0)


class CrowdAwareLimit(RecordingLimit):
    def __init__(self) -> None:
        super().__init__(limit=3)
        self.crowds: list[tuple[float, float, int]] = []

    def on_crowd(self, now: float, rtt: float, inflight: int) -> int:
        self.crowds.append((now, rtt, inflight))
        return 1


async def test_a_crowded_ending_is_a_drop_told_to_on_crowd_where_the_limit_has_it():
    aware = CrowdAwareLimit()
    limiter = ConcurrencyLimiter(aware)
    first, second = await limiter.acquire(), await limiter.acquire()
    await asyncio.sleep(0.5)
    first.crowded()
    assert aware.crowds == [(0.5, 0.5, 2)] and aware.samples == []
    assert first.outcome == "dropped" and limiter.capacity == 1
    assert limiter.statistics().dropped == 1
    with pytest.raises(RuntimeError, match=r"crowded\(\) is refused"):
        first.crowded()
    second.ignore()
    # A limit without on_crowd (any Limit of the protocol) gets the drop as on_sample's.
    recording = RecordingLimit(limit=3)
    plain = ConcurrencyLimiter(recording)
    permit = await plain.acquire()
    permit.crowded()
    assert recording.samples == [(0.5, 0.0, 1, True)]
    assert plain.statistics().dropped == 1


async def test_a_second_ending_is_refused_and_records_nothing():
    recording = RecordingLimit()
    limiter = ConcurrencyLimiter(recording)
    permit = await limiter.acquire()
    permit.success()
    with pytest.raises(
        RuntimeError, match=r"already ended with success\(\).*dropped\(\) is refused"
    ):
        permit.dropped()
    with pytest.raises(RuntimeError, match="ends exactly once"):
        permit.ignore()
    assert len(recording.samples) == 1
    assert limiter.inflight == 0
    assert limiter.statistics().succeeded == 1


async def test_a_permit_block_counts_a_normal_exit_as_success_and_an_exception_as_ignore():
    recording = RecordingLimit()
    limiter = ConcurrencyLimiter(recording)
    async with await limiter.acquire() as permit:
        await asyncio.sleep(1)
    assert permit.outcome == "success"
    with pytest.raises(KeyError), limiter.acquire_nowait() as failing:
        raise KeyError("a 400, say")
    assert failing.outcome == "ignore"
    with limiter.acquire_nowait() as throttled:
        throttled.dropped()
    assert throttled.outcome == "dropped"
    assert recording.samples == [(1.0, 1.0, 1, False), (1.0, 0.0, 1, True)]


async def test_aimd_cuts_capacity_on_a_drop_and_admits_nobody_until_inflight_is_below_it():
    limiter = ConcurrencyLimiter(AIMD(initial=4))
    held = [await limiter.acquire() for _ in range(4)]
    waiter = await waiting_task(limiter)
    await asyncio.sleep(1)
    held[0].dropped()
    assert limiter.capacity == 2
    assert limiter.inflight == 3  # the cut revokes nothing in flight
    held[1].ignore()
    await asyncio.sleep(0)
    assert not waiter.done()
    assert limiter.inflight == 2
    held[2].ignore()
    permit = await waiter
    assert permit.acquired_at == 1.0
    assert limiter.inflight == 2
    for p in (held[3], permit):
        p.ignore()


async def test_a_growing_limit_admits_the_waiters_it_makes_room_for():
    limiter = ConcurrencyLimiter(AIMD(initial=1))
    holder = await limiter.acquire()
    waiters = [await waiting_task(limiter) for _ in range(3)]
    await asyncio.sleep(1)
    holder.success()  # slow start: 1 -> 2
    assert limiter.capacity == 2
    await asyncio.sleep(0)
    assert [task.done() for task in waiters] == [True, True, False]
    waiters[2].cancel()
    await asyncio.sleep(0)
    for task in waiters[:2]:
        task.result().ignore()
    assert limiter.statistics() == LimiterStatistics(
        capacity=2, inflight=0, waiting=0, succeeded=1, ignored=2, dropped=0
    )


async def test_a_waiter_cancelled_before_its_turn_is_skipped_without_losing_the_slot():
    limiter = ConcurrencyLimiter(1)
    holder = limiter.acquire_nowait()
    gone, next_in_line = await waiting_task(limiter), await waiting_task(limiter)
    gone.cancel()
    await asyncio.sleep(0)
    assert limiter.statistics().waiting == 1
    holder.ignore()
    (await next_in_line).ignore()
    assert gone.cancelled()
    assert limiter.inflight == 0


async def test_a_newcomer_takes_a_free_slot_while_the_only_waiter_is_still_unwinding():
    limiter = ConcurrencyLimiter(1)
    holder = limiter.acquire_nowait()
    gone = await waiting_task(limiter)
    newcomer = asyncio.create_task(limiter.acquire())  # runs before `gone` unwinds
    gone.cancel()
    holder.ignore()  # the slot frees; `gone` is skipped, so nobody is granted it
    assert limiter.statistics().waiting == 1  # `gone` counts until its task runs
    permit = await newcomer
    assert permit.acquired_at == 0.0
    await asyncio.sleep(0)
    assert limiter.statistics() == LimiterStatistics(
        capacity=1, inflight=1, waiting=0, succeeded=0, ignored=1, dropped=0
    )
    permit.ignore()


async def test_a_waiter_cancelled_right_after_its_grant_passes_the_slot_on():
    limiter = ConcurrencyLimiter(1)
    holder = limiter.acquire_nowait()
    granted, after = await waiting_task(limiter), await waiting_task(limiter)
    holder.ignore()  # the slot is granted to `granted`, which has not run yet
    granted.cancel()
    permit = await after
    assert granted.cancelled()
    assert limiter.inflight == 1
    permit.ignore()
    assert limiter.statistics() == LimiterStatistics(
        capacity=1, inflight=0, waiting=0, succeeded=0, ignored=2, dropped=0
    )


async def test_statistics_and_repr_show_the_live_counts():
    limiter = ConcurrencyLimiter(2)
    assert repr(limiter) == "<ConcurrencyLimiter capacity=2 inflight=0 waiting=0>"
    a, b = limiter.acquire_nowait(), limiter.acquire_nowait()
    waiter = await waiting_task(limiter)
    assert repr(limiter) == "<ConcurrencyLimiter capacity=2 inflight=2 waiting=1>"
    assert repr(a) == "<Permit acquired_at=0.000 held>"
    a.success()
    b.dropped()
    assert repr(a) == "<Permit acquired_at=0.000 success>"
    (await waiter).ignore()
    assert limiter.statistics() == LimiterStatistics(
        capacity=2, inflight=0, waiting=0, succeeded=1, ignored=1, dropped=1
    )
    assert repr(limiter) == "<ConcurrencyLimiter capacity=2 inflight=0 waiting=0>"


@pytest.mark.parametrize("seed", range(5))
async def test_random_cancellations_leak_no_permit_and_every_permit_ends_once(seed):
    rng = random.Random(seed)
    recording = RecordingLimit(limit=5)
    limiter = ConcurrencyLimiter(recording)
    permits: list[Permit] = []
    queued: list[asyncio.Task[None]] = []  # tasks inside acquire(), oldest first

    async def worker() -> None:
        task = asyncio.current_task()
        assert task is not None
        queued.append(task)
        try:
            permit = await limiter.acquire()
        finally:
            queued.remove(task)
        permits.append(permit)
        async with permit:
            await asyncio.sleep(rng.uniform(0, 3))
            if rng.random() < 0.2:
                recording.next_limit = rng.randint(1, 8)
            ending = rng.choice([permit.success, permit.dropped, permit.ignore, None])
            if ending is not None:
                ending()
            if queued and rng.random() < 0.3:
                queued[0].cancel()  # most likely the waiter that was just granted our slot

    tasks = [asyncio.create_task(worker()) for _ in range(300)]

    async def chaos() -> None:
        for _ in range(150):
            await asyncio.sleep(rng.uniform(0, 0.5))
            rng.choice(tasks).cancel()

    await asyncio.gather(chaos(), *tasks, return_exceptions=True)

    stats = limiter.statistics()
    assert stats.inflight == 0
    assert stats.waiting == 0
    assert all(permit.outcome is not None for permit in permits)
    assert stats.succeeded + stats.dropped + stats.ignored == len(permits)
    assert len(recording.samples) == stats.succeeded + stats.dropped
    assert sum(task.cancelled() for task in tasks) > 0
    assert len(permits) > 100


async def test_a_ceiling_caps_the_capacity_whatever_the_algorithm_says():
    limiter = ConcurrencyLimiter(Fixed(50), ceiling=8)
    assert limiter.capacity == 8
    permits = [limiter.acquire_nowait() for _ in range(8)]
    with pytest.raises(WouldBlock):
        limiter.acquire_nowait()
    for permit in permits:
        permit.success()
    assert limiter.capacity == 8 and limiter.inflight == 0
    with pytest.raises(ValueError, match="ceiling"):
        ConcurrencyLimiter(Fixed(5), ceiling=0)


async def test_a_growth_on_stall_is_handed_out_over_its_spread_not_at_once():
    # Twenty long requests in flight, nothing back: the AIMD doubles on a stall. Spread
    # over a second, the twenty new slots go out one every 0.05 s, so a refusal (which
    # comes back at once) can stop the growth after a few sends instead of a burst.
    loop = asyncio.get_running_loop()
    limiter = ConcurrencyLimiter(AIMD(initial=20, max_limit=100))
    held = [limiter.acquire_nowait() for _ in range(20)]
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(70)]
    await asyncio.sleep(0)
    start = loop.time()
    limiter.stalled(start, spread=1.0)
    assert limiter.limit.limit == 40
    granted: list[float] = []
    for task in waiters:
        task.add_done_callback(lambda _: granted.append(round(loop.time() - start, 3)))
    await asyncio.sleep(1.5)
    assert limiter.capacity == 40
    assert granted == pytest.approx([0.05 * n for n in range(20)], abs=0.001)
    # A reply during a spread does not hand out the rest at once.
    limiter.stalled(loop.time(), spread=1.0)  # 40 -> 80 over the next second
    await asyncio.sleep(0.2)
    held.pop().success()  # it may grow the limit; it does not end the spread
    await asyncio.sleep(0)
    assert 48 <= limiter.capacity <= 51
    await asyncio.sleep(1.0)
    assert limiter.capacity == limiter.limit.limit >= 80
    for task in waiters:
        if not task.done():
            task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_a_growth_on_stall_waits_for_someone_to_take_each_slot():
    # The dispatcher, held by a closed cooldown, takes no permit: slots handed out
    # meanwhile would pile up and go out at once when it is let go (on an upstream that
    # punishes sends inside its window, each one at the same instant buys a second). The
    # growth goes on from where it stood, one slot a step, when someone waits again.
    loop = asyncio.get_running_loop()
    limiter = ConcurrencyLimiter(AIMD(initial=20, max_limit=100))
    held = [limiter.acquire_nowait() for _ in range(20)]
    start = loop.time()
    limiter.stalled(start, spread=1.0)  # 20 -> 40, a slot every 0.05 s: nobody waits
    await asyncio.sleep(0.5)
    assert limiter.capacity == 20
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(10)]
    await asyncio.sleep(0)
    resumed = loop.time()
    granted: list[float] = []
    for task in waiters:
        task.add_done_callback(lambda _: granted.append(round(loop.time() - resumed, 3)))
    await asyncio.sleep(1.0)
    assert granted == pytest.approx([0.05 * n for n in range(10)], abs=0.001)
    assert limiter.capacity == 30
    for permit in held:
        permit.ignore()


async def test_a_growth_faster_than_a_slot_a_millisecond_still_goes_out_one_slot_at_a_time():
    # Forty long requests in flight, the limit doubled on a stall spread over 5 ms: forty
    # new slots are more than 5 ms can hand out one at a time. Slots handed out
    # together go out as sends at one instant, and the first one's refusal cannot stop
    # the others (on an upstream that extends its window for each send inside it, each
    # costs a second), so they go one a millisecond: the growth takes 40 ms, not 5.
    loop = asyncio.get_running_loop()
    limiter = ConcurrencyLimiter(AIMD(initial=40, max_limit=100))
    held = [limiter.acquire_nowait() for _ in range(40)]
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(50)]
    await asyncio.sleep(0)
    start = loop.time()
    limiter.stalled(start, spread=0.005)
    assert limiter.limit.limit == 80
    granted: list[float] = []
    for task in waiters:
        task.add_done_callback(lambda _: granted.append(round(loop.time() - start, 4)))
    await asyncio.sleep(0.1)
    assert granted[:40] == pytest.approx([0.001 * n for n in range(40)], abs=1e-4)
    assert limiter.capacity == 80
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    for permit in held:
        permit.ignore()

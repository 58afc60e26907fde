"""The shared waiting room: strict by class, fair by tenant, oldest first, each waiter ends once."""

from __future__ import annotations

import asyncio
import gc
import itertools
import random
import weakref
from collections.abc import AsyncIterator, Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncquota.errors import ClosedError, DeadlineExceededError, QueueFullError
from asyncquota.priority import Priority
from asyncquota.queue import PriorityQueue, Waiter


@pytest.fixture(autouse=True)
async def loop_reports_no_errors() -> AsyncIterator[None]:
    """Fail a test if anything reached the loop's exception handler (e.g. a callback raised)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    yield
    assert errors == []


def live_timers() -> int:
    """Timer handles the loop still holds and will run (cancelled ones linger until purged)."""
    loop = asyncio.get_running_loop()
    return sum(1 for handle in loop._scheduled if not handle.cancelled())  # type: ignore[attr-defined]


def drain(queue: PriorityQueue[str]) -> list[str]:
    """Pop and admit everything, returning the items in the order they came out."""
    order = []
    while queue:
        waiter = queue.pop_nowait()
        assert waiter.admit()
        order.append(waiter.item)
    return order


def assert_books_balance(queue: PriorityQueue[str]) -> None:
    stats = queue.statistics()
    assert stats.depth == len(queue)
    assert sum(count for _, count in stats.depth_by_priority) == len(queue)
    assert stats.pushed == (
        stats.depth
        + stats.admitted
        + stats.shed
        + stats.expired
        + stats.cancelled
        + stats.failed_on_close
    )


# --- order ---------------------------------------------------------------------------------


async def test_a_more_important_class_is_always_served_first_whatever_the_arrival_order():
    queue: PriorityQueue[str] = PriorityQueue()
    queue.push("batch", priority=Priority.BATCH)
    queue.push("interactive", priority="interactive")
    queue.push("rank 15", priority=15)
    queue.push("critical", priority=Priority.CRITICAL)
    queue.push("rank -1", priority=-1)
    queue.push("rank 5", priority=5)

    assert drain(queue) == ["rank -1", "critical", "rank 5", "interactive", "rank 15", "batch"]


async def test_integer_ranks_sit_between_the_named_classes_they_fall_between():
    queue: PriorityQueue[str] = PriorityQueue()
    for rank in (Priority.BATCH, 19, 11, Priority.INTERACTIVE, 9, 1, Priority.CRITICAL):
        queue.push(str(int(rank)), priority=rank)

    assert drain(queue) == ["0", "1", "9", "10", "11", "19", "20"]
    assert queue.statistics().depth_by_priority == ()


async def test_a_tenant_flooding_a_class_cannot_starve_a_light_tenant_of_the_same_class():
    queue: PriorityQueue[str] = PriorityQueue()
    for i in range(10_000):
        queue.push(f"flood-{i}", tenant="flood")
    queue.push("light", tenant="light")

    first_two = [queue.pop_nowait().item, queue.pop_nowait().item]

    assert first_two == ["flood-0", "light"]
    assert len(queue) == 9_999


async def test_tenants_of_a_class_take_turns_one_waiter_each_and_a_newcomer_joins_the_round():
    queue: PriorityQueue[str] = PriorityQueue()
    for i in range(3):
        queue.push(f"a{i}", tenant="a")
    for i in range(2):
        queue.push(f"b{i}", tenant="b")
    assert [queue.pop_nowait().item for _ in range(2)] == ["a0", "b0"]
    queue.push("c0", tenant="c")
    queue.push("none0")  # tenant None is a tenant like any other

    assert drain(queue) == ["a1", "b1", "c0", "none0", "a2"]


async def test_within_a_tenant_the_oldest_goes_first_and_a_retry_keeps_its_original_age():
    loop = asyncio.get_running_loop()
    queue: PriorityQueue[str] = PriorityQueue()
    queue.push("first")  # enqueued at 0
    await asyncio.sleep(5)
    queue.push("second")
    queue.push("third")  # same age as "second": arrival order decides
    queue.push("retry", enqueued_at=1.0)  # first queued at 1, back after a failed attempt

    assert loop.time() == 5
    assert queue.peek().enqueued_at == 0.0  # type: ignore[union-attr]
    assert drain(queue) == ["first", "retry", "second", "third"]


async def test_a_retry_older_than_everyone_in_its_tenant_goes_first_but_not_past_other_tenants():
    queue: PriorityQueue[str] = PriorityQueue()
    await asyncio.sleep(10)
    queue.push("a-new", tenant="a")
    queue.push("b-new", tenant="b")
    queue.push("a-retry", tenant="a", enqueued_at=2.0)

    assert drain(queue) == ["a-retry", "b-new", "a-new"]


# --- deadlines -----------------------------------------------------------------------------


async def test_each_waiter_leaves_at_its_deadline_exactly_and_one_timer_serves_the_queue():
    loop = asyncio.get_running_loop()
    queue: PriorityQueue[str] = PriorityQueue()
    late = queue.push("late", deadline=8.0, tenant="t")
    soon = queue.push("soon", deadline=3.0, priority=Priority.BATCH)
    middle = queue.push("middle", deadline=5.0)
    patient = queue.push("patient")

    assert live_timers() == 1
    assert len(asyncio.all_tasks()) == 1  # no task per waiter either

    with pytest.raises(DeadlineExceededError) as soon_error:
        await soon.future
    assert loop.time() == 3.0
    assert len(queue) == 3
    assert soon_error.value.priority is Priority.BATCH
    assert str(soon_error.value) == (
        "The request waited 3.000 s in the queue and its deadline passed "
        "before it could be admitted."
    )
    assert live_timers() == 1

    with pytest.raises(DeadlineExceededError):
        await middle.future
    assert loop.time() == 5.0

    with pytest.raises(DeadlineExceededError) as late_error:
        await late.future
    assert loop.time() == 8.0
    assert late_error.value.tenant == "t"
    assert live_timers() == 0
    assert queue.statistics().expired == 3
    assert queue.pop_nowait() is patient


async def test_a_waiter_popped_before_its_deadline_is_not_expired_later_and_the_timer_goes():
    loop = asyncio.get_running_loop()
    queue: PriorityQueue[str] = PriorityQueue()
    waiter = queue.push("quick", deadline=10.0)
    await asyncio.sleep(2)

    assert queue.pop_nowait() is waiter
    assert waiter.admit()
    assert live_timers() == 0
    await asyncio.sleep(20)
    assert loop.time() == 22.0
    assert waiter.future.result() is None
    assert queue.statistics().expired == 0


async def test_an_earlier_deadline_re_arms_the_one_timer_instead_of_adding_one():
    loop = asyncio.get_running_loop()
    queue: PriorityQueue[str] = PriorityQueue()
    queue.push("far", deadline=100.0)
    near = queue.push("near", deadline=1.5)

    assert live_timers() == 1
    with pytest.raises(DeadlineExceededError):
        await near.future
    assert loop.time() == 1.5
    assert live_timers() == 1
    assert len(queue) == 1


async def test_waiters_sharing_a_deadline_expire_together_in_arrival_order():
    loop = asyncio.get_running_loop()
    queue: PriorityQueue[str] = PriorityQueue()
    expired: list[str] = []
    waiters = [queue.push(name, deadline=5.0, tenant=name) for name in "abcd"]
    for waiter in waiters:
        waiter.add_done_callback(lambda w: expired.append(w.item))  # type: ignore[attr-defined]
    assert queue.pop_nowait() is waiters[0]
    waiters[0].admit()
    waiters[1].cancel()

    await asyncio.sleep(5)

    assert loop.time() == 5.0
    assert expired == ["a", "b", "c", "d"]  # settled in that order: admitted, cancelled, expired
    assert all(isinstance(w.exception(), DeadlineExceededError) for w in waiters[2:])
    assert live_timers() == 0
    assert len(queue) == 0
    stats = queue.statistics()
    assert (stats.admitted, stats.cancelled, stats.expired) == (1, 1, 2)


async def test_a_waiter_cancelled_in_the_tick_its_deadline_comes_ends_once_as_cancelled():
    loop = asyncio.get_running_loop()
    queue: PriorityQueue[str] = PriorityQueue()
    waiters: list[Waiter[str]] = []
    # Armed before the queue's timer for the same moment, so the cancellation comes first
    # in that tick and the timer finds the waiter gone.
    loop.call_at(6.0, lambda: waiters[0].future.cancel())
    waiters.append(queue.push("racing", deadline=6.0))
    queue.push("other", deadline=9.0)

    await asyncio.sleep(7)

    assert waiters[0].future.cancelled()
    stats = queue.statistics()
    assert (stats.cancelled, stats.expired, stats.depth) == (1, 0, 1)
    assert_books_balance(queue)


async def test_a_waiter_whose_deadline_has_already_passed_is_refused_at_the_door():
    queue: PriorityQueue[str] = PriorityQueue()
    await asyncio.sleep(10)

    with pytest.raises(DeadlineExceededError) as refused:
        queue.push("too late", deadline=10.0, priority=Priority.BATCH, tenant="t")

    assert refused.value.priority is Priority.BATCH
    assert refused.value.tenant == "t"
    assert "before it reached the queue" in str(refused.value)
    assert len(queue) == 0
    assert live_timers() == 0
    stats = queue.statistics()
    assert (stats.pushed, stats.expired) == (1, 1)


async def test_a_head_due_at_the_moment_of_a_pop_expires_instead_of_coming_out():
    loop = asyncio.get_running_loop()
    queue: PriorityQueue[str] = PriorityQueue()
    popped: list[Waiter[str]] = []
    # Armed before the queue's timer for the same moment, so it runs first.
    loop.call_at(4.0, lambda: popped.append(queue.pop_nowait()))
    due = queue.push("due", deadline=4.0)
    fine = queue.push("fine")

    with pytest.raises(DeadlineExceededError):
        await due.future

    assert loop.time() == 4.0
    assert popped == [fine]
    assert queue.statistics().expired == 1


# --- a bounded queue -----------------------------------------------------------------------


async def test_a_full_queue_sheds_batch_before_interactive_and_the_heaviest_tenants_newest():
    queue: PriorityQueue[str] = PriorityQueue(maxsize=4)
    b1 = queue.push("b1", priority=Priority.BATCH, tenant="b")
    a1 = queue.push("a1", priority=Priority.BATCH, tenant="a")
    a2 = queue.push("a2", priority=Priority.BATCH, tenant="a")
    queue.push("c1", priority=Priority.INTERACTIVE, tenant="c")

    queue.push("c2", priority=Priority.INTERACTIVE, tenant="c")

    assert a2.future.done()
    shed = a2.future.exception()
    assert isinstance(shed, QueueFullError)
    assert shed.priority is Priority.BATCH
    assert shed.tenant == "a"
    assert shed.retry_after is None
    assert str(shed) == (
        "The queue is full (4 waiters) and this batch request was its least important waiter "
        "(the newest of the busiest tenant in the least important class), so it was shed."
    )
    assert not a1.future.done()
    assert not b1.future.done()
    assert len(queue) == 4
    assert queue.statistics().depth_by_priority == ((Priority.INTERACTIVE, 2), (Priority.BATCH, 2))


async def test_within_the_least_important_class_a_heavier_tenant_is_shed_before_a_newcomer():
    queue: PriorityQueue[str] = PriorityQueue(maxsize=3)
    queue.push("c1", tenant="c")
    queue.push("c2", tenant="c")
    c3 = queue.push("c3", tenant="c")

    queue.push("e1", tenant="e")

    assert isinstance(c3.future.exception(), QueueFullError)
    assert drain(queue) == ["c1", "e1", "c2"]


async def test_a_newcomer_less_important_than_everyone_is_refused_and_nothing_else_changes():
    queue: PriorityQueue[str] = PriorityQueue(maxsize=2)
    first = queue.push("i1", priority=Priority.INTERACTIVE, tenant="x")
    second = queue.push("i2", priority=Priority.INTERACTIVE, tenant="y")
    before = queue.statistics()

    with pytest.raises(QueueFullError) as refused:
        queue.push("b1", priority=Priority.BATCH, tenant="z")

    assert refused.value.priority is Priority.BATCH
    assert refused.value.tenant == "z"
    assert refused.value.retry_after is None
    assert "would have been its least important waiter" in str(refused.value)
    assert not first.future.done()
    assert not second.future.done()
    after = queue.statistics()
    assert after.depth_by_priority == before.depth_by_priority
    assert (after.pushed, after.shed) == (before.pushed + 1, before.shed + 1)


async def test_a_newcomer_that_would_be_the_newest_of_the_heaviest_tenant_is_refused():
    queue: PriorityQueue[str] = PriorityQueue(maxsize=3)
    queue.push("c1", tenant="c")
    queue.push("c2", tenant="c")
    queue.push("d1", tenant="d")

    with pytest.raises(QueueFullError):
        queue.push("c3", tenant="c")
    assert drain(queue) == ["c1", "d1", "c2"]


async def test_a_newcomer_whose_tenant_would_tie_for_heaviest_is_refused_so_tenants_do_not_churn():
    queue: PriorityQueue[str] = PriorityQueue(maxsize=3)
    c2 = queue.push("c1", tenant="c") and queue.push("c2", tenant="c")
    queue.push("d1", tenant="d")

    # With it, "d" would have 2 like "c": of equals, the one that got there last gives way.
    with pytest.raises(QueueFullError):
        queue.push("d2", tenant="d")
    assert not c2.future.done()


async def test_a_retry_of_the_heaviest_tenant_sheds_its_newer_sibling_instead_of_itself():
    queue: PriorityQueue[str] = PriorityQueue(maxsize=3)
    await asyncio.sleep(10)
    queue.push("c1", tenant="c")
    c2 = queue.push("c2", tenant="c")
    queue.push("d1", tenant="d")

    queue.push("c-retry", tenant="c", enqueued_at=1.0)

    assert isinstance(c2.future.exception(), QueueFullError)
    assert drain(queue) == ["c-retry", "d1", "c1"]


async def test_a_full_queue_whose_victim_already_left_makes_room_without_shedding_anyone():
    queue: PriorityQueue[str] = PriorityQueue(maxsize=2)
    keep = queue.push("keep", priority=Priority.INTERACTIVE)
    gone = queue.push("gone", priority=Priority.BATCH)
    gone.future.cancel()  # it leaves at once, before the loop runs again: that is the room
    assert len(queue) == 1

    queue.push("new", priority=Priority.INTERACTIVE)

    stats = queue.statistics()
    assert (stats.shed, stats.cancelled, stats.depth) == (0, 1, 2)
    assert not keep.future.done()
    await asyncio.sleep(0)
    assert queue.statistics().cancelled == 1


# --- cancellation --------------------------------------------------------------------------


async def test_a_cancelled_future_leaves_the_queue_and_every_count_drops():
    queue: PriorityQueue[str] = PriorityQueue()
    queue.push("a", tenant="t1")
    middle = queue.push("b", tenant="t2", priority=Priority.BATCH)
    queue.push("c", tenant="t1")

    middle.future.cancel()
    await asyncio.sleep(0)

    assert len(queue) == 2
    stats = queue.statistics()
    assert stats.cancelled == 1
    assert stats.tenants == 1
    assert stats.depth_by_priority == ((Priority.INTERACTIVE, 2),)
    assert drain(queue) == ["a", "c"]
    assert_books_balance(queue)


async def test_a_caller_cancelled_while_awaiting_leaves_the_queue():
    queue: PriorityQueue[str] = PriorityQueue()
    waiter = queue.push("call")

    caller = asyncio.create_task(asyncio.wait_for(waiter.future, timeout=2.0))
    with pytest.raises(TimeoutError):
        await caller

    assert asyncio.get_running_loop().time() == 2.0
    assert waiter.future.cancelled()
    assert len(queue) == 0
    assert queue.statistics().cancelled == 1


async def test_a_head_cancelled_a_moment_ago_is_never_popped():
    queue: PriorityQueue[str] = PriorityQueue()
    head = queue.push("head")
    queue.push("next")

    head.future.cancel()  # no loop iteration in between

    assert queue.statistics().cancelled == 1
    assert queue.pop_nowait().item == "next"
    assert len(queue) == 0
    await asyncio.sleep(0)
    assert queue.statistics().cancelled == 1


async def test_cancelling_the_task_that_awaits_a_waiter_takes_it_out_before_the_task_runs():
    queue: PriorityQueue[str] = PriorityQueue()
    waiter = queue.push("call", tenant="t", deadline=30.0)
    queue.push("other")

    async def call() -> None:
        await waiter.future

    caller = asyncio.create_task(call())
    await asyncio.sleep(0)  # the caller is parked on the waiter

    caller.cancel("the user closed the chat")

    # Task.cancel() cancels the future the task awaits, and that is the waiter itself.
    assert waiter.cancelled()
    stats = queue.statistics()
    assert (stats.depth, stats.cancelled, stats.tenants) == (1, 1, 1)
    assert "left" in repr(waiter)
    with pytest.raises(asyncio.CancelledError, match="the user closed the chat"):
        await caller
    assert live_timers() == 0  # its deadline left with it
    assert_books_balance(queue)


async def test_a_waiter_is_its_own_future_and_settling_it_by_hand_counts_as_its_caller_leaving():
    queue: PriorityQueue[str] = PriorityQueue()
    resolved = queue.push("resolved", deadline=10.0)
    failed = queue.push("failed", priority=Priority.BATCH)
    kept = queue.push("kept")

    assert resolved.future is resolved
    assert isinstance(resolved, asyncio.Future)
    resolved.set_result(None)
    failed.set_exception(LookupError("settled elsewhere"))

    assert isinstance(failed.exception(), LookupError)
    stats = queue.statistics()
    assert (stats.depth, stats.cancelled, stats.admitted) == (1, 2, 0)
    assert live_timers() == 0
    assert queue.pop_nowait() is kept
    assert kept.admit()
    assert kept.result() is None
    assert_books_balance(queue)


async def test_a_close_whose_error_factory_cancels_a_later_waiter_ends_each_waiter_once():
    queue: PriorityQueue[str] = PriorityQueue()
    first = queue.push("first")
    second = queue.push("second")

    def error_for(waiter: Waiter[str]) -> BaseException:
        second.cancel()  # say, the shutdown also cancels the callers' tasks
        return ClosedError(f"{waiter.item} was not sent.")

    queue.close(error_for)

    assert isinstance(first.exception(), ClosedError)
    assert second.cancelled()
    stats = queue.statistics()
    assert (stats.failed_on_close, stats.cancelled, stats.depth) == (1, 1, 0)
    assert_books_balance(queue)


async def test_admit_reports_a_caller_who_left_between_pop_and_admission():
    queue: PriorityQueue[str] = PriorityQueue()
    queue.push("x")
    popped = queue.pop_nowait()
    popped.future.cancel()

    assert popped.admit() is False
    with pytest.raises(RuntimeError, match="still queued"):
        queue.push("y").admit()


async def test_dead_entries_do_not_pile_up_behind_a_waiter_that_never_moves():
    queue: PriorityQueue[str] = PriorityQueue()
    queue.push("anchor", tenant="t", deadline=1e9)
    for i in range(5_000):
        queue.push(f"fleeting-{i}", tenant="t", deadline=1e6 + i).future.cancel()
        await asyncio.sleep(0)

    assert len(queue) == 1
    slot = queue._classes[Priority.INTERACTIVE].ring["t"]
    assert slot.size() <= 2 + 32 + 1
    assert len(queue._deadlines) <= 2 + 32 + 1
    assert queue.statistics().cancelled == 5_000


async def test_a_served_request_is_not_kept_alive_by_its_tenants_remaining_queue():
    class Ticket:
        pass

    queue: PriorityQueue[Ticket] = PriorityQueue()
    served = Ticket()
    alive = weakref.ref(served)
    queue.push(served, tenant="t")
    queue.push(Ticket(), tenant="t")

    waiter = queue.pop_nowait()
    waiter.admit()
    del served, waiter
    gc.collect()

    assert alive() is None
    assert len(queue) == 1


async def test_a_served_waiter_is_freed_by_reference_counting_alone_deadline_and_all():
    queue: PriorityQueue[str] = PriorityQueue()
    queue.push("shares the deadline", deadline=50.0, tenant="t")
    queue.push("stays", deadline=60.0, tenant="t")
    gc.disable()  # a collection would hide a cycle or a leftover reference
    try:
        for deadline in (50.0, 40.0):  # one shares a deadline with another waiter, one does not
            waiter = queue.push("served", deadline=deadline, priority=Priority.CRITICAL)
            popped = queue.pop_nowait()
            assert popped is waiter
            waiter.admit()
            alive = weakref.ref(waiter)
            del waiter, popped
            assert alive() is None
    finally:
        gc.enable()
    assert len(queue) == 2


async def test_a_queued_waiter_is_one_object_for_the_garbage_collector_to_track():
    """Full collections walk every tracked object that has lived long, so long waits cost
    one tracked object each: the waiter, which is also its future (no future, callback
    list or heap entry of its own)."""
    queue: PriorityQueue[str] = PriorityQueue()
    loop = asyncio.get_running_loop()
    queue.push("warm-up", deadline=1e6)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(1_000):
        # distinct deadlines for some, shared ones for others; four tenants, two classes
        deadline = loop.time() + 100 + (i if i % 2 else 0)
        queue.push(f"w{i}", tenant=i % 4, priority=i % 3 and Priority.BATCH, deadline=deadline)
    gc.collect()
    added = len(gc.get_objects()) - before

    assert 900 < added < 1_100


# --- popping -------------------------------------------------------------------------------


async def test_pop_waits_for_a_waiter_and_returns_it():
    loop = asyncio.get_running_loop()
    queue: PriorityQueue[str] = PriorityQueue()
    loop.call_at(7.0, lambda: queue.push("late arrival"))

    popped = await queue.pop()

    assert loop.time() == 7.0
    assert popped.item == "late arrival"
    assert popped.admit()


async def test_a_cancelled_pop_loses_no_waiter_even_when_it_was_already_woken():
    queue: PriorityQueue[str] = PriorityQueue()
    first = asyncio.create_task(queue.pop())
    second = asyncio.create_task(queue.pop())
    await asyncio.sleep(0)

    queue.push("only")  # wakes the first popper...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first

    popped = await asyncio.wait_for(second, timeout=1.0)
    assert popped.item == "only"
    assert len(queue._poppers) == 0


async def test_pop_nowait_and_peek_on_an_empty_queue():
    queue: PriorityQueue[str] = PriorityQueue()
    assert queue.peek() is None
    with pytest.raises(asyncio.QueueEmpty):
        queue.pop_nowait()


# --- estimates, close, statistics ----------------------------------------------------------


async def test_ahead_of_counts_more_important_classes_and_the_rounds_before_a_newcomer():
    queue: PriorityQueue[str] = PriorityQueue()
    queue.push("critical", priority=Priority.CRITICAL)
    for i in range(5):
        queue.push(f"heavy{i}", tenant="heavy")
    for i in range(2):
        queue.push(f"light{i}", tenant="light")
    queue.push("batch", priority=Priority.BATCH)

    assert queue.ahead_of(Priority.CRITICAL, "anyone") == 1
    # A new tenant joins the ring at the back: one waiter of each tenant goes first.
    assert queue.ahead_of(Priority.INTERACTIVE, "new") == 1 + 2
    # "light" has 2: its newcomer goes in round 3, after up to 3 of "heavy".
    assert queue.ahead_of(Priority.INTERACTIVE, "light") == 1 + 2 + 3
    assert queue.ahead_of("interactive", "heavy") == 1 + 7
    assert queue.ahead_of(Priority.BATCH, None) == 1 + 7 + 1
    assert queue.ahead_of(99, None) == 9


async def test_ahead_of_a_new_tenant_is_exactly_where_it_lands():
    queue: PriorityQueue[str] = PriorityQueue()
    for tenant, count in (("a", 4), ("b", 1), ("c", 2)):
        for i in range(count):
            queue.push(f"{tenant}{i}", tenant=tenant)
    estimate = queue.ahead_of(Priority.INTERACTIVE, "d")
    queue.push("d0", tenant="d")

    assert drain(queue).index("d0") == estimate == 3


async def test_close_fails_every_waiter_with_the_given_error_and_refuses_later_pushes():
    queue: PriorityQueue[str] = PriorityQueue()
    waiters = [
        queue.push("a", tenant="x", deadline=50.0),
        queue.push("b", priority=Priority.BATCH),
        queue.push("c", enqueued_at=-3.0),
    ]
    queue.push("leaving").future.cancel()  # left before the close

    queue.close(lambda w: ClosedError(f"Shutting down; {w.item} was not sent.", tenant=w.tenant))

    for waiter in waiters:
        error = waiter.future.exception()
        assert isinstance(error, ClosedError)
        assert str(error) == f"Shutting down; {waiter.item} was not sent."
    assert waiters[0].future.exception().tenant == "x"  # type: ignore[union-attr]
    assert len(queue) == 0
    assert live_timers() == 0
    with pytest.raises(ClosedError, match="accepts no more requests"):
        queue.push("d")
    stats = queue.statistics()
    assert (stats.closed, stats.failed_on_close, stats.cancelled, stats.pushed) == (True, 3, 1, 4)
    assert_books_balance(queue)


async def test_close_with_one_exception_and_a_waiting_popper_gets_closed_error():
    queue: PriorityQueue[str] = PriorityQueue()
    popper = asyncio.create_task(queue.pop())
    await asyncio.sleep(1)
    shutdown = ClosedError("The shaper is shutting down.")

    queue.close(shutdown)

    with pytest.raises(ClosedError, match="no more requests will come out"):
        await popper
    assert "closed" in repr(queue)


async def test_repr_and_statistics_tell_the_live_state():
    queue: PriorityQueue[str] = PriorityQueue(maxsize=10)
    queue.push("a", tenant="x")
    queue.push("b", tenant="y", priority=Priority.BATCH)
    queue.push("c", tenant="x", priority=15)

    assert repr(queue) == "<PriorityQueue depth=3/10 [interactive=1, rank 15=1, batch=1] tenants=2>"
    stats = queue.statistics()
    assert stats.depth_by_priority == ((Priority.INTERACTIVE, 1), (15, 1), (Priority.BATCH, 1))
    assert (stats.depth, stats.tenants, stats.maxsize, stats.pushed) == (3, 2, 10, 3)
    assert "interactive tenant='x' enqueued_at=0.000 queued" in repr(queue.peek())


@pytest.mark.parametrize("maxsize", [0, -1, 2.5, True])
def test_maxsize_must_be_a_positive_integer(maxsize: object):
    with pytest.raises(ValueError, match="maxsize must be a positive integer or None"):
        PriorityQueue(maxsize=maxsize)  # type: ignore[arg-type]


# --- everything at once --------------------------------------------------------------------


async def test_random_pushes_pops_cancels_deadlines_and_sheds_end_every_waiter_exactly_once():
    rng = random.Random(20261128)
    loop = asyncio.get_running_loop()
    queue: PriorityQueue[str] = PriorityQueue(maxsize=40)
    pushed: list[Waiter[str]] = []
    popped: list[Waiter[str]] = []
    refused = 0
    ranks = [Priority.CRITICAL, Priority.INTERACTIVE, 15, Priority.BATCH]

    async def popper() -> None:
        while True:
            waiter = await queue.pop()
            popped.append(waiter)
            await asyncio.sleep(rng.choice([0, 0.01, 0.05]))
            waiter.admit()

    poppers = [asyncio.create_task(popper()) for _ in range(2)]
    for step in range(6_000):
        roll = rng.random()
        now = loop.time()
        if roll < 0.55:
            try:
                pushed.append(
                    queue.push(
                        f"w{step}",
                        priority=rng.choice(ranks),
                        tenant=rng.choice(["a", "b", "c", None]),
                        deadline=rng.choice([None, now + rng.uniform(-0.01, 0.5)]),
                        enqueued_at=rng.choice([None, now - rng.uniform(0, 1)]),
                    )
                )
            except (QueueFullError, DeadlineExceededError):
                refused += 1
        elif roll < 0.75 and pushed:
            rng.choice(pushed).future.cancel()
        elif roll < 0.80:
            victim = rng.choice(poppers)
            victim.cancel()
            poppers[poppers.index(victim)] = asyncio.create_task(popper())
        else:
            await asyncio.sleep(rng.choice([0, 0.001, 0.02]))
        if step % 500 == 0:
            await asyncio.sleep(0)
            out = {id(w) for w in popped}
            assert len(queue) == sum(1 for w in pushed if not w.future.done() and id(w) not in out)
            assert_books_balance(queue)

    await asyncio.sleep(5)  # every deadline has passed, and the poppers have emptied the queue
    assert len(queue) == 0
    for task in poppers:
        task.cancel()
    await asyncio.gather(*poppers, return_exceptions=True)
    for waiter in popped:
        waiter.admit()  # a popper cancelled between pop and admit: its admission is still due

    outcomes = {"admitted": 0, "shed": 0, "expired": 0, "cancelled": 0}
    for waiter in pushed:
        assert waiter.future.done()
        if waiter.future.cancelled():
            outcomes["cancelled"] += 1
        elif waiter.future.exception() is None:
            outcomes["admitted"] += 1
        elif isinstance(waiter.future.exception(), QueueFullError):
            outcomes["shed"] += 1
        else:
            assert isinstance(waiter.future.exception(), DeadlineExceededError)
            outcomes["expired"] += 1
    assert len(queue) == 0
    assert live_timers() == 0
    assert len({id(w) for w in popped}) == len(popped)  # nobody came out twice
    stats = queue.statistics()
    assert_books_balance(queue)
    assert stats.pushed == len(pushed) + refused
    assert stats.admitted == len(popped)
    # A waiter cancelled after it was popped counts as admitted by the queue.
    cancelled_after_pop = sum(1 for w in popped if w.future.cancelled())
    assert outcomes["admitted"] + cancelled_after_pop == stats.admitted
    assert outcomes["cancelled"] - cancelled_after_pop == stats.cancelled
    assert outcomes["shed"] + outcomes["expired"] + refused == stats.shed + stats.expired
    assert min(outcomes.values()) > 50  # the mix really exercised every way out


# --- the order as a property ---------------------------------------------------------------

script_steps = st.lists(
    st.tuples(
        st.sampled_from([Priority.CRITICAL, Priority.INTERACTIVE, 12, Priority.BATCH]),
        st.sampled_from(["a", "b", "c", None]),
        st.one_of(st.none(), st.integers(min_value=0, max_value=20)),  # age of a retry
        st.booleans(),  # let a second pass
        st.integers(min_value=0, max_value=3),  # pops after this push
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(script=script_steps)
async def test_every_pop_is_the_strict_class_head_the_ring_front_and_the_tenants_oldest(
    script: list[tuple[int, Hashable | None, int | None, bool, int]],
):
    """Pushes and pops interleaved: each pop is from the most important class present; in
    it, from the tenant that went to the back of the ring longest ago (round robin); of that
    tenant, the oldest by age then arrival."""
    loop = asyncio.get_running_loop()
    queue: PriorityQueue[int] = PriorityQueue()
    live: dict[int, tuple[int, Hashable | None, float, int]] = {}
    ring_turn: dict[tuple[int, Hashable | None], int] = {}
    clock = itertools.count()

    def pop_and_check() -> None:
        key = live[queue.pop_nowait().item]
        rank, tenant = key[0], key[1]
        assert rank == min(k[0] for k in live.values())
        assert key == min((k for k in live.values() if k[:2] == (rank, tenant)), key=_age)
        waiting = {k[:2] for k in live.values() if k[0] == rank}
        assert ring_turn[(rank, tenant)] == min(ring_turn[t] for t in waiting)
        del live[key[3]]
        if any(k[:2] == (rank, tenant) for k in live.values()):
            ring_turn[(rank, tenant)] = next(clock)
        else:
            del ring_turn[(rank, tenant)]

    for n, (rank, tenant, age, pause, pops) in enumerate(script):
        enqueued_at = None if age is None else loop.time() - age
        waiter = queue.push(n, priority=rank, tenant=tenant, enqueued_at=enqueued_at)
        if (rank, tenant) not in ring_turn:
            ring_turn[(rank, tenant)] = next(clock)
        live[n] = (rank, tenant, waiter.enqueued_at, n)
        if pause:
            await asyncio.sleep(1)
        for _ in range(min(pops, len(live))):
            pop_and_check()
    while live:
        pop_and_check()
    assert len(queue) == 0


def _age(key: tuple[int, Hashable | None, float, int]) -> tuple[float, int]:
    return key[2], key[3]


async def test_a_wait_everyone_must_sit_out_fails_at_once_the_waiters_whose_deadline_it_passes():
    queue: PriorityQueue[str] = PriorityQueue()
    soon = queue.push("soon", deadline=3.0)
    also_soon = queue.push("also soon", deadline=3.0)
    later = queue.push("later", deadline=9.0)
    never = queue.push("no deadline")
    failed = queue.fail_due_before(5.0, lambda w: QueueFullError(f"{w.item} cannot wait"))
    assert failed == 2
    for waiter in (soon, also_soon):
        with pytest.raises(QueueFullError, match="cannot wait"):
            await waiter
    assert not later.done() and not never.done()
    assert len(queue) == 2 and queue.statistics().shed == 2
    # the one timer still expires the rest at their own deadline
    await asyncio.sleep(9.0)
    assert isinstance(later.exception(), DeadlineExceededError)
    assert [queue.pop_nowait().item] == ["no deadline"]

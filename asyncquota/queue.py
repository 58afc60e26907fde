"""The shared waiting room: the one place where the order of requests is decided.

Callers ``push`` a waiter and await it; a single dispatcher ``pop``s the head
when the gates open and calls ``Waiter.admit``. Nothing after the queue reorders, so the
order decided here is the order the upstream sees:

1. **strict between classes**: a waiter of a more important class (smaller rank) always
   goes before any waiter of a less important one;
2. **round robin between tenants within a class**: the tenants of a class take turns, one
   waiter each, so a tenant with 10 000 waiters delays another tenant by at most one round;
3. **oldest first within a tenant**: by ``enqueued_at``, then arrival, so a retry that
   re-enters with its original ``enqueued_at`` goes before the newer waiters of its tenant.

The queue also ends waiters itself, each exactly once: at its deadline (one timer for the
whole queue), when the queue is full (the least important waiter is shed), and on
``close``. A caller who gives up cancels the waiter (or its task is cancelled while
awaiting it), and the waiter leaves the queue there and then.

Shape: a sorted list of the ranks present; per class an ordered ring of tenants (the
round robin) and the tenants grouped by how many waiters each has (for the heaviest tenant
to shed from, and for ``ahead_of``); per tenant a list in age order plus a heap for the
few that arrive out of order; the waiters that have a deadline grouped by it, with a heap
of those deadlines behind one timer. A waiter that leaves from the middle is dropped
lazily from the tenant lists, which are rebuilt when dead entries dominate; the counts
themselves are always exact. Push, pop and shed are O(log n) at worst, O(1) for waiters
that arrive in age order.

Garbage collection shapes the cost at depth: a waiter that waits long enough reaches the
oldest generation, and every full collection walks all of them. So a queued waiter is one
tracked object (it is its own future: no separate future, no done-callback entries), and
the queue keeps no reference to a waiter served from the head (a left waiter's deadline
may linger in the heap, as a bare float).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from typing import Any, Generic, NoReturn, TypeVar

from .errors import ClosedError, DeadlineExceededError, QueueFullError
from .priority import Priority, PriorityLike, coerce_priority, describe_priority

__all__ = ["PriorityQueue", "QueueStatistics", "Waiter"]

T = TypeVar("T")

_SLACK = 32
"""Dead entries tolerated beyond the live ones before a container is rebuilt."""


# The base class's own methods, called unbound: the queue settles a waiter that has already
# left through these, past the overrides that take a still-queued waiter out first.
_future_init = asyncio.Future.__init__
_future_set_result = asyncio.Future.set_result
_future_set_exception = asyncio.Future.set_exception


class Waiter(asyncio.Future[None], Generic[T]):
    """One place in the queue: a payload, its rank and age; also the future its caller awaits.

    The waiter is itself an ``asyncio.Future[None]`` (``waiter.future`` is the waiter, for
    callers who prefer to say what they await). It is resolved by ``admit`` (after the
    dispatcher popped it), failed by the queue (shed, deadline, close), or cancelled by
    the caller: ``cancel()``, called directly or by ``Task.cancel()`` on a task awaiting
    the waiter (or by ``asyncio.wait_for``), takes it out of the queue and its counts at
    once. Settling a queued waiter by any other hand (``set_result``, ``set_exception``)
    takes it out too, counted as cancelled: its caller has left.

    Attributes:
        item: the payload (the Shaper's request ticket).
        priority: the integer rank; smaller is more important.
        tenant: whose request it is; ``None`` is a tenant like any other.
        enqueued_at: loop time it first entered the queue (a retry keeps its original one).
        deadline: absolute loop time after which it is of no use, or None.
    """

    __slots__ = (
        "_queue",
        "_seq",
        "_slot",
        "deadline",
        "enqueued_at",
        "item",
        "priority",
        "tenant",
    )

    def __init__(
        self,
        queue: PriorityQueue[T],
        slot: _Tenant[T],
        seq: int,
        item: T,
        priority: int,
        tenant: Hashable | None,
        enqueued_at: float,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        _future_init(self, loop=loop)
        self._queue = queue
        self._slot: _Tenant[T] | None = slot
        self._seq = seq  # arrival number: breaks ties of age
        self.item = item
        self.priority = priority
        self.tenant = tenant
        self.enqueued_at = enqueued_at
        self.deadline = deadline

    @property
    def future(self) -> asyncio.Future[None]:
        """What the caller awaits: the waiter itself; resolves to None when admitted."""
        return self

    @property
    def admitted(self) -> bool:
        """Whether ``admit`` let the caller go on (and it has not left since)."""
        return self.done() and not self.cancelled() and self.exception() is None

    def admit(self) -> bool:
        """Let the caller go on; False if the caller already left (it was cancelled).

        Raises:
            RuntimeError: the waiter is still queued (admit only what ``pop`` returned).
        """
        if self._slot is not None:
            raise RuntimeError("Only a popped waiter can be admitted; this one is still queued.")
        if self.done():
            return False
        _future_set_result(self, None)
        return True

    def cancel(self, msg: Any | None = None) -> bool:
        """Cancel the wait: a queued waiter leaves the queue at once (see ``Future.cancel``)."""
        if self._slot is not None:
            self._queue._forget_cancelled(self)
        return super().cancel(msg)

    def set_result(self, result: None, /) -> None:
        """Resolve the future (``admit`` is the way); a queued waiter leaves the queue first."""
        if self._slot is not None:
            self._queue._forget_cancelled(self)
        _future_set_result(self, result)

    def set_exception(self, exception: type | BaseException, /) -> None:
        """Fail the future; a queued waiter leaves the queue first."""
        if self._slot is not None:
            self._queue._forget_cancelled(self)
        _future_set_exception(self, exception)

    def __repr__(self) -> str:
        state = "queued" if self._slot is not None else "left"
        deadline = "" if self.deadline is None else f" deadline={self.deadline:.3f}"
        return (
            f"<Waiter {_class_name(self.priority)} tenant={self.tenant!r} "
            f"enqueued_at={self.enqueued_at:.3f}{deadline} {state}>"
        )


_Late = tuple[float, int, Waiter[T]]
"""A heap entry for a waiter that arrived out of age order: ``(enqueued_at, seq, waiter)``."""


class _Tenant(Generic[T]):
    """One tenant's waiters within one class, oldest first.

    Nearly every waiter arrives younger than all its tenant's others (``enqueued_at`` is
    now), so those sit in a list in age order, read from a moving head: O(1) at both
    ends, and a few dozen bytes for a tenant with one waiter (a deque costs 760). Only a
    waiter that arrives older than the youngest (a retry with its original age) goes to a
    heap, and in a bounded queue to a max-heap as well, to find the newest to shed.
    """

    __slots__ = ("cls", "head", "in_order", "key", "late", "late_newest", "live")

    def __init__(self, cls: _Class[T], key: Hashable | None) -> None:
        self.cls = cls
        self.key = key
        self.live = 0
        # Slots before ``head`` are spent and cleared, so a served request is not kept alive.
        self.in_order: list[Waiter[T] | None] = []
        self.head = 0
        self.late: list[_Late[T]] | None = None
        self.late_newest: list[_Late[T]] | None = None  # keys negated

    def add(self, waiter: Waiter[T], bounded: bool) -> None:
        in_order = self.in_order
        youngest = in_order[-1] if len(in_order) > self.head else None
        # Arrival numbers only grow, so an equal age is younger too.
        if youngest is None or waiter.enqueued_at >= youngest.enqueued_at:
            in_order.append(waiter)
            return
        if self.late is None:
            self.late = []
        heappush(self.late, (waiter.enqueued_at, waiter._seq, waiter))
        if bounded:
            if self.late_newest is None:
                self.late_newest = []
            heappush(self.late_newest, (-waiter.enqueued_at, -waiter._seq, waiter))

    def first(self) -> Waiter[T]:
        """The oldest waiter still queued (dead entries at the fronts are dropped)."""
        oldest = self._front()
        late = self.late
        while late and late[0][2]._slot is None:
            heappop(late)
        if late and (oldest is None or _older(late[0][2], oldest)):
            return late[0][2]
        assert oldest is not None
        return oldest

    def drop_first(self) -> None:
        """Remove the waiter ``first`` just returned."""
        oldest = self._front()
        late = self.late
        if late and (oldest is None or _older(late[0][2], oldest)):
            heappop(late)
            return
        self.in_order[self.head] = None
        self.head += 1
        if self.head >= 16 and self.head * 2 >= len(self.in_order):
            del self.in_order[: self.head]
            self.head = 0

    def newest(self) -> Waiter[T]:
        """The youngest waiter still queued (dead entries at the backs are dropped)."""
        in_order, head = self.in_order, self.head
        youngest = None
        while len(in_order) > head:
            youngest = in_order[-1]
            if youngest is not None and youngest._slot is not None:
                break
            in_order.pop()
            youngest = None
        late_newest = self.late_newest
        while late_newest and late_newest[0][2]._slot is None:
            heappop(late_newest)
        if late_newest and (youngest is None or _older(youngest, late_newest[0][2])):
            return late_newest[0][2]
        assert youngest is not None
        return youngest

    def compact(self) -> None:
        """Drop the entries of waiters that left from the middle."""
        self.in_order = [w for w in self.in_order[self.head :] if w and w._slot is not None]
        self.head = 0
        if self.late:
            self.late = [entry for entry in self.late if entry[2]._slot is not None]
            heapify(self.late)
        if self.late_newest:
            self.late_newest = [e for e in self.late_newest if e[2]._slot is not None]
            heapify(self.late_newest)

    def size(self) -> int:
        """Entries held, live or dead."""
        return (
            len(self.in_order)
            - self.head
            + len(self.late or ())
            + len(self.late_newest or ())
        )

    def waiters(self) -> list[Waiter[T]]:
        """The waiters still queued, oldest first."""
        alive = [w for w in self.in_order[self.head :] if w and w._slot is not None]
        alive += (entry[2] for entry in self.late or () if entry[2]._slot is not None)
        return sorted(alive, key=lambda w: (w.enqueued_at, w._seq))

    def _front(self) -> Waiter[T] | None:
        """The oldest of the in-order waiters still queued, skipping those that left."""
        in_order = self.in_order
        while self.head < len(in_order):
            waiter = in_order[self.head]
            if waiter is not None and waiter._slot is not None:
                return waiter
            in_order[self.head] = None
            self.head += 1
        return None


def _older(a: Waiter[T], b: Waiter[T]) -> bool:
    return (a.enqueued_at, a._seq) < (b.enqueued_at, b._seq)


class _Class(Generic[T]):
    """One priority class: its tenants in round-robin order, and grouped by depth."""

    __slots__ = ("deepest", "depths", "live", "rank", "ring", "since")

    def __init__(self, rank: int, since: float) -> None:
        self.rank = rank
        self.since = since  # when the class last became non-empty
        self.live = 0
        self.ring: OrderedDict[Hashable | None, _Tenant[T]] = OrderedDict()
        # depth -> the tenants with that many waiters, in the order they reached it
        self.depths: dict[int, OrderedDict[_Tenant[T], None]] = {}
        self.deepest = 0

    def grew(self, tenant: _Tenant[T]) -> None:
        """Move a tenant whose count just went up by one to its new depth."""
        depth = tenant.live
        depths = self.depths
        if depth > 1:
            below = depths[depth - 1]
            del below[tenant]
            if not below:
                del depths[depth - 1]
        bucket = depths.get(depth)
        if bucket is None:
            depths[depth] = OrderedDict(((tenant, None),))
        else:
            bucket[tenant] = None
        if depth > self.deepest:
            self.deepest = depth

    def shrank(self, tenant: _Tenant[T]) -> None:
        """Move a tenant whose count just went down by one to its new depth."""
        depth = tenant.live
        depths = self.depths
        above = depths[depth + 1]
        del above[tenant]
        if not above:
            del depths[depth + 1]
            if self.deepest == depth + 1:
                self.deepest = depth
        if depth:
            bucket = depths.get(depth)
            if bucket is None:
                depths[depth] = OrderedDict(((tenant, None),))
            else:
                bucket[tenant] = None

    def heaviest(self) -> _Tenant[T]:
        """The tenant with the most waiters; of equals, the one that got there last."""
        return next(reversed(self.depths[self.deepest]))


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    """A snapshot of a queue.

    Every push that passes validation is counted in ``pushed`` and ends in exactly one of
    the other counters or is still waiting, so
    ``pushed == depth + admitted + shed + expired + cancelled + failed_on_close``.
    A newcomer refused at the door counts as shed (full) or expired (deadline passed).

    Attributes:
        depth: live waiters.
        depth_by_priority: ``(priority, count)`` pairs, most important first.
        tenants: distinct tenants with at least one waiter.
        maxsize: the bound, or None.
        closed: whether ``close`` was called.
        pushed: waiters that arrived.
        admitted: waiters that left by the head (``pop``), to be admitted.
        shed: waiters shed (or refused) because the queue was full.
        expired: waiters whose deadline passed while queued (or before they arrived).
        cancelled: waiters whose caller left while they were queued.
        failed_on_close: waiters failed by ``close``.
    """

    depth: int
    depth_by_priority: tuple[tuple[Priority | int, int], ...]
    tenants: int
    maxsize: int | None
    closed: bool
    pushed: int
    admitted: int
    shed: int
    expired: int
    cancelled: int
    failed_on_close: int


class PriorityQueue(Generic[T]):
    """The waiting room in front of the gates: strict by class, fair by tenant, oldest first.

    It is not a work queue with many consumers racing for items: one dispatcher pops the
    head and admits it, and the callers wait on their own futures. ``pop`` is safe under
    cancellation for several poppers all the same (a cancelled ``pop`` loses no waiter).

    Args:
        maxsize: how many waiters may wait at once; when a newcomer finds the queue full,
            the least important waiter (maybe the newcomer) is shed. None: unbounded.
        on_expire: makes the exception of a waiter whose ``deadline`` came while it was
            queued (given the waiter and the time); None (or a None from it): a
            ``DeadlineExceededError``. An owner that queues with a leave-by time earlier
            than the caller's deadline (a bound on the wait) says so here.

    Raises:
        ValueError: ``maxsize`` is not a positive integer.
    """

    def __init__(
        self,
        *,
        maxsize: int | None = None,
        on_expire: Callable[[Waiter[T], float], BaseException | None] | None = None,
    ) -> None:
        if maxsize is not None and (
            isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1
        ):
            raise ValueError(f"maxsize must be a positive integer or None, not {maxsize!r}.")
        self._maxsize = maxsize
        self._on_expire = on_expire
        self._closed = False
        self._seq = itertools.count()
        self._ranks: list[int] = []
        self._classes: dict[int, _Class[T]] = {}
        self._tenant_classes: dict[Hashable | None, int] = {}
        self._live = 0
        # deadline -> the queued waiter due then, or those due then in arrival order (a lone
        # waiter is kept bare: a dict per waiter would be a second tracked object each); and
        # a heap of those deadlines (an entry may outlive its group: skipped when reached,
        # rebuilt when stale ones dominate)
        self._due: dict[float, Waiter[T] | dict[Waiter[T], None]] = {}
        self._deadlines: list[float] = []
        self._timer: asyncio.TimerHandle | None = None
        # When it was set for: uvloop hands back a plain Handle, without ``when()``, for a
        # time already past.
        self._timer_at = math.inf
        self._poppers: deque[asyncio.Future[None]] = deque()
        self._pushed = 0
        self._admitted = 0
        self._shed = 0
        self._expired = 0
        self._cancelled = 0
        self._failed_on_close = 0

    @property
    def maxsize(self) -> int | None:
        """How many waiters may wait at once (None: unbounded)."""
        return self._maxsize

    def push(
        self,
        item: T,
        *,
        priority: PriorityLike = Priority.INTERACTIVE,
        tenant: Hashable | None = None,
        deadline: float | None = None,
        enqueued_at: float | None = None,
    ) -> Waiter[T]:
        """Queue a waiter for ``item`` and return it; its caller awaits it (``waiter.future``).

        Args:
            item: the payload handed back by ``pop``.
            priority: the class (enum, name or integer rank; smaller is more important).
            tenant: whose request it is, for fairness within the class.
            deadline: absolute loop time at which the waiter leaves with
                ``DeadlineExceededError`` if it is still queued.
            enqueued_at: loop time it first entered the queue; a retry passes its
                original one to keep its age. Defaults to now.

        Raises:
            ClosedError: the queue is closed.
            DeadlineExceededError: ``deadline`` has already passed.
            QueueFullError: the queue is full and the newcomer is its least important waiter.
            ValueError, TypeError: ``priority`` is not a priority.
        """
        rank = coerce_priority(priority)
        if self._closed:
            raise ClosedError(
                "The queue is closed and accepts no more requests.", priority=rank, tenant=tenant
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        if enqueued_at is None:
            enqueued_at = now
        self._pushed += 1
        if deadline is not None and deadline <= now:
            self._expired += 1
            raise DeadlineExceededError(
                f"The request's deadline had passed {now - deadline:.3f} s before it reached "
                "the queue, so it was not queued.",
                priority=rank,
                tenant=tenant,
            )
        if self._maxsize is not None and self._live >= self._maxsize:
            self._make_room(rank, tenant, enqueued_at)

        cls = self._classes.get(rank)
        if cls is None:
            cls = self._classes[rank] = _Class(rank, now)
            bisect.insort(self._ranks, rank)
        slot = cls.ring.get(tenant)
        if slot is None:
            slot = cls.ring[tenant] = _Tenant(cls, tenant)
            self._tenant_classes[tenant] = self._tenant_classes.get(tenant, 0) + 1
        waiter = Waiter(
            self, slot, next(self._seq), item, rank, tenant, enqueued_at, deadline, loop
        )
        slot.add(waiter, self._maxsize is not None)
        slot.live += 1
        cls.live += 1
        self._live += 1
        cls.grew(slot)
        if deadline is not None:
            group = self._due.get(deadline)
            if group is None:
                self._due[deadline] = waiter
                heappush(self._deadlines, deadline)
                timer = self._timer
                if timer is None or deadline < self._timer_at:
                    if timer is not None:
                        timer.cancel()
                    self._timer = loop.call_at(deadline, self._expire_due)
                    self._timer_at = deadline
            elif isinstance(group, Waiter):
                self._due[deadline] = {group: None, waiter: None}
            else:
                group[waiter] = None
        if self._poppers:
            self._wake_popper()
        return waiter

    async def pop(self) -> Waiter[T]:
        """Wait until there is a head, then remove and return it.

        Raises:
            ClosedError: the queue is closed (and therefore empty).
        """
        while True:
            waiter = self._head()
            if waiter is not None:
                return self._take(waiter)
            if self._closed:
                raise ClosedError("The queue is closed; no more requests will come out of it.")
            popper: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._poppers.append(popper)
            try:
                await popper
            except BaseException:
                with contextlib.suppress(ValueError):
                    self._poppers.remove(popper)
                # A wake-up this popper received but will not use goes to the next one.
                if popper.done() and not popper.cancelled() and self._live:
                    self._wake_popper()
                raise

    def pop_nowait(self) -> Waiter[T]:
        """Remove and return the head at once.

        Raises:
            asyncio.QueueEmpty: nobody is waiting.
        """
        waiter = self._head()
        if waiter is None:
            raise asyncio.QueueEmpty
        return self._take(waiter)

    def peek(self) -> Waiter[T] | None:
        """The head, the waiter ``pop_nowait`` would return, without removing it."""
        return self._head()

    def ahead_of(self, priority: PriorityLike, tenant: Hashable | None) -> int:
        """Estimate how many waiters would be served before a newcomer of this class and tenant.

        The estimate counts every waiter of a more important class, plus, within the class,
        the round robin: a tenant with ``d`` waiters is served its newcomer in round
        ``d + 1``, by which time every tenant ``u`` of the class has been served
        ``min(d_u, d + 1)`` waiters. For a tenant new to the class that is exact (it joins
        the ring at the back); for a tenant already there it may be one round high, since
        tenants behind it in the ring get only ``d`` turns. Arrivals and departures after
        the call are not foreseen. Divide by the service rate for the expected wait.

        Cost: O(classes + distinct tenant depths in the class).
        """
        rank = coerce_priority(priority)
        ahead = 0
        for other in self._ranks:
            if other >= rank:
                break
            ahead += self._classes[other].live
        cls = self._classes.get(rank)
        if cls is None:
            return ahead
        slot = cls.ring.get(tenant)
        turns = (slot.live if slot is not None else 0) + 1
        if turns >= cls.deepest:
            return ahead + cls.live
        return ahead + sum(len(group) * min(depth, turns) for depth, group in cls.depths.items())

    def close(self, exc: BaseException | Callable[[Waiter[T]], BaseException]) -> None:
        """Fail every waiter still queued and refuse later pushes (shutdown).

        Args:
            exc: the exception every waiter fails with, or a function that makes one per
                waiter (better: callers then do not share one traceback). Poppers waiting
                on the empty queue get ``ClosedError``.
        """
        self._closed = True
        waiters = [
            waiter
            for rank in self._ranks
            for slot in self._classes[rank].ring.values()
            for waiter in slot.waiters()
        ]
        for waiter in waiters:
            # A factory that cancels a waiter still to come takes it out of the queue.
            if waiter._slot is not None:
                self._fail(waiter, exc if isinstance(exc, BaseException) else exc(waiter))
                self._failed_on_close += 1
        while self._poppers:
            self._wake_popper()

    def fail_from(self, priority: PriorityLike, exc: Callable[[Waiter[T]], BaseException]) -> int:
        """Fail at once every waiter of class ``priority`` or less important; say how many.

        For shedding a whole class (an operator's or an alert's decision). They count as
        shed. O(k log n) for k waiters failed.
        """
        rank = coerce_priority(priority)
        waiters = [
            waiter
            for other in self._ranks
            if other >= rank
            for slot in self._classes[other].ring.values()
            for waiter in slot.waiters()
        ]
        failed = 0
        for waiter in waiters:
            if waiter._slot is not None:  # a factory may have cancelled one still to come
                self._shed += 1
                self._fail(waiter, exc(waiter))
                failed += 1
        return failed

    def nonempty_since(self, priority: PriorityLike) -> float | None:
        """Loop time since which class ``priority`` has had waiters; None while it has none.

        A class that has not drained for a while holds a standing queue: latency with no
        throughput to show for it (CoDel's "bad queue").
        """
        cls = self._classes.get(coerce_priority(priority))
        return None if cls is None else cls.since

    def depths(self) -> list[tuple[int, int]]:
        """``(rank, waiters)`` for each class with waiters, most important first."""
        return [(rank, self._classes[rank].live) for rank in self._ranks]

    def shed_newest(
        self, priority: PriorityLike, count: int, exc: Callable[[Waiter[T]], BaseException]
    ) -> int:
        """Fail the ``count`` newest waiters of class ``priority``; say how many.

        The newest of the tenant with the most waiters goes first, as when the queue is
        full, so a flooding tenant loses its excess before anyone else loses theirs. They
        count as shed. For an owner that finds more queued than can be served in time.
        """
        rank = coerce_priority(priority)
        failed = 0
        while failed < count:
            cls = self._classes.get(rank)
            if cls is None:
                break
            victim = cls.heaviest().newest()
            self._shed += 1
            self._fail(victim, exc(victim))
            failed += 1
        return failed

    def fail_due_before(self, t: float, exc: Callable[[Waiter[T]], BaseException]) -> int:
        """Fail at once every waiter whose deadline comes before ``t``; say how many.

        For a wait that everyone must sit out (the upstream's Retry-After): a waiter whose
        deadline falls inside it cannot be served, and is better told now than at its
        deadline. They count as shed. O(k log n) for k waiters failed.

        Args:
            t: loop time; waiters with a deadline strictly before it are failed.
            exc: makes each waiter's exception.
        """
        failed = 0
        while self._deadlines:
            deadline = self._deadlines[0]
            group = self._due.get(deadline)
            if group is not None and deadline >= t:
                break
            heappop(self._deadlines)
            if group is None:
                continue
            for waiter in [group] if isinstance(group, Waiter) else list(group):
                self._shed += 1
                self._fail(waiter, exc(waiter))
                failed += 1
        return failed

    def statistics(self) -> QueueStatistics:
        """A snapshot of the live counts and of how waiters have left."""
        return QueueStatistics(
            depth=self._live,
            depth_by_priority=tuple(
                (describe_priority(rank), self._classes[rank].live) for rank in self._ranks
            ),
            tenants=len(self._tenant_classes),
            maxsize=self._maxsize,
            closed=self._closed,
            pushed=self._pushed,
            admitted=self._admitted,
            shed=self._shed,
            expired=self._expired,
            cancelled=self._cancelled,
            failed_on_close=self._failed_on_close,
        )

    def __len__(self) -> int:
        return self._live

    def __repr__(self) -> str:
        by_class = ", ".join(
            f"{_class_name(rank)}={self._classes[rank].live}" for rank in self._ranks
        )
        bound = "" if self._maxsize is None else f"/{self._maxsize}"
        closed = " closed" if self._closed else ""
        return (
            f"<PriorityQueue depth={self._live}{bound} [{by_class}] "
            f"tenants={len(self._tenant_classes)}{closed}>"
        )

    def _head(self) -> Waiter[T] | None:
        """The next waiter to serve, dropping any that already left or are past deadline."""
        while self._ranks:
            cls = self._classes[self._ranks[0]]
            waiter = next(iter(cls.ring.values())).first()
            if waiter.deadline is not None and waiter.deadline <= (
                now := asyncio.get_running_loop().time()
            ):
                # Due in this very tick, before the timer's callback came round.
                self._expire(waiter, now)
            else:
                return waiter
        return None

    def _take(self, waiter: Waiter[T]) -> Waiter[T]:
        """Remove the head (as ``_head`` returned it) and pass its tenant's turn on."""
        slot = waiter._slot
        assert slot is not None
        slot.drop_first()
        self._leave(waiter)
        if slot.live:
            slot.cls.ring.move_to_end(slot.key)
        self._admitted += 1
        return waiter

    def _leave(self, waiter: Waiter[T]) -> None:
        """Take a queued waiter out of every count (its heap entries die lazily)."""
        slot = waiter._slot
        assert slot is not None
        waiter._slot = None
        cls = slot.cls
        slot.live -= 1
        cls.live -= 1
        self._live -= 1
        cls.shrank(slot)
        if not slot.live:
            del cls.ring[slot.key]
            remaining = self._tenant_classes[slot.key] - 1
            if remaining:
                self._tenant_classes[slot.key] = remaining
            else:
                del self._tenant_classes[slot.key]
            if not cls.live:
                del self._classes[cls.rank]
                self._ranks.remove(cls.rank)
        elif slot.size() > 2 * slot.live + _SLACK:
            slot.compact()
        deadline = waiter.deadline
        if deadline is not None:
            group = self._due[deadline]
            if not isinstance(group, Waiter):
                del group[waiter]
            if group is waiter or not group:
                del self._due[deadline]
                if not self._due:
                    self._deadlines.clear()
                    if self._timer is not None:
                        self._timer.cancel()
                        self._timer = None
                elif len(self._deadlines) > 2 * len(self._due) + _SLACK:
                    self._deadlines = list(self._due)
                    heapify(self._deadlines)

    def _fail(self, waiter: Waiter[T], exc: BaseException) -> None:
        self._leave(waiter)
        _future_set_exception(waiter, exc)

    def _forget_cancelled(self, waiter: Waiter[T]) -> None:
        """Take out a queued waiter whose caller left (``Waiter.cancel`` and kin call this)."""
        self._leave(waiter)
        self._cancelled += 1

    def _expire(self, waiter: Waiter[T], now: float) -> None:
        exc = self._on_expire(waiter, now) if self._on_expire is not None else None
        if exc is not None:
            self._shed += 1
            self._fail(waiter, exc)
            return
        self._expired += 1
        self._fail(
            waiter,
            DeadlineExceededError(
                f"The request waited {now - waiter.enqueued_at:.3f} s in the queue and its "
                "deadline passed before it could be admitted.",
                priority=waiter.priority,
                tenant=waiter.tenant,
            ),
        )

    def _expire_due(self) -> None:
        """The one timer: expire every waiter whose deadline has come, re-arm for the next."""
        timer, self._timer = self._timer, None
        loop = asyncio.get_running_loop()
        now = loop.time()
        # The loop runs a timer up to its clock resolution early; the timer's time is the truth.
        due = now if timer is None else max(now, self._timer_at)
        # Re-read each time round: expiring the last waiters may clear or rebuild the heap.
        while self._deadlines:
            deadline = self._deadlines[0]
            group = self._due.get(deadline)
            if group is None:
                heappop(self._deadlines)
            elif deadline > due:
                self._timer = loop.call_at(deadline, self._expire_due)
                self._timer_at = deadline
                return
            else:
                heappop(self._deadlines)
                for waiter in [group] if isinstance(group, Waiter) else list(group):
                    self._expire(waiter, now)

    def _make_room(self, rank: int, tenant: Hashable | None, enqueued_at: float) -> None:
        """Shed the least important waiter for a newcomer, or refuse the newcomer.

        The victim is in the least important class present; within it, the newest waiter
        of the tenant with the most waiters (counting the newcomer when it joins that
        class; of equal tenants, the one that got there last, which is the newcomer's).

        Raises:
            QueueFullError: the newcomer is itself the least important waiter.
        """
        least = self._classes[self._ranks[-1]]
        if rank > least.rank:
            self._refuse(rank, tenant)
        if rank == least.rank:
            own = least.ring.get(tenant)
            if (own.live if own is not None else 0) + 1 >= least.deepest:
                if own is None or enqueued_at >= own.newest().enqueued_at:
                    self._refuse(rank, tenant)
                victim_tenant = own
            else:
                victim_tenant = least.heaviest()
        else:
            victim_tenant = least.heaviest()
        victim = victim_tenant.newest()
        self._shed += 1
        self._fail(
            victim,
            QueueFullError(
                f"The queue is full ({self._maxsize} waiters) and this "
                f"{_class_name(victim.priority)} request was its least important waiter "
                "(the newest of the busiest tenant in the least important class), so it was shed.",
                priority=victim.priority,
                tenant=victim.tenant,
            ),
        )

    def _refuse(self, rank: int, tenant: Hashable | None) -> NoReturn:
        self._shed += 1
        raise QueueFullError(
            f"The queue is full ({self._maxsize} waiters) and this {_class_name(rank)} "
            "request would have been its least important waiter, so it was not queued.",
            priority=rank,
            tenant=tenant,
        )

    def _wake_popper(self) -> None:
        while self._poppers:
            popper = self._poppers.popleft()
            if not popper.done():
                popper.set_result(None)
                return


def _class_name(rank: int) -> str:
    named = describe_priority(rank)
    return named.name.lower() if isinstance(named, Priority) else f"rank {rank}"

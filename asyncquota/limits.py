"""Limit algorithms: how many requests may be in flight, learned from what the upstream says.

A ``Limit`` is pure and synchronous. The limiter feeds it one sample per finished request
(when the reply arrived, how long it took, how many were in flight, whether it was a
congestion signal) and it answers with the new limit. It never waits and never reads a
clock, so it is tested with explicit timestamps and no event loop.

Three algorithms:

- ``AIMD`` listens to congestion signals (429, 503/529, timeouts): the primary signal of an
  LLM API. It slow-starts, cuts once per congestion episode, then grows additively.
- ``Gradient`` listens to latency, against a protected no-load baseline, and also cuts on
  congestion signals exactly like ``AIMD`` does.
- ``Fixed`` never changes: a plain semaphore.

Both adaptive algorithms share one notion of a *congestion episode*: a drop for a request
that was sent before the last cut reports the overload that cut already answered, and no
two cuts come within one smoothed round trip. A burst of 500 429s from one overload is one
cut, not 500.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

__all__ = ["AIMD", "DEFAULT_RTT", "Fixed", "Gradient", "Limit"]

DEFAULT_RTT = 1.0
"""The round trip (seconds) assumed before any success was measured; it spaces cuts apart."""

RTT_SMOOTHING = 0.125
"""Weight of a new sample in the smoothed round trip (TCP's 1/8: steady, yet tracks drift)."""

MIN_GRADIENT = 0.5
"""The most one latency sample may shrink ``Gradient``'s target: noise must not collapse it."""


class Limit(Protocol):
    """An algorithm that decides how many requests may be in flight.

    ``on_sample`` must return an integer of at least 1; the limiter takes it as its capacity.
    Two more methods are optional, called by the limiter when a limit has them:
    ``on_stall(now, inflight)`` (full a while, nothing back: may grow on time) and
    ``on_crowd(now, rtt, inflight)`` (a refusal that names a concurrency cap, instead of
    ``on_sample`` with ``dropped``). ``AIMD`` has both.
    """

    @property
    def limit(self) -> int:
        """The current limit."""
        ...

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> int:
        """Learn from one finished request and return the new limit.

        Args:
            now: when the reply (or the failure) arrived, in event-loop seconds.
            rtt: the request's round trip in seconds; it was sent at ``now - rtt``.
            inflight: how many requests were in flight when it ended, itself included.
            dropped: True for a congestion signal (429, 503/529 overload, timeout).
        """
        ...


DROP_SHARE_MEMORY = 20.0
"""How many drops at exactly the tolerated share the recent share of drops remembers: it
averages over about ``DROP_SHARE_MEMORY / drop_tolerance`` samples (≈ 670 at 3 %).

Drops that come at random are counted in a window, and a count is noisy: a window that
expects 3 of them holds 6 or more one time in twelve. With a memory of 100 samples, 1 %
of random failures passed a 3 % tolerance every few seconds at 300 requests/s, and each
pass was a cut. A window that expects 20 drops at the tolerance and 7 from 1 % of noise
almost never sees 20 (Poisson: under one in ten thousand per window), and a wall of 429s
still crosses it after about 20 drops: within one round trip at any useful limit."""


class _Episodes:
    """Tells a new congestion episode from echoes of one that was already answered.

    The idea is TCP's "one reduction per window of data": the replies to requests sent
    before a cut say nothing about the limit after it. Keeps the smoothed round trip of
    successes too, since that is what a window is.
    """

    __slots__ = ("_drop_share", "_gain", "_last_cut", "_tolerance", "srtt")

    def __init__(self, tolerance: float = 0.0) -> None:
        self._last_cut = -math.inf
        self.srtt: float | None = None
        self._tolerance = tolerance
        self._gain = tolerance / DROP_SHARE_MEMORY
        self._drop_share = 0.0

    def count(self, dropped: bool) -> None:
        """Fold every sample into the recent share of drops (see ``DROP_SHARE_MEMORY``)."""
        self._drop_share += (float(dropped) - self._drop_share) * self._gain

    def _tolerable(self) -> bool:
        """Whether recent drops are a share of the samples small enough to bear."""
        return self._tolerance > 0 and self._drop_share <= self._tolerance

    def observe(self, rtt: float) -> None:
        """Fold a successful request's round trip into the smoothed round trip."""
        self.srtt = rtt if self.srtt is None else self.srtt + RTT_SMOOTHING * (rtt - self.srtt)

    @property
    def last_cut(self) -> float:
        """When the last episode began (-inf: never)."""
        return self._last_cut

    def begins(self, now: float, rtt: float, *, chance: bool = True) -> bool:
        """Whether a drop opens a new episode (then it is recorded as the latest cut).

        ``chance``: the drop may have come at random, and the tolerance bears it; False
        for one that says outright it was ours (a concurrency cap's refusal).
        """
        window = DEFAULT_RTT if self.srtt is None else self.srtt
        if now - rtt < self._last_cut or now - self._last_cut < window:
            return False
        if chance and self._tolerable():
            return False
        self._last_cut = now
        return True


def _check_bounds(initial: int, min_limit: int, max_limit: int) -> None:
    if min_limit < 1:
        raise ValueError(f"min_limit must be at least 1, not {min_limit!r}.")
    if max_limit < min_limit:
        raise ValueError(
            f"max_limit ({max_limit!r}) must not be smaller than min_limit ({min_limit!r})."
        )
    if not min_limit <= initial <= max_limit:
        raise ValueError(
            f"initial ({initial!r}) must lie between min_limit ({min_limit!r}) "
            f"and max_limit ({max_limit!r})."
        )


def _check_backoff(backoff_ratio: float) -> None:
    if not 0 < backoff_ratio < 1:
        raise ValueError(
            f"backoff_ratio must lie strictly between 0 and 1, not {backoff_ratio!r}: "
            "it is the share of the limit kept after a congestion signal."
        )


def _cut(limit: float, backoff_ratio: float, min_limit: int) -> float:
    # Cut the published (integer) limit, the one that was in force when the upstream said no.
    return float(max(min_limit, math.floor(int(limit) * backoff_ratio)))


LATENCY_MEMORY = 30.0
"""Seconds a window's mean round trip counts towards the fastest recent one."""

LATENCY_WINDOW_MIN = 64
"""The fewest replies a window of round trips averages."""

LATENCY_MIN_RISE = 0.02
"""Seconds a window's mean must lie above the fastest for the brake to read it as slower.

A rise smaller than this is our own event loop's, not the upstream's: a busy client
schedules each reply a little later the more it has in flight (a few milliseconds at a
few hundred requests a second), and against an upstream that answers in 5 ms that reads
as 50 % slower. Braking on it holds the limit under the callers' count for nothing but
our own CPU (the overhead benchmark's limit sat at 27 for 32 callers). An LLM upstream
that slows as it fills adds hundreds of milliseconds, far above it."""

LATENCY_PROBE_EVERY = 10.0
"""Seconds between two windows run at three quarters of the limit (see ``_Windows``)."""

LATENCY_PROBE_RTT = 2.0
"""Windows longer than this (seconds) are not probed: a quarter of a long window's
replies held back costs too much."""


class _Windows:
    """Mean round trips per window of replies, and how slow the last is for its kind.

    A single reply's time says little (a long answer takes longer), but the mean of a
    window of them moves with the upstream's load: an upstream that slows down as it
    fills (replies queue behind each other near its concurrency cap) shows it there
    before it refuses anything, and past that point more in flight brings fewer answers
    a second, not more. Each full window's mean is compared with the fastest window of
    the last ``LATENCY_MEMORY`` seconds: more than ``room`` above it, the limit stops
    growing; more than one and a half ``room``, it comes down by a tenth a window.

    A rise under ``LATENCY_MIN_RISE`` seconds is not read at all: at a few milliseconds it
    is our own event loop's scheduling, not the upstream's load.

    The fastest window must have been seen at a lower load to mean anything: a limit
    that sat at one level all along has nothing to compare with. So while windows are
    short (under ``LATENCY_PROBE_RTT``), every ``LATENCY_PROBE_EVERY`` seconds one window
    runs at three quarters of the limit (BBR's ProbeRTT, in miniature).

    The first window after a start (or a quiet spell: ``restart``) is not read. Closed
    by a count of replies, it holds the first to come back of everything sent at once,
    the shortest: in the robustness matrix's short rows (replies of 0.15-0.5 s, 0.325 s
    on average) it read 0.274 s, and against it every ordinary window (0.33-0.34 s)
    was 22 % slower: the limit came down a tenth at a time from 67 to 40 in 8 s with no
    refusal, under what a capacity that doubled needed (row 19: 0.934 of the quota).
    """

    __slots__ = (
        "_count",
        "_fastest",
        "_probe_at",
        "_room",
        "_started",
        "_sum",
        "_survivors",
        "probing",
        "slow",
    )

    def __init__(self, room: float) -> None:
        self._room = room
        self._survivors = True  # the window being filled is the first after a start
        self._count = 0
        self._sum = 0.0
        self._started: float | None = None
        self._probe_at: float | None = None
        self.slow = False
        self.probing = False
        self._fastest: deque[tuple[float, float]] = deque()  # (time, mean), means rising

    def sample(self, now: float, rtt: float, limit: int) -> float:
        """Count one round trip; at a window's end, the factor for the limit (else 1)."""
        if self._started is None:
            self._started = now
            self._probe_at = now + LATENCY_PROBE_EVERY
        self._count += 1
        self._sum += rtt
        if self._count < max(limit, LATENCY_WINDOW_MIN):
            return 1.0
        mean = self._sum / self._count
        span = now - self._started
        self._count, self._sum, self._started = 0, 0.0, now
        if self._survivors:
            self._survivors = False
            return 1.0
        fastest = self._fastest
        while fastest and fastest[-1][1] >= mean:
            fastest.pop()
        fastest.append((now, mean))
        while fastest[0][0] < now - LATENCY_MEMORY:
            fastest.popleft()
        ratio = mean / fastest[0][1] if fastest[0][1] > 0 else 1.0
        if mean - fastest[0][1] < LATENCY_MIN_RISE:
            ratio = 1.0  # within our own loop's noise (see LATENCY_MIN_RISE)
        was_probing, self.probing = self.probing, False
        self.slow = ratio > 1.0 + self._room
        if not was_probing and self._probe_at is not None and now >= self._probe_at:
            self._probe_at = now + LATENCY_PROBE_EVERY
            self.probing = span < LATENCY_PROBE_RTT
        if not was_probing and ratio > 1.0 + 1.5 * self._room:
            return 0.9
        return 1.0

    def restart(self) -> None:
        """Sends resume after a quiet spell: the window being filled is a first one again."""
        self._survivors = True
        self._count, self._sum, self._started = 0, 0.0, None


class AIMD:
    """Additive increase, multiplicative decrease, driven by congestion signals.

    Think of TCP congestion control with a 429 for a lost packet. The limit grows only
    while it is actually used (at least half of it in flight); an idle limit proves
    nothing, so it stays where it is.

    - Slow start: each used success adds 1, so a window of ``limit`` successes doubles the
      limit (the growth is counted in samples, not in time, so it is self-clocked), until
      the limit reaches the slow-start threshold, which is ``max_limit`` at first.
    - A drop that opens a new congestion episode cuts the limit to ``backoff_ratio`` of
      itself and sets the threshold to the cut value; drops for requests sent before that
      cut, or within one smoothed round trip of it, are echoes and are ignored.
    - Above the threshold used successes are counted, and every full window of them
      (``limit`` successes) adds ``increase``.
    - Warm restart: a request sent after ``idle_reset`` seconds without any reply finds
      the threshold lifted back to ``max_limit``. The limit itself is kept; only the
      permission to double returns, because what the last episode taught has gone stale
      (per-minute quotas have refilled, other clients may have left). Measuring from the
      send time, not the reply, keeps a single slow reply at a small limit from looking
      like a quiet spell. Finding out costs at most one more episode, hence one cut.
    - Drop tolerance: with ``drop_tolerance`` > 0, a drop cuts only when drops are more
      than that share of the recent samples (an average over the last
      ``DROP_SHARE_MEMORY / drop_tolerance`` samples or so, long enough that random
      failures below the tolerance do not cross it by chance). A service that fails 1 %
      of requests at random (Anthropic's sporadic 529s) is not congested by us, and
      halving the limit for each such reply would pin it near ``sqrt(2 / 1 %)`` ≈ 14.
      A wall of 429s is far above any sensible tolerance and cuts after about
      ``DROP_SHARE_MEMORY`` drops. A refusal that names a concurrency cap is no chance
      and is not borne: it cuts at once (``on_crowd``).

    - Latency brake: with ``latency_room``, the mean round trip of each window of
      replies is compared with the fastest window of the last ``LATENCY_MEMORY``
      seconds. More than ``latency_room`` slower, the limit stops growing (a stall too);
      more than one and a half times that, it comes down by a tenth a window; now and
      then one window runs at three quarters of the limit to see what fast is (see
      ``_Windows``). An upstream that slows down as it fills, long before its
      concurrency cap refuses anything, answers fewer requests a second past that point:
      the limit sits there instead of climbing to the cap and being halved (a sawtooth
      whose lower half starves the upstream).

    The limit always lies within ``[min_limit, max_limit]``.

    Raises:
        ValueError: bounds out of order, ``backoff_ratio`` outside (0, 1), a
            non-positive ``increase``, ``idle_reset`` or ``latency_room``, or
            ``drop_tolerance`` outside [0, 1).
    """

    __slots__ = (
        "_acked",
        "_backoff_ratio",
        "_episodes",
        "_idle_reset",
        "_increase",
        "_last_reply",
        "_latency",
        "_limit",
        "_max_limit",
        "_min_limit",
        "_ssthresh",
    )

    def __init__(
        self,
        *,
        initial: int = 20,
        min_limit: int = 1,
        max_limit: int = 1000,
        backoff_ratio: float = 0.5,
        increase: float = 1,
        idle_reset: float = 30.0,
        drop_tolerance: float = 0.0,
        latency_room: float | None = None,
    ) -> None:
        _check_bounds(initial, min_limit, max_limit)
        _check_backoff(backoff_ratio)
        if latency_room is not None and not latency_room > 0:
            raise ValueError(
                f"latency_room must be positive or None, not {latency_room!r}: it is how much "
                "slower than the fastest recent window of replies the limit still grows."
            )
        if not increase > 0:
            raise ValueError(f"increase must be positive, not {increase!r}.")
        if not idle_reset > 0:
            raise ValueError(
                f"idle_reset must be a positive number of seconds, not {idle_reset!r}."
            )
        if not 0 <= drop_tolerance < 1:
            raise ValueError(
                f"drop_tolerance must lie in [0, 1), not {drop_tolerance!r}: it is the share "
                "of dropped samples borne without a cut."
            )
        self._min_limit = min_limit
        self._max_limit = max_limit
        self._backoff_ratio = backoff_ratio
        self._increase = increase
        self._idle_reset = idle_reset
        self._limit = float(initial)
        self._ssthresh = float(max_limit)
        self._last_reply: float | None = None
        self._acked = 0
        self._episodes = _Episodes(drop_tolerance)
        self._latency = None if latency_room is None else _Windows(latency_room)

    @property
    def limit(self) -> int:
        """The current limit."""
        return int(self._limit)

    @property
    def ssthresh(self) -> int:
        """The slow-start threshold: below it the limit doubles per window, above it adds."""
        return int(self._ssthresh)

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> int:
        """Learn from one finished request and return the new limit (see ``Limit``)."""
        self._restart_if_idle(now, rtt)
        self._episodes.count(dropped)
        if dropped:
            return self._dropped(now, rtt, chance=True)
        self._episodes.observe(rtt)
        limit = int(self._limit)
        if inflight * 2 < limit:
            return limit
        latency = self._latency
        if latency is not None:
            factor = latency.sample(now, rtt, limit)
            if factor < 1.0:
                self._limit = max(float(self._min_limit), self._limit * factor)
                return int(self._limit)
            if latency.probing:
                return max(self._min_limit, (3 * limit) // 4)
            if latency.slow:
                return limit
        if self._limit < self._ssthresh:
            self._limit = min(self._limit + 1.0, self._ssthresh)
        else:
            self._acked += 1
            if self._acked < limit:
                return limit
            self._acked = 0
            self._limit = min(self._limit + self._increase, float(self._max_limit))
        return int(self._limit)

    def on_crowd(self, now: float, rtt: float, inflight: int) -> int:
        """A refusal that names too many in flight (a concurrency cap's): cut, no tolerance.

        The limiter calls this instead of ``on_sample`` for a ``Permit.crowded()``. The
        drop tolerance bears failures that come at random (a service failing 1 % of its
        requests), and a wall of them crosses it after about ``DROP_SHARE_MEMORY`` drops.
        A 429 saying "Too many concurrent requests" is no chance: it says this many in
        flight is too many, and every send over the cap until the cut is refused too.
        Borne up to the tolerance, some 20 of them came back before the first cut, at the
        start of every night and whenever the limit outgrew the cap: most of the 1-1.8 %
        of 429s of the robustness matrix's short rows (a cap of 48 in flight).

        Whatever the episode, the limit is left under ``inflight`` (ours when it was
        refused, itself included): that many was too many. An episode cuts once, but
        its refusals come back at once, each freeing its slot for the next send: the
        virtual matrix's row 7 (seed 5) cut 71 to 49 with 49 in flight, and the one free
        slot sent 679 requests at one instant, every one refused.

        Returns:
            The new limit.
        """
        self._restart_if_idle(now, rtt)
        self._episodes.count(True)
        self._dropped(now, rtt, chance=False)
        under = max(float(self._min_limit), float(inflight - 1))
        if self._limit > under:
            self._limit = under
            self._ssthresh = min(self._ssthresh, under)
        return int(self._limit)

    def _restart_if_idle(self, now: float, rtt: float) -> None:
        if self._last_reply is not None and now - rtt - self._last_reply >= self._idle_reset:
            self._ssthresh = float(self._max_limit)
            if self._latency is not None:
                self._latency.restart()
        self._last_reply = now

    def _dropped(self, now: float, rtt: float, *, chance: bool) -> int:
        if self._episodes.begins(now, rtt, chance=chance):
            self._limit = _cut(self._limit, self._backoff_ratio, self._min_limit)
            self._ssthresh = self._limit
            self._acked = 0
        return int(self._limit)

    def on_stall(self, now: float, inflight: int) -> int:
        """The limit has been full for a while, and nothing came back: grow on time.

        Successes clock the growth, and a reply that takes 20 s (a long streamed answer)
        clocks it 20 s late: starting at 20, the limit would need minutes to reach the
        hundreds such replies keep in flight. A full limit that nobody refused for a stall
        (the caller's ``STALL`` seconds) is evidence enough to grow as if a window had
        been acknowledged: doubled below the threshold, ``increase`` above it. Not
        within one round trip of a cut (the limit was just found too high).

        Returns:
            The new limit.
        """
        window = DEFAULT_RTT if self._episodes.srtt is None else self._episodes.srtt
        if inflight * 2 < int(self._limit) or now - self._episodes.last_cut < window:
            return int(self._limit)
        if self._latency is not None and self._latency.slow:
            return int(self._limit)
        if self._limit < self._ssthresh:
            # Doubled, as a window of successes would: the limiter hands the growth out
            # one slot at a time over the next stall, so the first refusal (at the door,
            # at once) stops the sends it would take long before they are all out.
            self._limit = min(2.0 * self._limit, self._ssthresh)
        else:
            self._limit = min(self._limit + self._increase, float(self._max_limit))
        self._acked = 0
        return int(self._limit)

    def __repr__(self) -> str:
        return (
            f"AIMD(limit={self.limit}, ssthresh={self.ssthresh}, "
            f"min_limit={self._min_limit}, max_limit={self._max_limit})"
        )


class Gradient:
    """A latency-driven limit, after Envoy's gradient controller and Netflix's Gradient2.

    The idea: while replies come back about as fast as they do with no load, the upstream
    has room, so the limit grows by a queue allowance (``sqrt(limit)``); when they slow
    down beyond ``tolerance`` times that, requests are queueing upstream, so the limit
    shrinks in proportion::

        gradient = clamp(baseline * tolerance / rtt, 0.5, 1)
        target   = limit * gradient + sqrt(limit)
        limit    = (1 - smoothing) * limit + smoothing * target

    The *baseline* is the no-load round trip, and it is protected against creeping up
    under load (which would make any load look normal). It falls at once to any faster
    reply. It rises only when a whole re-measure window (``baseline_window`` seconds)
    never came within ``tolerance`` of it: then the upstream itself got slower, not busier
    (our own queueing would have been cut back and shown a fast reply), and the baseline
    takes that window's fastest reply. A steady moderate load therefore leaves it alone.

    Like ``AIMD``, the limit does not move while less than half of it is in flight, and a
    congestion signal cuts it by ``backoff_ratio`` once per congestion episode. It always
    lies within ``[min_limit, max_limit]``. Latency is the weaker signal for LLM APIs
    (it scales with output length), so prefer ``AIMD`` unless the upstream never says 429.

    Raises:
        ValueError: bounds out of order, ``smoothing`` outside (0, 1], ``tolerance`` below
            1, ``backoff_ratio`` outside (0, 1), or a non-positive ``baseline_window``.
    """

    __slots__ = (
        "_backoff_ratio",
        "_baseline",
        "_baseline_window",
        "_episodes",
        "_limit",
        "_max_limit",
        "_min_limit",
        "_smoothing",
        "_tolerance",
        "_window_min",
        "_window_start",
    )

    def __init__(
        self,
        *,
        initial: int = 20,
        min_limit: int = 1,
        max_limit: int = 1000,
        smoothing: float = 0.2,
        tolerance: float = 2.0,
        baseline_window: float = 60.0,
        backoff_ratio: float = 0.5,
    ) -> None:
        _check_bounds(initial, min_limit, max_limit)
        _check_backoff(backoff_ratio)
        if not 0 < smoothing <= 1:
            raise ValueError(
                f"smoothing must lie in (0, 1], not {smoothing!r}: it is the weight of "
                "each new target in the limit."
            )
        if not tolerance >= 1:
            raise ValueError(
                f"tolerance must be at least 1, not {tolerance!r}: it is how many times "
                "the no-load round trip still counts as unloaded."
            )
        if not baseline_window > 0:
            raise ValueError(
                f"baseline_window must be a positive number of seconds, not {baseline_window!r}."
            )
        self._min_limit = min_limit
        self._max_limit = max_limit
        self._smoothing = smoothing
        self._tolerance = tolerance
        self._baseline_window = baseline_window
        self._backoff_ratio = backoff_ratio
        self._limit = float(initial)
        self._baseline: float | None = None
        self._window_start: float | None = None
        self._window_min = math.inf
        self._episodes = _Episodes()

    @property
    def limit(self) -> int:
        """The current limit."""
        return int(self._limit)

    @property
    def baseline(self) -> float | None:
        """The protected no-load round trip in seconds, or None before the first success."""
        return self._baseline

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> int:
        """Learn from one finished request and return the new limit (see ``Limit``)."""
        if dropped:
            if self._episodes.begins(now, rtt):
                self._limit = _cut(self._limit, self._backoff_ratio, self._min_limit)
            return int(self._limit)
        self._episodes.observe(rtt)
        baseline = self._measure(now, rtt)
        if inflight * 2 < int(self._limit):
            return int(self._limit)
        allowed = baseline * self._tolerance
        gradient = 1.0 if rtt <= allowed else max(MIN_GRADIENT, allowed / rtt)
        target = self._limit * gradient + math.sqrt(self._limit)
        smoothed = self._limit + self._smoothing * (target - self._limit)
        self._limit = min(float(self._max_limit), max(float(self._min_limit), smoothed))
        return int(self._limit)

    def _measure(self, now: float, rtt: float) -> float:
        """Fold a success into the baseline and its re-measure window; return the baseline."""
        baseline = rtt if self._baseline is None else min(self._baseline, rtt)
        if self._window_start is None:
            self._window_start = now
        self._window_min = min(self._window_min, rtt)
        if now - self._window_start >= self._baseline_window:
            if self._window_min > baseline * self._tolerance:
                baseline = self._window_min
            self._window_start = now
            self._window_min = math.inf
        self._baseline = baseline
        return baseline

    def __repr__(self) -> str:
        baseline = "None" if self._baseline is None else f"{self._baseline:.3f}"
        return (
            f"Gradient(limit={self.limit}, baseline={baseline}, "
            f"min_limit={self._min_limit}, max_limit={self._max_limit})"
        )


class Fixed:
    """A limit that never changes: the limiter then behaves as a plain FIFO semaphore.

    Raises:
        ValueError: a limit below 1.
    """

    __slots__ = ("_limit",)

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"A fixed limit must be an integer of at least 1, not {limit!r}.")
        self._limit = limit

    @property
    def limit(self) -> int:
        """The limit, as configured."""
        return self._limit

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> int:
        """Ignore the sample; the limit stays what it was."""
        return self._limit

    def __repr__(self) -> str:
        return f"Fixed({self._limit})"

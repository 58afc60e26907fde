"""Gates the head of the queue waits on before it is sent: rate, tokens, cooldown.

The queue decides the order once; the dispatcher then holds the head of the queue at three
gates, in this order, before it sends it:

- ``CooldownGate``: the fleet-wide "the upstream said wait N s" (Retry-After). Closed until
  an absolute loop time; waiters wake spread over a short ramp, not all at one instant.
- ``RateGate``: requests per minute, a token bucket.
- ``TokenGate``: tokens per minute, a token bucket with reservations: reserve an estimate
  before sending, reconcile with the actual usage afterwards.

Both bucket gates also keep a *mirror* of the upstream's own bucket, learnt from its
rate-limit headers (``sync``): its size (``limit``), its refill rate (about
``(limit - remaining) / reset``) and a level that every grant debits at once and each
sync only lowers. A send must fit our bucket and the mirror, so the upstream is kept
full at its own pace, even when no quota of ours is configured, and a grant the
upstream has not seen yet is never counted twice as available. A mirror's rate that no
reading has checked for a while, and that holds our sends back while the upstream
refuses none, is probed upwards (``TokenBucket.probe``) until a reading or a refusal
says where it stands.

Normally only one task (the dispatcher) waits on a gate, but every gate stays correct and
cancellation-safe with many: waiters are futures served first come, first served, woken by
one timer (``loop.call_at``) rather than a sleeping task each, and a cancelled waiter takes
nothing. ``TokenBucket`` is the pure arithmetic under both bucket gates: it takes ``now``
and never touches the event loop.

None of these gates raises a ``QuotaError``: they only wait. ``WouldBlock`` (a
``RuntimeError``) is for ``reserve_nowait`` when the caller asked not to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass

from .errors import WouldBlock

__all__ = [
    "CooldownGate",
    "CooldownStatistics",
    "GateStatistics",
    "MirrorStatistics",
    "RateGate",
    "Reservation",
    "TokenBucket",
    "TokenGate",
    "TokenGateStatistics",
    "WouldBlock",
]

_EPSILON = 1e-9
"""Relative float noise below which a shortfall is treated as none (no 1e-16 s waits)."""

_LEDGER_SIZE = 1024
"""Takes remembered while there is no mirror, to start one where our sends left the upstream."""

_LATEST_SIZE = 64
"""Takes remembered while a mirror stands, for the sends a reading may not count yet
(``TokenBucket.sync``'s ``lag``)."""

ANCHOR_REFILL_AFTER = 1.0
"""A reading from a reply slower than this (seconds from its send) is credited the refill
since the send when it re-anchors a mirror (see ``TokenBucket.sync``)."""

_MEASURE_SPAN = 0.5
"""The shortest span (seconds) between two readings whose difference measures a refill."""

_MEASURE_AGE = 1.0
"""Only readings from replies this fast (seconds from the send) measure a refill: the
marks of slower ones say too little about which of our sends the upstream had counted."""

_MEASURE_ROOM = 1.25
"""A rate more than this many times the refill measured (or what we sent) is refuted.

The room is what the mirror may send beyond the evidence. It paces alone where the
readings overstate the rate (a per-minute ``limit``), and at twice the refill it let
through two sends a unit at an empty bucket: on an upstream that counts refusals, a debt
each time (virtual row 15: 3.0-3.9 % of 429s, 1.1-1.2 % at 1.25 times). A quota that grew
is still found: each measurement may raise the bound this much again, and a slow reply
that shows the bucket at its top raises it too (``_RATE_RAISE``)."""

_MEASURE_ROOM_HELD = 2.0
"""The room while a reserve is held back (an upstream that punishes): its bucket is never
run dry, so the room costs no refusal there, and its refusals, which measure, are rare.
One real-time run at 1.25 times everywhere gave the punishing long rows 2, 9 and 14
0.953, 0.950 and 0.958 (row 14's first 10 s 0.86; they swing by 0.03 from run to run):
the old room is kept where the new one buys nothing."""

_TOP_MIN = 10.0
"""The fewest units the most ``remaining`` seen under a limit must be for a reading at it
to count as a full bucket (fewer say too little of a bucket to call one full)."""

_RATE_MEMORY = 10.0
"""How many full refills of the upstream's bucket a learnt rate is trusted for."""

_RATE_RAISE = 1.25
"""How much a learnt rate grows (at most once per ``_MEASURE_SPAN``) when a slow reply
shows the upstream's bucket full (but for our own request) although we sent at least that
rate meanwhile: the rate was learnt too low (see ``TokenBucket.sync``)."""

_PROBE_QUIET = 0.5
"""Seconds without a reading after which a mirror's rate is unverified: sends at its rate
with no refusal at the door may raise it (see ``TokenBucket.probe``)."""

_PROBE_RAISE = 1.1
"""How much one probe raises an unverified mirror's rate."""

_PROBE_REACH = 2.0
"""How far probes may raise a rate in all: a reset rounded up to the second halves it."""

_PROBE_BINDING = 0.9
"""A mirror binds when we sent at least this share of its rate since the last probe."""

_MIRROR_TRUST = 60.0
"""Seconds a reading of the upstream's headers may hold sends back: "nothing left, full
again in 1 000 h" holds a minute at most, then a send goes and its reply says what is
true by then (per-minute windows refill within it; a quota gone for the day says so in
its refusals, which the cooldown answers)."""

_BOTTOM_SPREAD = 2.0
"""At the bottom of a bucket mirror (under ``_BOTTOM_SECONDS`` of its refill left after a
send, above any reserve), sends go one by one, at no more than this many times its
refill. There the mirror is an estimate at the edge of an empty bucket, and a send it
lets out early is refused: alone, that refusal comes back before the next send and
corrects the mirror; in a clump (a reading that re-anchors the level a few units up, or a
loop held up for some ms, let them out within a millisecond) each send behind the first
lands inside the window the first opened, and on an upstream that punishes early sends
each buys a second for everyone (the real-time matrix's row 9 on a busy machine: 27 sends
within 50 ms at a mirror's refill of 162 a second, two refused 1 ms apart, 2 s of
silence). The mirror's rate is a lower bound of the refill, at least half of it (see
``PUNISHED_SPREAD`` in ``feedback``, the same spread at every level once an upstream is
known to punish): twice it does not hold the sends under the refill. Paired real-time
runs of rows 9 and 14 on a busy machine (seeds 3 and 5-10): 3 of 14 runs missed a target
without the spread, 1 of 14 with it (row 14's first 10 s with seed 6, both ways); row
9's lowest gave 0.916 of the quota without it (a wall of 2 s), 0.983 with it."""

_BOTTOM_SECONDS = 0.1
"""How much of a bucket mirror's refill (seconds of it) is its bottom (``_BOTTOM_SPREAD``)."""

_TIMER_SLACK = 1e-6
"""Loops fire timers up to their clock resolution early (looptime rounds to 1 µs); a
deadline this close counts as reached, so an early timer does not re-arm itself forever."""




def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number greater than 0, not {value!r}.")
    return float(value)


def _check_amount(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}.")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of at least 0, not {value!r}.")
    return float(value)


def _loop_time(default: float) -> float:
    """The running loop's time; outside a loop time stands still at ``default``."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return default


class TokenBucket:
    """A token bucket, and a mirror of the upstream's, in pure arithmetic: methods take ``now``.

    **Its own bucket** holds up to ``burst`` units and refills at ``rate`` units per second:
    the quota we were configured with. A request for ``amount`` may go when the bucket
    holds it. A request for more than ``burst`` can never find that much, so it waits until
    the bucket is full and then takes everything and more: the level goes negative (debt)
    and later requests wait while the debt refills. ``take`` itself never refuses; asking
    first is the caller's job (``time_until``), and going into debt is how ``reconcile``
    charges usage that exceeded its estimate.

    **The mirror** is our copy of the upstream's own bucket, learnt from its rate-limit
    headers by ``sync`` (see there for exactly how): a level, a refill rate, a burst.
    Every ``take`` and ``refund`` moves both buckets alike, so the mirror counts a send the
    moment it is granted, before the upstream has seen it, and a ``sync`` only ever
    lowers it. A send must fit both; at the mirror's bottom (the last tenth of a second of
    its refill) sends go one by one, at twice its refill at most (``_BOTTOM_SPREAD``).
    Before the first ``sync`` there is no mirror and the bucket alone rules.

    Time that runs backwards is treated as standing still.

    Args:
        rate: units added per second.
        burst: the most the bucket holds. It starts full.
        now: the current time. ``-math.inf`` means "full since forever": the first
            call with a real ``now`` finds it full (gates use this to be built outside
            a running loop).

    Raises:
        ValueError: ``rate`` or ``burst`` is not a finite number greater than 0.
    """

    __slots__ = (
        "_burst",
        "_lag",
        "_latest",
        "_learnt_at",
        "_learnt_limit",
        "_learnt_rate",
        "_ledger",
        "_level",
        "_mirror_burst",
        "_mirror_level",
        "_mirror_rate",
        "_mirror_until",
        "_pending",
        "_pending_fresh",
        "_probe_base",
        "_probe_prev",
        "_raised_at",
        "_rate",
        "_rate_cap",
        "_reading",
        "_recent_best",
        "_reserve",
        "_stamp",
        "_synced_at",
        "_taken",
        "_top_limit",
        "_top_scaled",
        "_top_seen",
    )

    def __init__(self, *, rate: float, burst: float, now: float) -> None:
        self._rate = _check_positive("rate", rate)
        self._burst = _check_positive("burst", burst)
        self._level = self._burst
        self._stamp = now
        # No mirror while _mirror_burst is None. A bucket mirror refills at _mirror_rate and
        # never lapses (_mirror_until = inf); a fixed-window mirror has rate 0 and lapses at
        # _mirror_until. _learnt_rate: the upstream's refill rate last learnt (0: none yet).
        self._mirror_burst: float | None = None
        self._mirror_level = 0.0
        self._mirror_rate = 0.0
        self._mirror_until = math.inf
        self._synced_at = -math.inf  # when the mirror last heard from the upstream
        self._learnt_rate = 0.0
        self._learnt_at = now  # when, and under which limit, it was learnt
        self._learnt_limit = math.nan
        self._recent_best = 0.0  # the best half-empty reading since _learnt_at
        self._raised_at = -math.inf  # when a slow reply last raised the learnt rate
        # The rate before the last probe raised it (0: none since a fast reading; -1: a
        # refusal refuted a probe, none until the next fast reading), and the rate probing
        # started from (0: none since a fast reading). See ``probe``.
        self._probe_prev = 0.0
        self._probe_base = 0.0
        # The refill measured between readings bounds the rate (see ``_measure``).
        self._rate_cap = math.inf
        self._reading: tuple[float, float, float, float] | None = None
        # The last reported remaining, not yet folded into the mirror's level.
        self._pending: float | None = None
        self._pending_fresh = False
        # While there is no mirror: recent (time, units) taken (negative: refunded).
        self._ledger: deque[tuple[float, float]] = deque(maxlen=_LEDGER_SIZE)
        # While there is a mirror: the latest (time, units) taken (see ``sync``'s ``lag``).
        self._latest: deque[tuple[float, float]] = deque(maxlen=_LATEST_SIZE)
        self._lag = 0.0  # the last ``lag`` a reading came with
        self._taken = 0.0  # every unit ever taken (refunds not subtracted): see ``taken``
        self._reserve = 0.0  # seconds of the mirror's refill held back (see ``hold_back``)
        # The most the upstream said it had left under the limit it stated last: the
        # bucket's size as seen, which a per-minute ``limit`` does not name.
        self._top_seen = 0.0
        self._top_limit: float | None = None
        # Under a new limit, the top seen under the old ones, scaled to it: a first
        # reading alone is no top (the real-time row 9's, 11 of a bucket doubled to 200,
        # read as full, raised the rate and bought 3 s of penalty).
        self._top_scaled = 0.0

    @property
    def taken(self) -> float:
        """Every unit taken so far (refunds not subtracted): a mark to pass to ``sync``.

        Read it when a request is sent; a reply's ``sync`` with that mark then knows what
        we took after it, which the upstream's ``remaining`` could not count yet.
        """
        return self._taken

    def mirror_ample(self) -> bool:
        """Whether the mirror (if any) held at least half its burst when last settled."""
        burst = self._mirror_burst
        return burst is None or 2 * self._mirror_level >= burst

    def mirror_bounds(self) -> bool:
        """Whether a mirror keeps our sends within the upstream's bucket.

        Its rate is then a reading's lower bound of the refill. Where the refill measured
        between readings bounds it instead (at ``_MEASURE_ROOM`` times that refill: the
        readings overstate the rate, as a per-minute ``limit`` over a second's bucket
        does), it paces nothing.
        """
        return self._mirror_burst is not None and self._mirror_rate < self._rate_cap

    def mirror_vouches(self, rate: float, now: float) -> bool | None:
        """What a bucket mirror says at ``now`` of sending at ``rate``: True if it refills
        at least that fast and stands at the most the upstream has shown it holds (sends
        at ``rate`` leave it full); False if it refills slower and stands under half of
        that (sends at ``rate`` are draining it); None otherwise, or with no mirror. Full
        is but for what we took over the last reading's ``lag`` (see ``sync``): sends no
        reading could count yet, which a full bucket took as well."""
        self._settle(now)
        burst = self._mirror_burst
        if burst is None or self._mirror_until != math.inf:
            return None
        top = self._top(burst)
        if rate <= self._mirror_rate:
            full = self._mirror_level + self._taken_within(self._lag, now) >= top - 1
            return True if full else None
        return False if 2 * self._mirror_level < top else None

    def _top(self, burst: float) -> float:
        """Full: the most the upstream has shown under its current limit, when that is a
        bucket's worth (``_TOP_MIN``), else the mirror's ``burst``: a per-minute
        ``limit`` over a second's bucket never is one."""
        seen = max(self._top_seen, self._top_scaled)
        return min(burst, seen) if seen >= _TOP_MIN else burst

    @property
    def rate(self) -> float:
        """Units added per second."""
        return self._rate

    @property
    def burst(self) -> float:
        """The most the bucket holds."""
        return self._burst

    @property
    def stamp(self) -> float:
        """The latest ``now`` the bucket has seen."""
        return self._stamp

    def configure(self, *, rate: float, burst: float, now: float) -> None:
        """Change rate and burst; the level earned so far is kept, capped at the new burst.

        The mirror is left as it is: it describes the upstream, not our configuration.

        Raises:
            ValueError: ``rate`` or ``burst`` is not a finite number greater than 0.
        """
        rate = _check_positive("rate", rate)
        burst = _check_positive("burst", burst)
        self._advance(now)
        self._rate = rate
        self._burst = burst
        self._level = min(self._level, burst)

    def drain(self, now: float) -> None:
        """Bring the bucket's level down to nothing if it is above (a debt stays); the
        mirror is left as it is."""
        self._advance(now)
        if self._level > 0:
            self._level = 0.0

    def hold_back(self, seconds: float) -> None:
        """Keep ``seconds`` of the upstream's refill unspent in the mirror from now on.

        For an upstream that punishes a send finding its bucket empty (a whole second of
        refusals, or more, for everyone): our mirror is a close estimate, not the
        upstream's ledger, and a send timed on the last unit lands early as often as
        late. The reserve is that many seconds of the mirror's rate, and never more than
        half the most the upstream has said it had left under its current ``limit``
        (half the burst while no reading showed anything left): a
        ``limit`` that names a per-minute figure while the bucket behind it holds a
        second's worth is not a bucket size, and a rate read off it is 60 times the
        refill until a measurement bounds it (none comes while the reserve keeps
        refusals away). Half the burst was the bound once: 0.1 s of 11 830 a second,
        1 183 units against readings of 200 at most, let sends out only in the gaps
        between readings (the real-time matrix's row 14: 13-70 sends a second of 200,
        fewer the more replies came back). It costs its units once, not the rate: the
        pace stays the refill's.

        A refill bound measured before is given the room of a held reserve
        (``_MEASURE_ROOM_HELD``).

        Raises:
            ValueError: ``seconds`` is negative or not finite.
        """
        seconds = _check_amount("seconds", seconds)
        if seconds and not self._reserve and math.isfinite(self._rate_cap):
            self._rate_cap *= _MEASURE_ROOM_HELD / _MEASURE_ROOM
        elif self._reserve and not seconds and math.isfinite(self._rate_cap):
            self._rate_cap *= _MEASURE_ROOM / _MEASURE_ROOM_HELD
            self._learnt_rate = min(self._learnt_rate, self._rate_cap)
        self._reserve = seconds

    def at_least(self, rate: float, now: float) -> bool:
        """The upstream refilled at least ``rate`` units a second: a mirror's rate learnt
        below it was learnt too low, and is raised to it (within the refill bound).

        Returns:
            Whether the mirror's rate was raised.
        """
        if self._mirror_burst is None or self._mirror_until != math.inf:
            return False
        rate = min(rate, self._rate_cap)
        if rate <= self._learnt_rate:
            return False
        self._relearn(rate, now)
        return True

    def _relearn(self, rate: float, now: float) -> None:
        """The mirror's rate set to ``rate`` at ``now``, as if a reading had taught it."""
        self._settle(now)
        self._learnt_rate = self._mirror_rate = rate
        self._learnt_at = now
        self._recent_best = 0.0

    def probe(self, sending: float, now: float) -> bool:
        """Raise an unverified mirror's rate: we sent at it and the upstream refused none.

        Replies that take seconds (streamed answers) bring no reading for seconds, and a
        rate learnt from the night's first readings is a lower bound, half the true one
        when resets are rounded up to the second: the mirror then holds the pace at half
        the quota until the first long replies return (matrix rows 5 and 9: 0.88 of
        the quota in the first 10 s). With no reading for ``_PROBE_QUIET`` s, ``sending``
        (units a second since the caller last asked) at least ``_PROBE_BINDING`` of the
        mirror's rate and no refusal at the door (the caller's to check), the door's
        silence is the evidence: the rate grows by ``_PROBE_RAISE``, within the refill
        bound measured and ``_PROBE_REACH`` times where probing began. The next fast
        reading, or a refusal (``probe_refuted``), corrects it. Only a bucket mirror is
        probed: a fixed window states its own end.

        Returns:
            Whether the mirror's rate was raised.
        """
        rate = self._mirror_rate
        if (
            self._mirror_burst is None
            or self._mirror_until != math.inf
            or rate <= 0
            or now - self._synced_at < _PROBE_QUIET
            or self._probe_prev < 0
            or sending < _PROBE_BINDING * rate
        ):
            return False
        if not self._probe_base:
            self._probe_base = rate
        raised = min(rate * _PROBE_RAISE, self._rate_cap, self._probe_base * _PROBE_REACH)
        if raised <= rate:
            return False
        self._probe_prev = rate
        self._relearn(raised, now)
        return True

    def probe_refuted(self, now: float) -> bool:
        """A refusal at the door after a probe: back to the rate before it, and no more
        probes until a fast reading shows room (a reading that shows the bucket empty
        refutes a probe too, see ``sync``).

        Returns:
            Whether the mirror's rate was lowered.
        """
        previous = self._probe_prev
        if previous <= 0 or self._mirror_burst is None:
            return False
        self._probe_prev = -1.0
        if self._mirror_rate <= previous:
            return False
        self._relearn(previous, now)
        return True

    def level(self, now: float) -> float:
        """The units in the bucket at ``now`` (negative while in debt)."""
        self._advance(now)
        return self._level

    def mirror(self, now: float) -> MirrorStatistics | None:
        """The mirror of the upstream's bucket at ``now``, or None while there is none."""
        self._settle(now)
        if self._mirror_burst is None:
            return None
        until = self._mirror_until
        return MirrorStatistics(
            level=self._mirror_level,
            rate=self._mirror_rate,
            burst=self._mirror_burst,
            lapses_at=None if until == math.inf else until,
        )

    def time_until(self, amount: float, now: float) -> float:
        """Seconds from ``now`` until ``amount`` fits the bucket and the mirror: 0 if now.

        An ``amount`` above a burst waits until that bucket is full (then goes into debt).
        A fixed-window mirror short of ``amount`` makes it wait until the mirror lapses.

        Raises:
            ValueError: ``amount`` is negative or not finite.
        """
        return self._wait_for(_check_amount("amount", amount), now)

    def _wait_for(self, amount: float, now: float) -> float:
        """``time_until`` for an amount known to be valid."""
        self._settle(now)
        wait = _shortfall(amount, self._level, self._burst, self._rate)
        if self._mirror_burst is not None:
            if self._mirror_until == math.inf:
                burst, rate = self._mirror_burst, self._mirror_rate
                reserve = (
                    min(self._reserve * rate, (self._top_seen or burst) / 2, burst / 2)
                    if self._reserve
                    else 0.0
                )
                mirror = _shortfall(amount + reserve, self._mirror_level, burst, rate)
                latest = self._latest
                if (
                    latest
                    and rate > 0.0
                    and self._mirror_level - amount - reserve < _BOTTOM_SECONDS * rate
                ):
                    # At the bottom: one by one, behind the last take (``_BOTTOM_SPREAD``).
                    at, units = latest[-1]
                    spread = at + units / (_BOTTOM_SPREAD * rate) - now
                    if spread > mirror:
                        mirror = spread
            else:  # a fixed window supplies what it has left, then nothing until it lapses
                enough = amount - self._mirror_level <= _EPSILON * max(1.0, amount)
                mirror = 0.0 if enough else self._mirror_until - now
            # A reading holds sends back for _MIRROR_TRUST at most: evidence goes stale.
            # (Comparisons, not min() and max(), on this path of every request: the same
            # values as ``wait = max(wait, min(mirror, max(0.0, trusted)))``.)
            trusted = self._synced_at + _MIRROR_TRUST - now
            trusted = trusted if trusted > 0.0 else 0.0
            if trusted < mirror:
                mirror = trusted
            if mirror > wait:
                wait = mirror
        return wait

    def take(self, amount: float, now: float) -> None:
        """Remove ``amount`` units from the bucket and the mirror, going into debt if need be.

        Raises:
            ValueError: ``amount`` is negative or not finite.
        """
        self._debit(_check_amount("amount", amount), now)

    def _debit(self, amount: float, now: float) -> None:
        """``take`` for an amount known to be valid."""
        self._settle(now)
        self._remove(amount, now)

    def _remove(self, amount: float, now: float) -> None:
        """``_debit`` for a bucket settled at ``now`` already (as ``_wait_for`` leaves it)."""
        self._level -= amount
        self._taken += amount
        if self._mirror_burst is not None:
            self._mirror_level -= amount
            self._latest.append((now, amount))
        else:
            self._ledger.append((now, amount))

    def refund(self, amount: float, now: float) -> None:
        """Give back ``amount`` units to the bucket and the mirror, neither above its burst.

        Raises:
            ValueError: ``amount`` is negative or not finite.
        """
        self._credit(_check_amount("amount", amount), now)

    def _credit(self, amount: float, now: float) -> None:
        """``refund`` for an amount known to be valid."""
        if self._pending is not None and not self._pending_fresh:
            # A reading older than the last refund did not count this one: fold it first.
            self._settle(now)
        self._pending_fresh = False
        self._advance(now)
        # Capped by comparisons, not min() (as in ``_advance``): once a request.
        level = self._level + amount
        self._level = level if level < self._burst else self._burst
        mirror_burst = self._mirror_burst
        if mirror_burst is not None:
            level = self._mirror_level + amount
            self._mirror_level = level if level < mirror_burst else mirror_burst
        else:
            self._ledger.append((now, -amount))

    def sync(
        self,
        *,
        remaining: float,
        reset_after: float | None,
        limit: float | None,
        now: float,
        sent_mark: float | None = None,
        sent_age: float = 0.0,
        sent_level: float | None = None,
        lag: float = 0.0,
    ) -> None:
        """Fold what the upstream says in its rate-limit headers into the mirror.

        OpenAI and Anthropic describe a quota as a bucket: ``limit`` is its size,
        ``remaining`` what is left, ``reset_after`` the time until it is full again.

        - **Rate.** With ``remaining < limit`` and ``reset_after > 0`` the upstream
          refills at about ``(limit - remaining) / reset_after`` units per second. The
          mirror's rate is the largest recent ``(limit - remaining - 1) / reset_after``,
          a bound that the headers' rounding cannot push above the true rate (see
          ``_learn``; a deficit of one unit bounds nothing and teaches nothing: taken
          as a rate over a reset rounded to the second it was a guess, 1 to 100 times
          too low, that held the pace there). Otherwise (a full bucket, no reset) the headers
          say nothing about the rate and the last rate learnt is kept.
        - **Burst.** The mirror holds up to ``limit``.
        - **Level, anchored.** With ``sent_mark`` (``taken`` when the request that
          carried these headers was sent, ``sent_age`` seconds ago) the level is set to
          ``remaining`` less what we took since then, plus (for a reply slower than
          ``ANCHOR_REFILL_AFTER``) what the mirror's rate refilled in those
          ``sent_age`` seconds, and no more than ``remaining``, up or down: the reading
          was taken somewhere between the send and now; if at the send, what we took
          since is not in it and the refill since is not either; if just now,
          ``remaining`` stands as it is. So a mirror that was wrong (a rate
          learnt too low from rounded resets, a level left low) is put right by the next
          reply, however long it took, and the mirror never holds the pace below what
          the upstream says it has. It is a lower bound while the mirror's rate is one
          (a send after the mark that the upstream had counted is subtracted twice).
          Read at the reply, ``remaining`` was written ``lag`` seconds ago at most, and
          what we took since (the sends on their way, or granted since) is not in it:
          no higher than ``remaining`` less what we took over the last ``lag`` seconds
          (within ``sent_age``). Else two replies at the edge of an empty bucket, a
          millisecond apart, each gave back the same few units, and the sends granted
          off the first were granted again off the second (the real-time row 9: a
          reading of 4 left, 2 sends, a second reading of 4, 5 sends; 2 refused, each
          buying a punishing upstream's second).
        - **Level, without a mark.** A ``sync`` only ever lowers the mirror's level, to
          ``remaining``;
          it never raises it: our sends not yet seen by the upstream are debited in the
          mirror already but not in ``remaining``. The lowering is folded in at the next
          ``take``, ``time_until`` or ``mirror`` call, after the first refund made
          meanwhile: the headers of a reply describe the upstream once it has settled
          that request, and the caller settles its own reservation for it right after
          the sync. A later refund (another request's, whose reply was not read) comes
          after the reading is folded, since the reading could not count it.
        - **A new mirror** (the first sync, or the first after a fixed window lapsed)
          starts where our own record says the upstream is: full at our first recent
          send, less what we took since, refilled at the rate learnt (so a grant taken
          but not yet sent is not forgotten), and no higher than ``remaining``.

        So with ``limit`` and a rate known, the mirror is a bucket that never lapses:
        ``limit`` 61, ``remaining`` 2, reset in 58 s: two go now, then one a second.

        Otherwise (``limit`` unknown, or no rate learnt yet) the cautious reading of a
        fixed window: the upstream has ``remaining`` until its reset and says nothing of
        after. The mirror holds ``remaining``, at rate 0, until ``reset_after``, then
        lapses; without a reset it is not started (an existing one is only lowered).
        ``remaining`` 0, reset in 3 s: nothing until then.

        A negative or non-finite ``remaining`` (Azure has sent ``-1``) says nothing and
        is ignored altogether.

        Args:
            remaining: ``x-ratelimit-remaining-*``: units the upstream says are left.
            reset_after: seconds until the upstream's bucket is full again, if it said.
            limit: ``x-ratelimit-limit-*``: the upstream's bucket size, if it said.
            now: the current time.
            sent_mark: ``taken`` when the request carrying the headers was sent, if known.
            sent_age: seconds since that send.
            sent_level: the mirror's level at that send (None: there was none), which a
                slow reply's reading must contradict to raise the rate (see below).
            lag: the most seconds the reading may have taken to reach us (see above).

        Raises:
            ValueError: ``reset_after`` or ``lag`` is negative or not finite, or
                ``limit`` is not a finite number greater than 0.
            TypeError: ``remaining`` is not a number.
        """
        if reset_after is not None:
            reset_after = _check_amount("reset_after", reset_after)
        if limit is not None:
            limit = _check_positive("limit", limit)
        lag = _check_amount("lag", lag)
        self._lag = lag
        if isinstance(remaining, bool) or not isinstance(remaining, int | float):
            raise TypeError(f"remaining must be a number, not {type(remaining).__name__}.")
        if not math.isfinite(remaining) or remaining < 0:
            return
        remaining = float(remaining)
        self._settle(now)
        self._synced_at = now
        if sent_age <= _MEASURE_AGE:
            # A fast reading: what a probe raised stands or falls by it now (a slow one,
            # a streamed reply's, may have been taken before the probe). Empty, it falls
            # (a 429's headers are read before its refusal is); with room, it stands.
            if remaining < 1:
                self.probe_refuted(now)
            else:
                self._probe_prev = self._probe_base = 0.0
        if limit != self._top_limit:
            old, self._top_limit = self._top_limit, limit
            # The bucket seen under the old quota, scaled as the limit was (the rate's
            # bound is too, see ``_rescale``): no fuller than that is "full" under the
            # new one until a reading shows more (see the raise below).
            top = max(self._top_seen, self._top_scaled)
            self._top_scaled = top * limit / old if old and limit else 0.0
            self._top_seen = remaining
        elif remaining > self._top_seen:
            self._top_seen = remaining
        if limit is not None:
            measures = sent_mark is not None and sent_age <= _MEASURE_AGE
            if measures or self._reserve:
                self._rescale(limit)
            if measures:
                assert sent_mark is not None
                self._measure(remaining, limit, sent_mark, now)
        if limit is not None and remaining < limit and reset_after:
            self._learn(limit - remaining, reset_after, limit, now)
        fresh = self._mirror_burst is None
        if limit is not None and self._learnt_rate > 0:
            self._mirror_rate = self._learnt_rate
            self._mirror_burst = limit
            self._mirror_until = math.inf
            if fresh:
                self._mirror_level = self._replay(limit, now)
            self._mirror_level = min(self._mirror_level, limit)
        elif reset_after:
            self._mirror_rate = 0.0
            self._mirror_burst = remaining
            self._mirror_until = now + reset_after
            if fresh:
                self._mirror_level = remaining
        elif fresh:
            return
        self._ledger.clear()
        if sent_mark is not None and self._mirror_burst is not None:
            since = max(0.0, self._taken - sent_mark)
            # Taken at the send, the reading has refilled since at the mirror's rate (a
            # lower bound of the upstream's); taken at the reply, it is ``remaining`` as
            # it stands. Either way no higher than what the upstream said. A fast reply
            # gets no such credit: what it would add is a fraction of a second's refill,
            # and taken it cost the real-time crisis 2 % of 429s (the token mirror's
            # estimates and the upstream's charges differ by about that much).
            slow = sent_age > ANCHOR_REFILL_AFTER
            refilled = self._mirror_rate * sent_age if slow else 0.0
            anchored = remaining - since + refilled
            if slow:
                # Below zero the reading contradicts itself: we sent more over its seconds
                # than it had left plus what the mirror's rate refills, and the upstream
                # took it. The rate was learnt too low (a per-minute ``limit`` over long
                # replies: seconds of sends at the true rate, less seconds of a lower
                # refill, held the real-time matrix's row 14 for 5 s and more at a time).
                anchored = max(anchored, 0.0)
            burst = self._mirror_burst
            top = self._top(burst)
            if (
                slow
                and self._mirror_rate > 0
                and since >= refilled
                and remaining >= top - 1
                and sent_level is not None
                and 2 * sent_level <= top
                and now - self._raised_at >= _MEASURE_SPAN
            ):
                # We sent at least the mirror's rate over the reply's seconds, the mirror
                # stood at half or less at the send, and the upstream shows its bucket
                # full (a level merely steady under the top proves only that rate). Read
                # at the reply, that is a refill beyond the mirror's rate, the surplus
                # spilt; read at the send (a streamed reply's headers leave at its start),
                # a mirror that had fallen behind the upstream. A mirror full at the send
                # contradicts nothing: the real-time row 9 raised 95 a second to 119 (of
                # 100) off readings taken at the night's first sends, ran its bucket dry
                # and bought 4 s of penalty. Either way the rate was learnt too
                # low (a reset rounded up to the second halves it), and a slow reply's
                # anchor (less all we sent, plus a refill at that rate) never lets the
                # pace past it. Raise it; raised too far, the readings fall under half
                # and stop it, and refusals cut the pace. A refill bound measured once
                # (a little over the refill between two fast readings, scaled with the
                # limit) is refuted by it too: measured in a cooldown's wake, the
                # real-time row 14's held the pace at 89 a second of 200 all night, its
                # bucket full.
                raised = self._mirror_rate * _RATE_RAISE
                self._rate_cap = max(self._rate_cap, raised)
                self._learnt_rate = self._mirror_rate = raised
                self._learnt_at = self._raised_at = now
                previous = self._reading
                if previous is not None and previous[3] != limit:
                    # Raised under a new limit, the bound is of the new quota: a
                    # measurement begun under the old one must not scale it once more
                    # (``_rescale``). Scaled so, the real-time row 14's doubled from 168
                    # to 336 a second at the first fast reply after the quota doubled
                    # (to 200), and its empty bucket refused every 20 ms.
                    self._reading = None
                anchored = remaining - since + self._mirror_rate * sent_age
            late = self._taken_within(min(lag, sent_age), now)
            self._mirror_level = min(burst, remaining - late, anchored)
            self._pending = None
            self._pending_fresh = False
            return
        self._pending = remaining
        self._pending_fresh = True  # the refund that comes next is counted in it already

    def _taken_within(self, seconds: float, now: float) -> float:
        """Units taken while the mirror stood, over the ``seconds`` before ``now``."""
        since = now - seconds
        units = 0.0
        for at, amount in reversed(self._latest):
            if at <= since:
                break
            units += amount
        return units

    def _rescale(self, limit: float) -> None:
        """A new ``limit``: the refill bound measured under the old one scales with it.

        Read off fast replies, and off slow ones too while a reserve is held back: only
        fast replies measure a refill, and on an upstream whose successes all take
        seconds the fast ones are its refusals. Kept from refusing (a punishing
        upstream's bucket is never run dry), a quota that doubled would else stay
        bounded by what was measured under the old one (the real-time matrix's row 14:
        0.54-0.74 of the quota). Without a reserve the refusals at the edge go on
        measuring, and a bound scaled off a slow reply, above the refill measured,
        overshoots until they do (row 15 on virtual time: 6 % of 429s instead of 1 %).
        """
        previous = self._reading
        if previous is not None and limit != previous[3]:
            if math.isfinite(self._rate_cap):
                self._rate_cap *= limit / previous[3]  # the quota changed by that much
            self._reading = None  # the next measurement starts under the new limit

    def _measure(self, remaining: float, limit: float, mark: float, now: float) -> None:
        """Bound the rate by the refill seen between two readings at least ``_MEASURE_SPAN`` apart.

        Between two readings the upstream refilled what ``remaining`` gained plus what we
        took meanwhile. While both readings are under half the stated limit that is the
        refill itself, unless the bucket was full in between, which only a bucket smaller
        than the stated limit can be: Anthropic documents ``limit`` as the rate per minute
        (6 000 for 100 a second), so ``(limit - remaining) / reset`` reads 6 000 a second
        off a bucket of 100, and a mirror refilling that fast paces nothing. A rate more
        than ``_MEASURE_ROOM`` times the refill measured is refuted until the next
        measurement; the bound never falls under that share more than we sent, so
        sending more is never held back by it for long (each measurement may raise it
        by that much again).
        """
        previous = self._reading
        if previous is None:
            self._reading = (now, remaining, mark, limit)
            return
        at, before, sent_before, _ = previous
        span = now - at
        if span < _MEASURE_SPAN:
            return
        self._reading = (now, remaining, mark, limit)
        if 2 * max(before, remaining) > limit:
            return  # a bucket that may have been full all along shows no refill
        refill = (remaining - before + (mark - sent_before)) / span
        room = _MEASURE_ROOM_HELD if self._reserve else _MEASURE_ROOM
        self._rate_cap = room * max(refill, (mark - sent_before) / span)
        if self._learnt_rate > self._rate_cap:
            self._learnt_rate = self._rate_cap
            self._learnt_at = now
            self._recent_best = 0.0

    def _learn(self, deficit: float, reset_after: float, limit: float, now: float) -> None:
        """Learn the refill rate from one reading, keeping the best of the recent ones.

        Readings are rounded: remaining down to a whole unit, resets up (to the
        millisecond by OpenAI, to the second by Anthropic). So ``(deficit - 1) / reset``
        never exceeds the true rate, and the largest such bound among recent readings is
        the closest to it. Too high a rate would overshoot between syncs (a 429, and a
        Retry-After that holds the whole fleet); too low a one holds the pace below the
        quota between readings (a reading re-anchors the level, not the rate). A bound is
        kept until a larger one comes, or the limit changes (then forgotten, even for a
        reading that teaches none), or it is older than ``_RATE_MEMORY`` full refills of
        the bucket: then the best reading taken meanwhile from a bucket at least half empty
        replaces it (a nearly full bucket's reading is mostly rounding), so a rate that
        fell is followed within one memory and a lucky low reading does not stick.
        """
        bound = min(max(deficit - 1.0, 0.0) / reset_after, self._rate_cap)
        held = self._learnt_rate
        if bound <= 0:
            if limit != self._learnt_limit:
                self._learnt_rate = 0.0  # a new quota: what was learnt of the old one is not
            return
        if bound > held or held <= 0 or limit != self._learnt_limit:
            self._learnt_rate = bound
            self._learnt_at = now
            self._learnt_limit = limit
            self._recent_best = 0.0
        elif 2 * deficit >= limit:
            # The replacement is the best reading of the whole memory, not the first one
            # after it: a single reading can be a second of rounding low, and a rate too
            # low is never corrected (we then send too little to drain the bucket again).
            self._recent_best = max(self._recent_best, bound)
            if now - self._learnt_at >= _RATE_MEMORY * limit / held:
                self._learnt_rate = self._recent_best or deficit / reset_after
                self._learnt_at = now
                self._recent_best = 0.0

    def _replay(self, limit: float, now: float) -> float:
        """Where our own record puts the upstream: full at our first recorded take."""
        ledger, rate = self._ledger, self._learnt_rate
        if not ledger:
            return limit
        level, last = limit, ledger[0][0]
        for at, amount in ledger:
            level = min(limit, level + rate * (at - last)) - amount
            last = at
        return min(limit, level + rate * (now - last))

    def _settle(self, now: float) -> None:
        """Advance to ``now`` and fold in the last reported remaining (see ``sync``)."""
        # Settled several times a request at one ``now``: when time has not moved and no
        # mirror lapses, ``_advance`` would change nothing.
        if now > self._stamp or now >= self._mirror_until:
            self._advance(now)
        if self._pending is not None:
            if self._mirror_burst is not None:
                self._mirror_level = min(self._mirror_level, self._pending)
            self._pending = None

    def _advance(self, now: float) -> None:
        if now > self._stamp:
            elapsed = now - self._stamp
            # Capped by comparisons, not min(): at every new ``now``, twice a request or
            # more, and the builtin's call costs more than the arithmetic (same values:
            # ``min(burst, level)`` is ``level`` only when it is below).
            level = self._level + self._rate * elapsed
            self._level = level if level < self._burst else self._burst
            mirror_burst = self._mirror_burst
            if mirror_burst is not None:
                level = self._mirror_level + self._mirror_rate * elapsed
                self._mirror_level = level if level < mirror_burst else mirror_burst
                if self._pending is not None:
                    self._pending += self._mirror_rate * elapsed
            self._stamp = now
        if now >= self._mirror_until:
            self._mirror_burst = None
            self._mirror_until = math.inf
            self._pending = None

    def __repr__(self) -> str:
        mirror = ""
        if self._mirror_burst is not None:
            lapse = "" if self._mirror_until == math.inf else f" until {self._mirror_until:.3f}"
            mirror = (
                f", mirror={self._mirror_level:.3f}/{self._mirror_burst:g} "
                f"at {self._mirror_rate:g}/s{lapse}"
            )
        return (
            f"TokenBucket(rate={self._rate:g}, burst={self._burst:g}, "
            f"level={self._level:.3f} at {self._stamp:.3f}{mirror})"
        )


def _shortfall(amount: float, level: float, burst: float, rate: float) -> float:
    """Seconds until a bucket refilling at ``rate`` holds ``min(amount, burst)`` (inf: never)."""
    # Asked four times a request: comparisons, not min() and max(), whose calls cost
    # more than the answer (same values: ``min(amount, burst)``, ``max(1.0, need)``).
    need = burst if burst < amount else amount
    short = need - level
    if short <= _EPSILON * (need if need > 1.0 else 1.0):
        return 0.0
    return short / rate if rate > 0 else math.inf


@dataclass(frozen=True, slots=True)
class MirrorStatistics:
    """A snapshot of a bucket's mirror of the upstream's bucket (see ``TokenBucket.sync``).

    Attributes:
        level: what the upstream has left by our count (negative: we owe it).
        rate: units per second it refills at (0 for a fixed window).
        burst: the most it holds: the upstream's limit, or a fixed window's supply.
        lapses_at: when a fixed window's mirror ends; None for a bucket mirror.
    """

    level: float
    rate: float
    burst: float
    lapses_at: float | None


@dataclass(frozen=True, slots=True)
class GateStatistics:
    """A snapshot of a bucket gate.

    Attributes:
        per_minute: the configured rate.
        burst: the most the bucket holds.
        level: what it holds now (negative while in debt).
        waiters: tasks waiting to take from it.
        mirror: the upstream's bucket as learnt from its headers, None until it said.
    """

    per_minute: float
    burst: float
    level: float
    waiters: int
    mirror: MirrorStatistics | None


@dataclass(frozen=True, slots=True)
class TokenGateStatistics(GateStatistics):
    """A snapshot of a ``TokenGate``: a bucket gate plus its open reservations.

    Attributes:
        open_reservations: reservations neither reconciled nor cancelled yet.
        reserved: the sum of their estimates.
    """

    open_reservations: int
    reserved: int


class _BucketGate:
    """The waiting mechanism shared by RateGate and TokenGate: FIFO futures, one timer.

    ``_wake`` is the only place that grants: it serves the head while the bucket allows,
    then arms one timer for the moment the head can go. Anything that changes the bucket
    (a refund, a charge, a new rate, a sync, a cancelled head) calls it again.
    """

    __slots__ = ("_bucket", "_burst_option", "_per_minute", "_timer", "_waiters")

    def __init__(self, *, per_minute: float, burst: float | None = None) -> None:
        self._per_minute = per_minute = _check_positive("per_minute", per_minute)
        self._burst_option = None if burst is None else _check_positive("burst", burst)
        self._bucket = TokenBucket(
            rate=per_minute / 60, burst=self._burst_for(per_minute), now=-math.inf
        )
        self._waiters: deque[tuple[asyncio.Future[None], float]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def _burst_for(self, per_minute: float) -> float:
        # One second's worth by default: upstreams enforce per-minute limits over shorter
        # spans (OpenAI says so), so a minute's worth at once would be refused.
        if self._burst_option is not None:
            return self._burst_option
        return max(1.0, per_minute / 60)

    @property
    def per_minute(self) -> float:
        """The rate, in units per minute. Assigning keeps the level and wakes waiters.

        Without an explicit ``burst``, the burst follows the rate (one second's worth);
        a level above a smaller new burst is cut to it.

        Raises:
            ValueError: on assignment, not a finite number greater than 0.
        """
        return self._per_minute

    @per_minute.setter
    def per_minute(self, value: float) -> None:
        value = _check_positive("per_minute", value)
        self._bucket.configure(rate=value / 60, burst=self._burst_for(value), now=self._now())
        self._per_minute = value
        self._wake()

    def reconfigure(self, *, per_minute: float, burst: float | None) -> None:
        """Change the rate and the burst together (None: the default, one second's worth).

        The level earned so far is kept, capped at the new burst; waiters are woken.

        Raises:
            ValueError: ``per_minute`` or ``burst`` not a finite number greater than 0.
        """
        per_minute = _check_positive("per_minute", per_minute)
        self._burst_option = None if burst is None else _check_positive("burst", burst)
        self._bucket.configure(
            rate=per_minute / 60, burst=self._burst_for(per_minute), now=self._now()
        )
        self._per_minute = per_minute
        self._wake()

    def time_until(self, amount: float = 1) -> float:
        """Seconds until the bucket holds ``amount`` (ignoring waiters ahead), 0 if now.

        Raises:
            ValueError: ``amount`` is negative or not finite.
        """
        return self._bucket.time_until(amount, self._now())

    @property
    def taken(self) -> float:
        """Every unit taken so far: the mark for ``sync`` (see ``TokenBucket.taken``)."""
        return self._bucket._taken  # read for every request: no second property

    def mirror_ample(self) -> bool:
        """Whether the mirror of the upstream's bucket, if any, is at least half full."""
        return self._bucket.mirror_ample()

    def mirror_bounds(self) -> bool:
        """Whether a mirror of the upstream's bucket keeps our sends within it (see
        ``TokenBucket.mirror_bounds``)."""
        return self._bucket.mirror_bounds()

    def mirror_vouches(self, rate: float) -> bool | None:
        """What the mirror says of sending at ``rate``; see ``TokenBucket.mirror_vouches``."""
        return self._bucket.mirror_vouches(rate, self._now())

    @property
    def mirror_level(self) -> float | None:
        """The mirror's level as of the last take or settle (None: no mirror): read it
        right after a grant, it is where the mirror stood then (``sync``'s ``sent_level``)."""
        bucket = self._bucket
        return None if bucket._mirror_burst is None else bucket._mirror_level

    @property
    def mirror_rate(self) -> float | None:
        """The refill rate of the mirror of the upstream's bucket (None: no mirror, a fixed
        window's, or one that has learnt no rate)."""
        bucket = self._bucket
        if bucket._mirror_burst is None or bucket._mirror_until != math.inf:
            return None
        return bucket._mirror_rate or None

    def at_least(self, rate: float) -> None:
        """The upstream refilled at least ``rate`` units a second; see ``TokenBucket.at_least``."""
        if self._bucket.at_least(rate, self._now()):
            self._wake()

    def probe(self, sending: float) -> None:
        """Raise an unverified mirror's rate; see ``TokenBucket.probe``."""
        if self._bucket.probe(sending, self._now()):
            self._wake()

    def probe_refuted(self) -> None:
        """A refusal at the door refutes the last probe; see ``TokenBucket.probe_refuted``."""
        self._bucket.probe_refuted(self._now())

    def drain(self) -> None:
        """Spend the burst earned so far (the mirror keeps its level): the next units go
        one by one at the rate, none at once."""
        self._bucket.drain(self._now())

    def hold_back(self, seconds: float) -> None:
        """Keep ``seconds`` of the upstream's refill unspent; see ``TokenBucket.hold_back``.

        Raises:
            ValueError: ``seconds`` is negative or not finite.
        """
        self._bucket.hold_back(seconds)
        self._wake()

    def sync(
        self,
        *,
        remaining: float,
        reset_after: float | None,
        limit: float | None = None,
        sent_mark: float | None = None,
        sent_age: float = 0.0,
        sent_level: float | None = None,
        lag: float = 0.0,
    ) -> None:
        """Fold the upstream's rate-limit headers into the mirror; see ``TokenBucket.sync``.

        Waiters are looked at again on the next turn of the loop, once the caller has
        settled the request whose reply carried the headers.

        Raises:
            ValueError: ``reset_after`` or ``lag`` negative or not finite; ``limit`` not > 0.
        """
        self._bucket.sync(
            remaining=remaining,
            reset_after=reset_after,
            limit=limit,
            now=self._now(),
            sent_mark=sent_mark,
            sent_age=sent_age,
            sent_level=sent_level,
            lag=lag,
        )
        if self._waiters:
            asyncio.get_running_loop().call_soon(self._wake)

    def _now(self) -> float:
        return _loop_time(self._bucket._stamp)  # on every settle: no property

    def _try_take(self, amount: float) -> bool:
        return self._take_if_free(_check_amount("amount", amount), self._now())

    def _take_if_free(self, amount: float, now: float) -> bool:
        # FIFO: a newcomer may not pass tasks already waiting, even if it would fit.
        if self._waiters or self._bucket._wait_for(amount, now) > 0:
            return False
        self._bucket._remove(amount, now)  # settled at ``now`` by ``_wait_for``
        return True

    async def _take(self, amount: float) -> None:
        if self._try_take(amount):
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((fut, amount))
        self._wake()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Granted, then cancelled before it could run: it sends nothing, so the
                # units go back and the next waiter may use them.
                self._bucket.refund(amount, loop.time())
            self._wake()
            raise

    def _wake(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters = self._waiters
        while waiters and waiters[0][0].done():
            waiters.popleft()
        if not waiters:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        while waiters:
            fut, amount = waiters[0]
            if not fut.done():
                wait = self._bucket.time_until(amount, now)
                if wait > _TIMER_SLACK:
                    self._timer = loop.call_at(now + wait, self._wake)
                    return
                self._bucket.take(amount, now)
                fut.set_result(None)
            waiters.popleft()

    def _waiting(self) -> int:
        return sum(1 for fut, _ in self._waiters if not fut.done())

    def _snapshot(self) -> GateStatistics:
        now = self._now()
        return GateStatistics(
            per_minute=self.per_minute,
            burst=self._bucket.burst,
            level=self._bucket.level(now),
            waiters=self._waiting(),
            mirror=self._bucket.mirror(now),
        )

    def _state(self) -> str:
        stats = self._snapshot()
        mirror = ""
        if stats.mirror is not None:
            lapse = stats.mirror.lapses_at
            mirror = (
                f" mirror={stats.mirror.level:.3f}/{stats.mirror.burst:g}"
                f"@{stats.mirror.rate:g}/s"
                + ("" if lapse is None else f" until={lapse:.3f}")
            )
        return (
            f"per_minute={stats.per_minute:g} level={stats.level:.3f}/{stats.burst:g} "
            f"waiters={stats.waiters}{mirror}"
        )


class RateGate(_BucketGate):
    """Requests per minute: the head of the queue takes one unit per request it sends.

    A token bucket refilling at ``per_minute / 60`` per second, holding up to ``burst``.
    Waiters are served first come, first served, and a cancelled waiter takes nothing.
    It is not a concurrency limit: a request that has been sent gives nothing back.

    Args:
        per_minute: requests per minute (assignable later; waiters are woken).
        burst: the most that may go at once; default one second's worth, at least 1.

    Raises:
        ValueError: ``per_minute`` or ``burst`` is not a finite number greater than 0.
    """

    __slots__ = ()

    async def acquire(self, amount: float = 1) -> None:
        """Wait until ``amount`` requests' worth is available, then take it.

        Raises:
            ValueError: ``amount`` is negative or not finite.
        """
        await self._take(amount)

    def try_acquire(self, amount: float = 1) -> bool:
        """Take ``amount`` if it is available now and nobody is waiting; else False.

        Raises:
            ValueError: ``amount`` is negative or not finite.
        """
        return self._try_take(amount)

    def _try_acquire_at(self, now: float) -> bool:
        """``try_acquire()`` at ``now``, the loop's time the caller has read already.

        For the Shaper's fast path, which reads the clock once per request.
        """
        return self._take_if_free(1.0, now)

    def statistics(self) -> GateStatistics:
        """A snapshot of the live state."""
        return self._snapshot()

    def __repr__(self) -> str:
        return f"<RateGate {self._state()}>"


class Reservation:
    """Tokens set aside for one request, to be settled once with what it really used.

    It ends exactly once: ``reconcile`` when the reply's usage is known, or ``cancel``
    when the request never reached the upstream. Ending it twice is a bug and raises.
    """

    __slots__ = ("_actual", "_ended", "_gate", "estimate")

    def __init__(self, gate: TokenGate, estimate: int) -> None:
        self._gate = gate
        self.estimate = estimate
        self._actual: int | None = None
        self._ended = False

    @property
    def ended(self) -> bool:
        """Whether it has been reconciled or cancelled."""
        return self._ended

    @property
    def actual(self) -> int | None:
        """The usage it was reconciled with; None while open or if it was cancelled."""
        return self._actual

    def reconcile(self, actual: int) -> None:
        """Settle with the real usage: refund what was over-estimated, charge the rest.

        A charge may push the bucket into debt; later reservations then wait longer.

        Raises:
            RuntimeError: the reservation has already ended.
            ValueError: ``actual`` is negative.
            TypeError: ``actual`` is not an integer.
        """
        actual = _check_tokens("actual", actual)
        self._end()
        self._actual = actual
        self._gate._settle(self.estimate, actual)

    def cancel(self) -> None:
        """Give every reserved token back: the request was never sent.

        Raises:
            RuntimeError: the reservation has already ended.
        """
        self._end()
        self._gate._settle(self.estimate, 0)

    def _end(self) -> None:
        if self._ended:
            raise RuntimeError(
                "This reservation has already been reconciled or cancelled; "
                "each reservation ends exactly once."
            )
        self._ended = True

    def __repr__(self) -> str:
        if not self._ended:
            state = "open"
        elif self._actual is None:
            state = "cancelled"
        else:
            state = f"reconciled actual={self._actual}"
        return f"<Reservation estimate={self.estimate} {state}>"


def _check_tokens(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer number of tokens, not {value!r}.")
    if value < 0:
        raise ValueError(f"{name} must be at least 0 tokens, not {value}.")
    return value


class TokenGate(_BucketGate):
    """Tokens per minute, with reservations settled after the fact.

    Before sending, the head of the queue reserves its estimate (prompt tokens plus the
    ``max_tokens`` it asked for, say); after the reply it reconciles with the ``usage``
    the upstream reported. Reserving first keeps concurrent requests from overshooting
    the limit together; reconciling keeps the bucket honest. An estimate larger than
    ``burst`` waits until the bucket is full and then goes into debt.

    Args:
        per_minute: tokens per minute (assignable later; waiters are woken).
        burst: the most that may be reserved at once; default one second's worth.

    Raises:
        ValueError: ``per_minute`` or ``burst`` is not a finite number greater than 0.
    """

    __slots__ = ("_open", "_reserved")

    def __init__(self, *, per_minute: float, burst: float | None = None) -> None:
        super().__init__(per_minute=per_minute, burst=burst)
        self._open = 0
        self._reserved = 0

    async def reserve(self, estimate: int) -> Reservation:
        """Wait until ``estimate`` tokens are available and set them aside.

        Raises:
            ValueError: ``estimate`` is negative.
            TypeError: ``estimate`` is not an integer.
        """
        await self._take(_check_tokens("estimate", estimate))
        return self._open_reservation(estimate)

    def reserve_nowait(self, estimate: int) -> Reservation:
        """Set ``estimate`` tokens aside if that needs no wait.

        Raises:
            WouldBlock: the tokens are not available now, or others are waiting.
            ValueError: ``estimate`` is negative.
            TypeError: ``estimate`` is not an integer.
        """
        if not self._try_take(_check_tokens("estimate", estimate)):
            raise WouldBlock(
                f"Reserving {estimate} tokens would wait "
                f"{self.time_until(estimate):.3f} s or more."
            )
        return self._open_reservation(estimate)

    def _try_reserve_at(self, estimate: int, now: float) -> Reservation | None:
        """``reserve_nowait`` for a token count known to be valid, at ``now``; None: blocked.

        For the Shaper's fast path (its tickets' costs are checked when they are made).
        """
        if not self._take_if_free(estimate, now):
            return None
        return self._open_reservation(estimate)

    def statistics(self) -> TokenGateStatistics:
        """A snapshot of the live state."""
        base = self._snapshot()
        return TokenGateStatistics(
            per_minute=base.per_minute,
            burst=base.burst,
            level=base.level,
            waiters=base.waiters,
            mirror=base.mirror,
            open_reservations=self._open,
            reserved=self._reserved,
        )

    def _open_reservation(self, estimate: int) -> Reservation:
        self._open += 1
        self._reserved += estimate
        return Reservation(self, estimate)

    def _settle(self, estimate: int, actual: int) -> None:
        self._open -= 1
        self._reserved -= estimate
        now = self._now()
        if actual < estimate:
            self._bucket._credit(estimate - actual, now)
        elif actual > estimate:
            self._bucket._debit(actual - estimate, now)
        self._wake()

    def __repr__(self) -> str:
        return (
            f"<TokenGate {self._state()} open_reservations={self._open} "
            f"reserved={self._reserved}>"
        )


@dataclass(frozen=True, slots=True)
class CooldownStatistics:
    """A snapshot of a ``CooldownGate``.

    Attributes:
        closed_until: the loop time it opens at, or None while open.
        waiters: tasks still waiting (including those whose jitter has not run out).
        closures: how many times it closed from open (extensions are not counted).
        probing: the closure may end early: a probe may pass, or one is out.
        probe_at: when the next probe may pass (None: none may, or one is out).
        probes: probes passed so far; reopened: closures ended early by a probe.
    """

    closed_until: float | None
    waiters: int
    closures: int
    probing: bool = False
    probe_at: float | None = None
    probes: int = 0
    reopened: int = 0


class CooldownGate:
    """The fleet-wide pause: "the upstream said wait N seconds", so everyone waits.

    Two ways to close it:

    - ``close_until(t)`` shuts it until the absolute loop time ``t``, to be honoured in
      full (an upstream that punishes early sends, a quota known to be gone).
    - ``hold(t, probe_at=p)`` shuts it until ``t`` at most, but treats ``t`` as a hint:
      from ``p`` on, one caller of ``wait`` passes as a *probe*. The probe's answer is
      the evidence: ``reopen()`` when it succeeded (the window was overstated, as a
      whole-second Retry-After over a bucket refilling every few ms is), another
      ``hold`` with a later ``probe_at`` when it was refused, ``probe_lost()`` when it
      ended with no answer (the next may go at once).

    While shut the gate only ever moves later (a shorter Retry-After does not cut the
    pause short; only a probe's success does). Each plain waiter draws a jitter in
    ``[0, ramp)`` and wakes at ``closed_until + jitter``, so the fleet comes back over a
    ramp instead of in one stampede; a dispatcher passing for many spaces its passes
    instead (``spread``). Waiting holds nothing, so cancelling a waiter needs no clean-up
    beyond forgetting it.

    Args:
        ramp: seconds over which waiters are spread after the gate opens (0: no jitter).
        rng: the jitter's source; pass a seeded ``random.Random`` for determinism.

    Raises:
        ValueError: ``ramp`` is negative or not finite.
    """

    __slots__ = (
        "_closed_at",
        "_closures",
        "_first_pass",
        "_generation",
        "_heap",
        "_lead",
        "_order",
        "_passes",
        "_probe_at",
        "_probe_out",
        "_probes",
        "_ramp",
        "_reopened",
        "_rng",
        "_sleepers",
        "_timer",
        "_until",
    )

    def __init__(self, *, ramp: float = 1.0, rng: random.Random | None = None) -> None:
        self._ramp = _check_amount("ramp", ramp)
        self._rng = rng if rng is not None else random.Random()
        self._until = -math.inf
        self._closed_at = -math.inf  # when the current (or last) closure began
        self._closures = 0
        self._passes = 0  # spread passes since the last reopening
        self._first_pass = -math.inf
        self._lead = 0.0  # seconds the first pass after the closure goes alone
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        # Probing: the next probe may pass at _probe_at (inf: none may); _probe_out while
        # one is out; _generation names the closure a probe belongs to.
        self._probe_at = math.inf
        self._probe_out = False
        self._generation = 0
        self._probes = 0
        self._reopened = 0
        self._sleepers: list[asyncio.Future[None]] = []  # waiters to tell of a change

    @property
    def ramp(self) -> float:
        """Seconds over which waiters are spread after the gate opens."""
        return self._ramp

    @property
    def closed_until(self) -> float | None:
        """The loop time the gate opens at, or None if it is open."""
        return self._until if not self.is_open() else None

    @property
    def probing(self) -> bool:
        """Whether the current closure may end early on a probe's evidence."""
        return not self.is_open() and (self._probe_out or self._probe_at < math.inf)

    @property
    def probe_out(self) -> bool:
        """Whether a probe has passed and its answer is awaited."""
        return self._probe_out and not self.is_open()

    @property
    def probes(self) -> int:
        """Probes passed so far (the number of the last one)."""
        return self._probes

    @property
    def generation(self) -> int:
        """Counts closures from open; a probe belongs to the one it passed in."""
        return self._generation

    def is_open(self, now: float | None = None) -> bool:
        """Whether a newcomer would pass at once (at ``now``, default the loop's time)."""
        if now is None:
            now = _loop_time(-math.inf)
        return now + _TIMER_SLACK >= self._until

    def remaining(self, now: float | None = None) -> float:
        """Seconds until the gate opens (0 if open), at ``now``, default the loop's time."""
        if now is None:
            now = _loop_time(-math.inf)
        left = self._until - now
        return left if left > 0.0 else 0.0  # max(0.0, left): asked for every request

    def close_until(self, t: float, *, lead: float = 0.0) -> None:
        """Close the gate until loop time ``t``, honoured in full: no probe passes.

        A time no later than the current closure's end, or than now, only ends probing.
        With ``lead``, a dispatcher's first pass after the opening goes alone, ``lead``
        seconds ahead of the next: time for its refusal, if it gets one, to close the
        gate again before anything follows it.

        Raises:
            ValueError: ``t`` is not finite, or ``lead`` is negative or not finite.
        """
        t = _check_time(t)
        self._lead = _check_amount("lead", lead)
        now = _loop_time(-math.inf)
        self._probe_at = math.inf
        self._probe_out = False
        self._extend(t, now)

    def hold(self, t: float, *, probe_at: float | None, lead: float = 0.0) -> None:
        """Close the gate until ``t`` at most; from ``probe_at`` one probe may pass.

        Extends the closure like ``close_until`` (never earlier), and sets when the next
        probe may pass (a probe out is then forgotten: its answer is not awaited).
        ``probe_at=None`` only extends, leaving the probing as it is (a closure honoured
        in full stays so). ``lead`` as for ``close_until``, should the closure end
        without a probe's success.

        Raises:
            ValueError: ``t`` or ``probe_at`` is not finite, or ``lead`` negative or not
                finite.
        """
        t = _check_time(t)
        lead = _check_amount("lead", lead)
        now = _loop_time(-math.inf)
        self._extend(t, now)
        if probe_at is None or self.is_open(now):
            return
        self._lead = lead
        self._probe_at = min(_check_time(probe_at), self._until)
        self._probe_out = False
        self._poke()

    def reopen(self) -> None:
        """Open the gate now: a probe got through, so the closure overstated the wait.

        Waiters resume as after any opening (jitter, spread over the ramp).
        """
        now = _loop_time(-math.inf)
        if self.is_open(now):
            return
        self._until = now
        self._probe_at = math.inf
        self._probe_out = False
        self._lead = 0.0
        self._reopened += 1
        self._arm()
        self._poke()

    def probe_lost(self, generation: int) -> None:
        """The probe of closure ``generation`` ended with no answer: the next may go now."""
        if generation != self._generation or not self._probe_out:
            return
        self._probe_out = False
        self._probe_at = _loop_time(-math.inf)
        self._poke()

    def _extend(self, t: float, now: float) -> None:
        if t <= self._until or t <= now:
            return
        if now >= self._until:
            self._closures += 1
            self._generation += 1
            self._passes = 0
            self._closed_at = now
        self._until = float(t)
        self._arm()
        self._poke()

    def settled(self, now: float) -> bool:
        """Open, and past the ramp that follows a reopening: nothing to spread any more."""
        # Asked for every request: past the longest ramp and lead, no need to work out
        # the one that applies (``_settling`` is at most their maximum).
        ramp, lead = self._ramp, self._lead
        if now + _TIMER_SLACK >= self._until + (lead if lead > ramp else ramp):
            return True
        return now + _TIMER_SLACK >= self._until + self._settling()

    def _settling(self) -> float:
        """Seconds after the opening until the gate is settled: the ramp, or the lead."""
        return max(self._spread_ramp(), self._lead)

    async def wait(self, *, spread: int = 1) -> int:
        """Return at once if the gate is open; else wait until it opens, or pass as a probe.

        Args:
            spread: for one task that passes on behalf of many (a dispatcher): after an
                opening, its passes are spaced evenly, ``spread`` of them over the ramp,
                counted from its first pass, and it draws no jitter of its own; 1
                (default) spaces nothing.

        Returns:
            0 when the gate was open; else the closure's ``generation``: the caller is
            its probe, and must end in ``reopen``, ``hold`` or ``probe_lost``.
        """
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            # An early timer (clock resolution) counts as on time: no re-arming forever.
            if not self.is_open(now):
                if not self._probe_out and now + _TIMER_SLACK >= self._probe_at:
                    self._probe_out = True
                    self._probe_at = math.inf
                    self._probes += 1
                    return self._generation
                if spread > 1 or (self._probe_at < math.inf and not self._probe_out):
                    await self._sleep(loop, min(self._until, self._probe_at))
                else:
                    await self._wait_open(loop)
                continue
            if spread <= 1 or self.settled(now):
                return 0
            if self._passes == 0:
                self._first_pass = now
            slot = self._first_pass + self._spread_ramp() * self._passes / spread
            if self._passes:
                slot = max(slot, self._first_pass + self._lead)
            if slot <= now + _TIMER_SLACK:
                self._passes += 1
                return 0
            # Then look again (it may have closed meanwhile); the ramp's end frees all.
            await self._sleep(loop, min(slot, self._until + self._settling()))

    def _spread_ramp(self) -> float:
        """The ramp a dispatcher's passes are spread over after the last closure.

        No longer than the closure lasted: a pause of 50 ms ended by a probe built up
        50 ms of work, not a second's worth.
        """
        return min(self._ramp, max(0.0, self._until - self._closed_at))

    async def _sleep(self, loop: asyncio.AbstractEventLoop, until: float) -> None:
        """Sleep until ``until`` or the next change of the gate, whichever comes first."""
        fut: asyncio.Future[None] = loop.create_future()
        self._sleepers.append(fut)
        timer = loop.call_at(until, _resolve, fut) if until < math.inf else None
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            with contextlib.suppress(ValueError):
                self._sleepers.remove(fut)

    def _poke(self) -> None:
        """The gate changed: every waiter looks again (a plain one redraws its jitter)."""
        sleepers, self._sleepers = self._sleepers, []
        for fut in sleepers:
            _resolve(fut)
        if self._heap:
            for _, _, fut in self._heap:
                _resolve(fut)
            self._heap.clear()
            self._arm()

    async def _wait_open(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop.time() >= self._until:
            return
        fut: asyncio.Future[None] = loop.create_future()
        jitter = self._rng.random() * self._ramp
        heapq.heappush(self._heap, (jitter, next(self._order), fut))
        self._arm()
        try:
            await fut
        except asyncio.CancelledError:
            self._arm()
            raise

    def statistics(self) -> CooldownStatistics:
        """A snapshot of the live state."""
        probe_at = self._probe_at
        return CooldownStatistics(
            closed_until=self.closed_until,
            waiters=sum(1 for _, _, fut in self._heap if not fut.done()) + len(self._sleepers),
            closures=self._closures,
            probing=self.probing,
            probe_at=probe_at if probe_at < math.inf and not self.is_open() else None,
            probes=self._probes,
            reopened=self._reopened,
        )

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        heap = self._heap
        while heap and heap[0][2].done():
            heapq.heappop(heap)
        if heap:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(self._until + heap[0][0], self._release)

    def _release(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        heap = self._heap
        while heap and self._until + heap[0][0] <= now + _TIMER_SLACK:
            _, _, fut = heapq.heappop(heap)
            if not fut.done():
                fut.set_result(None)
        self._arm()

    def __repr__(self) -> str:
        stats = self.statistics()
        state = (
            "open" if stats.closed_until is None else f"closed_until={stats.closed_until:.3f}"
        )
        probing = " probing" if stats.probing else ""
        return (
            f"<CooldownGate {state}{probing} ramp={self._ramp:g} waiters={stats.waiters} "
            f"closures={stats.closures}>"
        )


def _check_time(t: float) -> float:
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise ValueError(f"A cooldown needs a finite loop time, not {t!r}.")
    return float(t)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

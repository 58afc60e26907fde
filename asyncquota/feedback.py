"""Feedback: what each reply teaches the cooldown, the pace and the mirrors of the upstream.

Every signal an upstream sends about its limits is a hint, worded in its own dialect and
rounded to its own granularity; evidence decides. The reply path hands each answered
attempt to :class:`Feedback`, which turns it into three controls:

- **The cooldown** (``CooldownGate``). A congestion reply's Retry-After is about the
  request that got it: "1" in whole seconds over a bucket that refills every few
  milliseconds overstates the wait up to 100×. So a Retry-After *holds* the fleet and
  sends one probe early (``PROBE_FIRST`` after the 429, then twice as long after each
  refused probe); the probe's success reopens the gate (the sends resume spread at the
  pace, not in a burst: the probe found one unit), its refusal keeps it shut. Only
  on an upstream seen to punish early sends (a probe, or any request sent inside a
  stated window, refused with a window provably later than that one: the window grew
  because we knocked) is every window honoured in full, from then on.
- **The pace** (:class:`Pace`): a requests-per-second ceiling learnt from congestion
  alone, for upstreams whose 429s come back at once (a concurrency window bounds nothing
  then) or whose headers mislead. A congestion episode cuts it by a tenth (the first
  one from the rate we were sending at), never from above what the upstream accepted
  over the last seconds (``PACE_ACCEPTED_WINDOW``); while it binds and nothing is
  refused it grows, quickly back towards the level last found too high, then beyond it
  by a little a step on a plateau (``PACE_PLATEAU``: a burst may hide an overshoot),
  and faster while nothing pushes back, so capacity that returns is found in seconds.
  Refusals whose body names a concurrency cap teach it nothing (``refusal``); nearly
  every send of the last fifth of a second refused with no Retry-After (``swamped``)
  holds the cooldown and probes, as a starved upstream does, rather than cutting a
  tenth at a time while every send digs a debt where refusals count.
  Successes clock that growth; while none has come back for a step (replies that take
  seconds), the sends do, the door's silence vouching for the pace: back towards the
  level last found too high, and past it by ``PACE_SILENT_GROWTH`` a step, never
  speeding up. Only a success sent
  under the current pace (``PACE_CONFIRMS``), or one with a mirror keeping the sends
  within the upstream's bucket or standing full at a rate the pace is under, speeds the
  growth up. While a request mirror refilling slower than the pace stands under half,
  the pace does not grow at all: the sends are already outrunning what the upstream
  said it refills.
- **The mirrors** of the upstream's buckets (``TokenBucket.sync``): every read of the
  rate-limit headers re-anchors them at ``remaining`` less what was sent since the
  request went out, up or down, so a wrong learnt rate or level costs one reply. A
  request mirror no reading has checked for a while is probed upwards while the door
  stays silent (``TokenBucket.probe``).

Pure parts take ``now``; nothing here waits (a probe's silence is timed by one
``call_at``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal, Protocol

from .gates import CooldownGate, RateGate, TokenGate
from .signals import QuotaSnapshot, RetryAfterForm, names_concurrency
from .signals import parse_rate_limit_headers as _parse_quota
from .upstream_clock import UpstreamClock
from .window import SlidingCount

if TYPE_CHECKING:
    from .sharing import Fleet

__all__ = [
    "AMPLE_READ_INTERVAL",
    "PROBE_FIRST",
    "PROBE_SILENCE",
    "Feedback",
    "Pace",
    "Refusal",
]

PROBE_FIRST = 0.01
"""Seconds from a Retry-After's 429 to the first probe (then doubling per refusal): about
one unit of a bucket refilling at 100 a second."""

PROBE_SILENCE = 3.0
"""A probe not refused within this many smoothed refusal times was let in."""

PROBE_SILENCE_MIN = 0.01
"""The shortest such wait (seconds): refusals over loopback take well under it."""

PUNISHED_MARGIN = 0.02
"""On an upstream that punishes early sends, a window is honoured this share beyond its
end (and at least ``PUNISHED_MARGIN_MIN`` seconds): our clock and its differ, and a send
on its last millisecond costs a whole extension."""

PUNISHED_MARGIN_MIN = 0.005

PUNISHED_GROWTH = 0.5
"""Seconds by which a window must have grown past the one stated before, for a request
sent inside that one (a knock), to count towards proof that the upstream punishes early
sends (beyond the stated values' resolution; values in ms only). A bucket's window moves
by a unit's refill per refusal counted against it (10 ms at 100 a second); a punishing
upstream's by a second or more per send. Sends land inside a window they did not know of
when the upstream or our loop is held up for a few ms: the matrix's row 18 in real time
saw 3-7 sends, 3 ms apart, inside a window of 5-10 ms, each adding a second. Learnt from
them, no probe buys another second to learn it."""

PUNISHED_KNOCKS = 2
"""Knocks (``PUNISHED_GROWTH``) that prove punishment, with no success in between for a
request sent inside a stated window. One is not enough: an upstream that states windows
at random (0.05-1 s, and serves most requests sent inside them) knocked once now and
then, and taken for a punishing one its every window was honoured in full, the pace
careful: a third of the requests served. One knock's own window is honoured in full,
though: a probe inside it would buy it another second (the real-time row 14 and 18 lost
2 s so, one knock and then the probe that proved punishment)."""

PUNISHED_RESERVE = 0.1
"""On an upstream that punishes early sends, the seconds of its refill our mirrors keep
unspent (at most half the bucket). A send that finds the bucket empty costs everyone a
second or more, and sends timed one by one reach the upstream in clumps (a loop busy for
30 ms let 15 writes out within 2 ms, all refused, each extending the window by a second:
the real-time penalty rows lost 10 s at once). The reserve costs its units once, not the
rate."""

PUNISHED_SPREAD = 2.0
"""On an upstream that punishes, with no pace but a mirror of its bucket, the sends go one
by one at no more than this many times the mirror's refill. A mirror is a close estimate,
not the upstream's ledger, and its room spent at the speed of demand leaves the first
refusal no time to come back before the next sends are inside its window: in the
real-time matrix's row 9, a long reply's reading of 59 left let 23 sends out within 6 ms
into a bucket that held far fewer, and the last 5, refused within 4 ms of each other,
bought 5 s of penalty. At twice the refill a full bucket is still spent within a second
or two, and the sends are not held under the quota where the mirror's rate is read off a
bucket's ``limit``: a lower bound of the refill, and at least half of it with resets
rounded up to the second. A per-minute ``limit`` over a second's bucket reads a rate far
above the refill (row 14: 124 to 29 986 a second over one night, for 100 and then 200),
and then the spread binds nothing."""

PUNISHED_DRIFT = 0.01
"""How much later, per refused probe, than the closure's first stated end a whole-second
window may end (beyond its rounding) without proving that our probes extend it: a refusal
that counts against the quota moves a window by a unit's refill (10 ms at 100 a second),
and a whole-second upstream wrongly taken for a punishing one would be honoured in full
for good (a second for a few milliseconds' wait). A value in milliseconds is taken at its
word."""

READING_LAG_MIN = 0.005
"""The least time (seconds) a reply's reading is taken to have spent reaching us: what we
took over it may not be counted in the reading (``TokenBucket.sync``'s ``lag``). Refusals
at the door measure how long an exchange with the upstream takes; until they do, this."""

REFUSAL_GAIN = 0.125
"""Weight of each new congestion reply's time in the smoothed refusal time."""

AMPLE_READ_INTERVAL = 0.05
"""While the upstream says at least half of each quota is left and our mirrors agree, its
rate-limit headers are read in full at most this often (seconds); the other successful
replies only have their ``remaining`` counts glanced at. A reply showing less than half,
and every error reply, is always read in full."""

PACE_BETA = 0.9
"""A congestion episode cuts the pace to this share of itself (at the first, of the rate
we were sending at over the last ``PACE_WINDOW`` seconds). Measuring what the upstream
accepted instead errs low whenever we sent little (a hold, a lull), and a rate cut too
low is only found again slowly."""

PACE_WINDOW = 1.0
"""Seconds of sends and refusals behind the sending rate and the refused share."""

PACE_ACCEPTED_WINDOW = 5.0
"""Seconds of sends and refusals behind the accepted rate that bounds a cut (see
``Pace.congested``). A rate refused after a bucket's burst ran out is above the refill by
whatever drained it, and a tenth off it was still above (the matrix's rows 17 and 20,
no headers, refusals counted: cut after cut down to 0.7 of the quota, every 5-10 s).
What the upstream accepted over this window overstates its refill by at most its burst
spread over the window: a fifth, for a burst of a second's refill."""

PACE_GAP = 0.1
"""Seconds without a send that break a window of sending (a hold, a lull): the sending
rate is measured only over a whole window sent without such a break."""

PACE_TOLERANCE = 0.03
"""Share of the sends over the last window that may be refused without a cut: sporadic
429s (a noisy upstream) are borne, a wall of them is not (AIMD's drop tolerance)."""

AT_THE_DOOR = 0.5
"""A congestion reply faster than this share of the smoothed reply time was refused at the
door, by a rate limiter: only those teach the pace. A slower one (a 429 or 503 after the
request was worked on) is the concurrency limit's signal."""

PACE_CUT_SPACING = 0.1
"""Seconds at least between two cuts: a wall of 429s answered at once is one episode."""

PACE_STARVED = 0.75
"""Share of the sends over the last window refused from which the upstream is starved:
no rate would do, only a pause (a probing hold of the cooldown)."""

SWAMP_WINDOW = 0.2
"""Seconds over which nearly every send refused (``PACE_STARVED``) says the upstream's
bucket is empty right now (``Pace.swamped``): a second's window still holds the second
of successes before the wall. Where refusals count against the quota, each further send
at the rate that emptied it digs a debt that refuses everything after it (the matrix's
row 20: 0.5 s of sends all refused, 61 refusals, while cut after cut came down a tenth
at a time)."""

PACE_MIN_REFUSED = 3
"""Refusals at the door over the last window below which the pace is neither cut nor the
upstream called starved: a few are chance, not a rate."""

STARVED_HOLD = 1.0
"""Seconds a starved upstream is held for when it stated no Retry-After (probes may end
it early; refused ones extend it)."""

STARVED_PROBE = 0.1
"""The first probe of a starved upstream, seconds after the hold began (then twice as
far apart per refusal). Later than a Retry-After's first probe: nothing says the window
is short, and an upstream that extends its window for every send inside it charges each
refused probe (a second each, in the matrix's penalty rows)."""

PACE_BURST = 0.05
"""Seconds of the pace that may go at once (the rest is spread at the pace)."""

PACE_STEP = 0.5
"""Seconds between two looks at whether the pace may grow."""

PACE_FIRST_GROWTH = 0.04
"""The first step beyond the level last found too high; it doubles each step nothing
pushes back."""

PACE_SILENT_GROWTH = 0.06
"""The step of growth beyond the level last found too high while only the door's silence
vouches for the pace (no reply has come back for a step: answers of 5-30 s). It never
speeds up, the upstream's bucket hiding an overshoot until it is empty. At 4 %, a
capacity that halved and came back (50 to 100 a second) was found in 10-11 s, costing the
matrix's row 18 four to six percent of its night (virtual, seed 3: 0.939); at 6 %, in 6-7
s (0.973), its 429s 0.9-1.8 % over seeds 0-5 against 0.9-1.6 %. At 8 % they reached 2.0 %."""

PACE_CONFIRMS = 2.0
"""A success confirms the pace (its growth may speed up) only if its reply took at most
this many steps, or a mirror of the upstream's bucket (its rate-limit headers) keeps the
sends within it. A streamed answer 20 s long vouches for the pace of 20 s ago: taken as
word for the current one where nothing else holds the sends, it sped the growth to a
quarter a step, past the quota while the upstream's bucket hid the overshoot (the
matrix's row 18, virtual: 2.0-2.6 % of 429s; 1.5-1.6 % since). A mirror that refills at
least at the pace and stands full (``RateGate.mirror_vouches``) confirms it too: every
reading says the upstream's bucket is full while we send at the pace, so the pace is
under what it takes. Without that, a capacity that returned over replies of 5-30 s was
found at 4 % a step, the door's silence alone (50 to 100 a second in 9 s, the matrix's
row 2, with readings of a full bucket all along)."""

PACE_STEADY = 1.25
"""The most the last window's sending rate may exceed the accepted window's for the
accepted rate to bound a cut: beyond, the sends were climbing, and the accepted window's
first seconds, sent under the refill, say nothing of it (a capacity that returned, found
at 1.7 times the rate of five seconds before, was cut to 0.85 of it). Both rates are over
the time we sent (``PACE_HELD_BURST``): a hold is no climb."""

PACE_HELD_BURST = 1.0
"""Seconds of refill an upstream's bucket is taken to store while we send nothing (a
cooldown's hold, a lull: a gap of more than ``PACE_GAP``). Over a gap, the upstream
refilled what we then spent at once, up to its burst; beyond it, the refill was lost. So
the accepted rate that bounds a cut is taken over the accepted window less each gap's
excess over this, and the sending rate it is compared with over the window less the gaps.
A pace at 1.7-1.9 times the quota of an upstream without headers was never bounded by
what it accepted: every window held the second of a punishing upstream's hold, and the
sends after it read as a climb (the matrix's row 18 in real time: three walls in its first
10 s, each after a hold and a second or two of sends at that pace into an empty
bucket)."""

PACE_MAX_GROWTH = 0.25
"""The largest single step of growth (a share of the pace)."""

PACE_PLATEAU = 3.0
"""Seconds after the pace passes the level last found too high during which it grows by
``PACE_PLATEAU_GROWTH`` a step only (CUBIC's plateau about its last maximum), unless a
mirror standing full vouches for it. An upstream's burst hides an overshoot until it is
spent, so growth doubling from the first step beyond that level overshot by a third
within two seconds, and each overshoot ended in a wall of refusals: every 3-5 s with no
rate-limit headers (the matrix's rows 17 and 20, virtual: 2.0-2.5 % of 429s)."""

PACE_PLATEAU_GROWTH = 0.02
"""Growth a step on the plateau (a share of the pace)."""

PACE_BINDING = 0.8
"""The pace binds when a step sent at least this share of what it allowed."""

PACE_LIFT_AFTER = 10.0
"""Seconds of a pace that never binds after which it is lifted altogether."""

PACE_FLOOR = 0.5
"""The slowest pace (requests per second): a probe's worth, never a stop."""


_REMAINING_HEADERS = {
    ("openai", "requests"): "x-ratelimit-remaining-requests",
    ("openai", "tokens"): "x-ratelimit-remaining-tokens",
    ("anthropic", "requests"): "anthropic-ratelimit-requests-remaining",
    ("anthropic", "tokens"): "anthropic-ratelimit-tokens-remaining",
    ("anthropic", "input_tokens"): "anthropic-ratelimit-input-tokens-remaining",
}

_MAX_COUNT_DIGITS = 15


class Marks(Protocol):
    """Where the gates stood when a request was granted (a ticket): ``taken`` and the
    mirrors' levels (None: no mirror), the request's own units left out of ``taken`` and
    left in the levels."""

    rate_mark: float
    token_mark: float
    rate_level: float | None
    token_level: float | None


Refusal = Literal["rate", "crowd", "unknown"]
"""What a congestion reply names: a rate limit, a cap on how many are in flight, or either."""

_TOKEN_ROUNDING = {"anthropic": 1000}
"""Providers that round remaining tokens, and to what (Anthropic: the nearest thousand)."""


class Pace:
    """A requests-per-second ceiling learnt from congestion replies; None until one comes.

    Pure: methods take ``now``. ``rate`` is the ceiling (None: no ceiling). Feed it every
    send (``sent``) and every congestion reply refused at the door (``congested``); call
    ``step`` now and then (on successes): it says whether the ceiling changed.
    """

    __slots__ = (
        "_accepted_refused",
        "_accepted_sent",
        "_first",
        "_gap_excess",
        "_gaps",
        "_growth",
        "_held",
        "_idle_since",
        "_last_cut",
        "_last_sent",
        "_passed_held",
        "_recent_refused",
        "_recent_sent",
        "_resumed",
        "_sent",
        "_short_refused",
        "_short_sent",
        "_step_start",
        "careful",
        "rate",
    )

    def __init__(self) -> None:
        self.rate: float | None = None
        self._recent_sent = SlidingCount(window=PACE_WINDOW)
        self._recent_refused = SlidingCount(window=PACE_WINDOW)
        self._short_sent = SlidingCount(window=SWAMP_WINDOW, slices=4)
        self._short_refused = SlidingCount(window=SWAMP_WINDOW, slices=4)
        self._accepted_sent = SlidingCount(window=PACE_ACCEPTED_WINDOW)
        self._accepted_refused = SlidingCount(window=PACE_ACCEPTED_WINDOW)
        # Milliseconds without a send over the accepted window, and their excess over
        # PACE_HELD_BURST: counts of whole ms, each counted when the sends resume.
        self._gaps = SlidingCount(window=PACE_ACCEPTED_WINDOW)
        self._gap_excess = SlidingCount(window=PACE_ACCEPTED_WINDOW)
        self._first = math.inf
        self._resumed = math.inf  # the first send after the last break (PACE_GAP)
        self._last_sent = -math.inf
        self._last_cut = -math.inf
        self._held = 0.0  # the pace the last cut found too high: growth returns near it fast
        self._passed_held = math.inf  # when growth last passed it (the plateau's start)
        self._growth = PACE_FIRST_GROWTH
        self._step_start = -math.inf
        self._sent = 0
        self._idle_since = math.inf
        self.careful = False
        """No refusal is borne as chance (an upstream that punishes each one): every
        episode of refusals at the door cuts the pace."""

    def sent(self, now: float) -> None:
        """Count one send."""
        self._sent += 1
        self._recent_sent.add(now)
        self._short_sent.add(now)
        self._accepted_sent.add(now)
        if self._first == math.inf:
            self._first = now
        gap = now - self._last_sent
        if gap > PACE_GAP:
            self._resumed = now
            if gap != math.inf:
                gap = min(gap, PACE_ACCEPTED_WINDOW)
                self._gaps.add(now, round(1000 * gap))
                if gap > PACE_HELD_BURST:
                    self._gap_excess.add(now, round(1000 * (gap - PACE_HELD_BURST)))
        self._last_sent = now

    def congested(self, now: float, sent_at: float) -> bool:
        """A congestion reply to a request sent at ``sent_at``; whether the pace was cut.

        Replies to requests sent before the last cut echo the episode it answered.
        """
        self._recent_refused.add(now)
        self._short_refused.add(now)
        self._accepted_refused.add(now)
        if sent_at <= self._last_cut or now - self._last_cut < PACE_CUT_SPACING:
            return False
        refused = self._recent_refused.total(now)
        sent_count = self._recent_sent.total(now)
        if not self.careful and (
            refused < PACE_MIN_REFUSED or refused <= PACE_TOLERANCE * sent_count
        ):
            return False  # sporadic refusals, not a rate: borne
        if self.rate is None:
            # What we were sending when the refusals came: the first level found too high.
            base = sent_count / max(min(PACE_WINDOW, now - self._first), 0.1)
        else:
            base = self.rate
            sending = sent_count / PACE_WINDOW
            if (
                sending < PACE_BINDING * base
                and now - self._resumed >= PACE_WINDOW
                and now - self._last_sent <= PACE_GAP
            ):
                # A pace we sent well under for a whole window (another gate held us
                # below it) was not what the upstream refused: the rate we sent at was.
                # A window broken by a hold or a lull says nothing of that rate.
                base = sending
        if now - self._first >= PACE_ACCEPTED_WINDOW:
            # What the upstream accepted lately bounds its refill from above, by less than
            # the rate refused after its burst ran out does (PACE_ACCEPTED_WINDOW); not
            # after a climb, whose first seconds were sent under the refill. Both over
            # the time the upstream could serve us (PACE_HELD_BURST).
            window = PACE_ACCEPTED_WINDOW
            sending = window - min(self._gaps.total(now) / 1000, window)
            served = window - min(self._gap_excess.total(now) / 1000, window)
            if sending < PACE_WINDOW:
                # Held nearly all the window: the sends after it say nothing of a rate.
                sending = served = window
            sent_long = self._accepted_sent.total(now)
            accepted = (sent_long - self._accepted_refused.total(now)) / served
            steady = sent_count / PACE_WINDOW <= PACE_STEADY * sent_long / sending
            if steady and 0 < accepted < base:
                base = accepted
        self._held = base
        if self.starved(now):
            # Nearly everything refused: a debt to the upstream (refusals counted against
            # the quota), not a rate. Halve, and let the cooldown's probes find the end.
            base /= 2
        if base <= 0:
            return False
        self.rate = max(PACE_FLOOR, PACE_BETA * base)
        self._last_cut = now
        self._passed_held = math.inf
        self._growth = PACE_FIRST_GROWTH
        self._step_start = now
        self._sent = 0
        self._idle_since = math.inf
        return True

    def recent_sent(self, now: float) -> int:
        """Sends over the last ``PACE_WINDOW``."""
        return int(self._recent_sent.total(now))

    def recent_refused(self, now: float) -> int:
        """Refusals at the door over the last ``PACE_WINDOW``."""
        return int(self._recent_refused.total(now))

    def starved(self, now: float) -> bool:
        """Whether nearly everything sent over the last window was refused."""
        refused = self._recent_refused.total(now)
        sent = self._recent_sent.total(now)
        return refused >= PACE_MIN_REFUSED and refused >= PACE_STARVED * sent

    def swamped(self, now: float) -> bool:
        """Whether nearly everything sent over the last ``SWAMP_WINDOW`` was refused."""
        refused = self._short_refused.total(now)
        sent = self._short_sent.total(now)
        return refused >= PACE_MIN_REFUSED and refused >= PACE_STARVED * sent

    def due(self, now: float) -> bool:
        """Whether a step has passed since the last (``step`` would look at growth)."""
        return self.rate is not None and now - self._step_start >= PACE_STEP

    def step(
        self, now: float, *, confirmed: bool = True, grow: bool = True, vouched: bool = False
    ) -> bool:
        """Grow (or lift) the pace if a step has passed; whether ``rate`` changed.

        ``confirmed``: called on a success (the upstream served something sent at this
        pace). Unconfirmed (on a send, when no reply has come back for a step: replies
        that take seconds), only the silence of the door vouches for the pace, a
        refusal coming back in milliseconds: the pace grows back towards the level last
        found too high, and beyond it by ``PACE_SILENT_GROWTH`` a step, never faster.
        ``grow``: False holds the pace where it is and starts its growth over (a mirror
        says the sends outrun the upstream's refill already). Confirmed growth beyond the
        level last found too high keeps to ``PACE_PLATEAU_GROWTH`` a step for
        ``PACE_PLATEAU`` seconds, unless ``vouched`` (a mirror standing full says there
        is room: ``RateGate.mirror_vouches``).
        """
        rate = self.rate
        elapsed = now - self._step_start
        if rate is None or elapsed < PACE_STEP:
            return False
        binding = self._sent >= PACE_BINDING * rate * elapsed
        self._step_start, self._sent = now, 0
        if not binding:
            self._growth = PACE_FIRST_GROWTH
            if self._idle_since == math.inf:
                self._idle_since = now
            elif now - self._idle_since >= PACE_LIFT_AFTER:
                self.rate = None
                return True
            return False
        self._idle_since = math.inf
        if not grow:
            self._growth = PACE_FIRST_GROWTH
            return False
        if rate < self._held:
            # Back towards the level last found too high quickly: half the gap a step.
            self.rate = max(rate * (1 + PACE_FIRST_GROWTH), (rate + self._held) / 2)
            return True
        if self._passed_held == math.inf:
            self._passed_held = now
        if not confirmed:
            self.rate = rate * (1 + PACE_SILENT_GROWTH)
        else:
            if not vouched and now - self._passed_held < PACE_PLATEAU:
                self.rate = rate * (1 + PACE_PLATEAU_GROWTH)
            else:
                self.rate = rate * (1 + self._growth)
                self._growth = min(PACE_MAX_GROWTH, 2 * self._growth)
        return True

    def __repr__(self) -> str:
        rate = "none" if self.rate is None else f"{self.rate:.2f}/s"
        return f"<Pace {rate} held={self._held:.2f}/s>"


class Feedback:
    """Turns answered attempts into cooldown, pace and mirror changes (see the module doc).

    Args:
        cooldown: the fleet-wide cooldown gate.
        rate, tokens: the request and token gates (their mirrors and the pace).
        rpm: the configured requests per minute (the pace never exceeds it).
        wall_clock: Unix time, only to read dates in replies that carry no ``Date``.
        max_cooldown: the longest one reply's Retry-After closes the cooldown for.
    """

    __slots__ = (
        "_cooldown",
        "_door_time",
        "_failed_probes",
        "_first_end",
        "_full_read_due",
        "_glances",
        "_interval",
        "_knocks",
        "_last_reading",
        "_max_cooldown",
        "_mirror_probe",
        "_pace",
        "_rate",
        "_refusal_time",
        "_reopened_at",
        "_rpm",
        "_rpm_burst",
        "_sends",
        "_stated_end",
        "_succeeded_at",
        "_tokens",
        "_upstream_clock",
        "_window",
        "fleet",
        "punishes",
        "quota",
    )

    def __init__(
        self,
        *,
        cooldown: CooldownGate,
        rate: RateGate,
        tokens: TokenGate,
        rpm: float,
        wall_clock: Callable[[], float],
        max_cooldown: float = 3600.0,
    ) -> None:
        self._cooldown = cooldown
        self._rate = rate
        self._tokens = tokens
        self._rpm = rpm
        self._max_cooldown = max_cooldown
        self._rpm_burst = rate.statistics().burst if rate.per_minute == rpm else None
        self._upstream_clock = UpstreamClock(wall_clock)
        self._pace = Pace()
        self.punishes = False
        """Whether this upstream was seen to punish sends inside its Retry-After window."""
        self.quota: QuotaSnapshot | None = None
        """What the upstream's rate-limit headers said last."""
        self._last_reading: QuotaSnapshot | None = None  # the last observed reply's
        self._interval = PROBE_FIRST
        self._stated_end = -math.inf  # the latest window end the upstream stated
        self._first_end = -math.inf  # the end the closure's first refusal stated
        # The latest window end a 429 stated, and when the request that got it was sent.
        self._window = (math.inf, -math.inf)
        self._knocks = 0  # since the last success of a request sent inside a window
        self._failed_probes = 0  # in the current closure
        self._reopened_at = -math.inf
        self._succeeded_at = -math.inf  # the last success (see ``sent``)
        self._refusal_time = 0.0  # smoothed seconds from a send to its congestion reply
        self._door_time = 0.0  # the same, of refusals at the door only (see ``observe``)
        self._glances: tuple[tuple[str, float], ...] = ()
        self._full_read_due = -math.inf
        self._sends = 0  # every send, to measure what went between two looks at the mirror
        self._mirror_probe = (-math.inf, 0)  # the last look at the mirror, and sends then
        self.fleet: Fleet | None = None
        """The fleet this Shaper shares its quota with: told of closures and readings."""

    @property
    def pace(self) -> float | None:
        """The learnt requests-per-second ceiling, None while congestion has set none."""
        return self._pace.rate

    def confirmed_cooldown(self, now: float) -> float:
        """Seconds of cooldown that evidence confirms (0 while a first probe may end it).

        What a newcomer may be refused for: a closure honoured in full (a punishing
        upstream), or one a probe has already found to be real.
        """
        remaining = self._cooldown.remaining(now)  # asked of every request: open is 0 at once
        if remaining and not (self.punishes or self._failed_probes) and self._cooldown.probing:
            return 0.0
        return remaining

    # ------------------------------------------------------------------ outcomes

    def sent(self, now: float, probe: int) -> None:
        """One request went out; ``probe``: the cooldown generation it probes (0: none).

        A probe not refused at the door within ``PROBE_SILENCE`` refusal times was let
        in: the gate reopens then, without waiting for its reply (which may take as long
        as the model writes).
        """
        pace = self._pace
        pace.sent(now)
        # No reply for a step (they take seconds): the door's silence clocks the pace.
        if (
            now - self._succeeded_at > PACE_STEP
            and pace.due(now)
            and pace.step(now, confirmed=False, grow=self._mirror_vouches() is not False)
        ):
            self._apply_pace()
        self._sends += 1
        due, sends = self._mirror_probe
        if now >= due + PACE_STEP:
            # And a mirror no reading has verified for a while (see ``TokenBucket.probe``),
            # judged by what we sent since the last look.
            self._mirror_probe = (now, self._sends)
            if self.punishes and pace.rate is None:
                self._apply_pace()  # the spread follows the mirror's rate
            if not self.punishes and not pace.recent_refused(now):
                self._rate.probe((self._sends - sends) / (now - due))
        if probe:
            wait = max(PROBE_SILENCE_MIN, PROBE_SILENCE * self._refusal_time)
            asyncio.get_running_loop().call_at(
                now + wait, self._probe_let_in, probe, self._cooldown.probes
            )

    def _mirror_vouches(self) -> bool | None:
        """What the request mirror says of the pace (``RateGate.mirror_vouches``). True
        confirms it; False stops its growth: a mirror refilling slower than the pace
        stands under half, and its bucket hides an overshoot until it is empty while the
        door stays silent (growth by that silence alone went on to 1.4 times the quota
        over long replies)."""
        rate = self._pace.rate
        return None if rate is None else self._rate.mirror_vouches(rate)

    def _probe_let_in(self, probe: int, number: int) -> None:
        cooldown = self._cooldown
        if cooldown.probe_out and cooldown.probes == number:  # that very probe, unanswered
            self.succeeded(asyncio.get_running_loop().time(), probe)

    def succeeded(self, now: float, probe: int, sent_at: float = -math.inf) -> None:
        """A success; ``probe`` is the cooldown generation it probed (0: not a probe).

        ``sent_at``: when its request went out (unknown: the success confirms nothing).
        A reply slower than ``PACE_CONFIRMS`` steps confirms a pace from before the last
        steps of growth, not the current one (see ``Pace.step``), unless a mirror of the
        upstream's bucket keeps the sends within it or vouches for the pace.
        """
        if probe and probe == self._cooldown.generation and not self._cooldown.is_open(now):
            self._cooldown.reopen()
            self._reopened_at = now
            if self._pace.rate is not None:
                # One unit was there for the probe, nothing says more is: the sends resume
                # spread at the pace, not as the burst the pace earned while shut (each
                # reopening let a burst through, half of it refused; the gate flickered
                # shut and open every 40 ms, 15-46 refusals a time in the matrix's rows 17
                # and 19).
                self._rate.drain()
            self._first_end = -math.inf
            self._interval = PROBE_FIRST
            self._failed_probes = 0
        self._succeeded_at = now
        stated_by, stated_end = self._window
        if stated_by <= sent_at <= stated_end:
            self._knocks = 0  # served inside its window: no knock there was punished
        pace = self._pace
        if not pace.due(now):
            return
        vouches = self._mirror_vouches()
        confirmed = (
            now - sent_at <= PACE_CONFIRMS * PACE_STEP
            or self._rate.mirror_bounds()
            or vouches is True
        )
        if pace.step(now, confirmed=confirmed, grow=vouches is not False, vouched=vouches is True):
            self._apply_pace()

    def congested(
        self,
        now: float,
        sent_at: float,
        retry_after: float | None,
        probe: int,
        *,
        rate_limited: bool = True,
        rtt: float = 0.0,
        form: RetryAfterForm | None = None,
        message: str | None = None,
    ) -> None:
        """A congestion reply (429, 503, 529) to a request sent at ``sent_at``.

        ``rate_limited``: a 429 (a limit on us), not an overloaded service (503, 529),
        which says nothing of a rate to keep. ``rtt`` is the smoothed reply time of
        successes (0: none yet), to tell a refusal at the door (a rate limiter's) from
        one after the request was worked on. ``form``: how the Retry-After was stated
        (``signals.retry_after_form``; None: not known, judged by its value), and so
        how much two of them may differ with nothing moved. A Retry-After beyond
        ``max_cooldown`` holds that long at most. ``message``: the error body's message,
        which may name the limit (``refusal``).
        """
        closed = self._cooldown.closed_until
        self._congested(
            now,
            sent_at,
            retry_after,
            probe,
            rate_limited=rate_limited,
            rtt=rtt,
            form=form,
            crowd=self.refusal(retry_after, message) == "crowd",
        )
        if self.fleet is not None and self._cooldown.closed_until != closed:
            self.fleet.publish_cooldown(self._cooldown.remaining(now))  # the fleet stops too

    def _congested(
        self,
        now: float,
        sent_at: float,
        retry_after: float | None,
        probe: int,
        *,
        rate_limited: bool,
        rtt: float,
        form: RetryAfterForm | None,
        crowd: bool,
    ) -> None:
        if retry_after is not None:
            retry_after = min(retry_after, self._max_cooldown)
        took = now - sent_at
        self._refusal_time += REFUSAL_GAIN * (took - self._refusal_time)
        cooldown = self._cooldown
        own_probe = bool(probe) and probe == cooldown.generation
        # A refused probe was expected to be refused: it says the closure is real, and
        # nothing of the pace to resume at.
        at_the_door = (
            rate_limited and not crowd and (not rtt or now - sent_at < AT_THE_DOOR * rtt)
        )
        if at_the_door:
            self._door_time += REFUSAL_GAIN * (took - self._door_time)
            self._rate.probe_refuted()
        if not own_probe and at_the_door and self._pace.congested(now, sent_at):
            self._apply_pace()
        if retry_after is None:
            if own_probe and not cooldown.is_open(now):
                self._probe_refused(now, None)
            elif (
                at_the_door
                and cooldown.is_open(now)
                and sent_at >= self._reopened_at
                and (self._pace.starved(now) or self._pace.swamped(now))
            ):
                self._interval = STARVED_PROBE
                self._failed_probes = 0
                cooldown.hold(now + STARVED_HOLD, probe_at=now + STARVED_PROBE)
            return
        end = now + retry_after
        knocked = rate_limited and not crowd and self._knocked(
            sent_at, end, self._resolution(retry_after, form)
        )
        if self.punishes or (knocked and not own_probe):
            # A knock, even one that proves nothing yet, is a window that grew because
            # we sent inside it: a probe inside it now would buy it another second. (A
            # refused probe's is judged below: it proves punishment on its own.)
            self._honour(end, retry_after)
        elif own_probe and not cooldown.is_open(now):
            # A whole-second (or HTTP-date) value is a ceiling: the true end lies within
            # one second below it. Later than the window first stated, beyond that doubt,
            # means the window grew because we knocked: at the first refused probe for a
            # value in ms, by the third at most for whole seconds (each knock adding a
            # second, however the values round). A whole-second window that only drifts
            # (refusals counted against a fast bucket) stays within PUNISHED_DRIFT a
            # refused probe of it.
            doubt = self._resolution(retry_after, form)
            if doubt >= 1.0:
                doubt += PUNISHED_DRIFT * (self._failed_probes + 1)
            if self._first_end == -math.inf:  # held without a stated end (starved)
                self._first_end = end
                self._probe_refused(now, end)
            elif end - doubt > self._first_end:
                self._punished()
                self._honour(end, retry_after)
            else:
                self._probe_refused(now, end)
        elif cooldown.is_open(now):
            if sent_at < self._reopened_at:
                return  # an echo of the closure a probe has already ended
            self._interval = PROBE_FIRST
            self._failed_probes = 0
            self._stated_end = self._first_end = end
            if retry_after <= PROBE_FIRST:
                # No probe could go before the window ends: wait it out, and then send one
                # ahead of the rest by a refusal's time. At its end the bucket holds about
                # the one unit the window waited for, and every send right behind the first
                # (a millisecond later in real time) would be refused, or on an upstream
                # that punishes them, buy a second each (the real-time row 14 lost 2 s to
                # the second of two sends 0.2 ms apart after a 4 ms window).
                lead = max(PROBE_SILENCE_MIN, PROBE_SILENCE * self._refusal_time)
                cooldown.hold(end, probe_at=end, lead=lead)
            else:
                cooldown.hold(end, probe_at=now + PROBE_FIRST)
        else:
            self._stated_end = max(self._stated_end, end)
            cooldown.hold(end, probe_at=None)

    def _resolution(self, retry_after: float, form: RetryAfterForm | None) -> float:
        """Seconds by which two Retry-Afters of one window may differ with nothing moved.

        A value in ms: a millisecond. Whole seconds: a second (each is rounded up). An
        HTTP date: a second, and as much again as the upstream's clock, read from its
        ``Date`` (truncated to the second), may still be off (``UpstreamClock``): two
        refusals of one window, each read against its own truncated ``Date``, stated ends
        two seconds apart (the real-time matrix's row 15, taken for a punishing upstream
        in half its runs).
        """
        if form is None:
            form = "whole-seconds" if retry_after == int(retry_after) else "seconds"
        if form == "date":
            return 1.0 + self._upstream_clock.uncertainty
        return 1.0 if form == "whole-seconds" else 1e-3

    def _knocked(self, sent_at: float, end: float, doubt: float) -> bool:
        """A 429 stating a window to ``end``, for a request sent at ``sent_at``.

        If the request was sent inside the window stated last (after the request that
        got it), and this window ends ``PUNISHED_GROWTH`` beyond that one's end (and
        its doubt, ``_resolution``), it grew because we knocked; ``PUNISHED_KNOCKS``
        such, and the upstream punishes. Whether this was a knock.
        """
        stated_by, stated_end = self._window
        knocked = (
            not self.punishes
            and doubt < PUNISHED_GROWTH
            and stated_by <= sent_at <= stated_end + doubt
            and end - doubt > stated_end + PUNISHED_GROWTH
        )
        if knocked:
            self._knocks += 1
            if self._knocks >= PUNISHED_KNOCKS:
                self._punished()
        if end > stated_end:
            self._window = (sent_at, end)
        return knocked

    def _punished(self) -> None:
        """The upstream punishes early sends: from now on its bucket is never run dry,
        and the sends go one by one, at the pace, or with none at most
        ``PUNISHED_SPREAD`` times the mirror's refill (``_apply_pace``)."""
        self.punishes = True
        self._pace.careful = True
        self._rate.hold_back(PUNISHED_RESERVE)
        self._tokens.hold_back(PUNISHED_RESERVE)
        self._apply_pace()

    def _honour(self, end: float, retry_after: float) -> None:
        """Hold a punishing upstream's window in full; the first send after it goes alone.

        A little beyond its end: a send landing on the window's last millisecond (our
        clock against its) would buy another whole extension. Then one send ahead of the
        rest, by as long as a refusal takes to come back: a window that ends on an empty
        bucket refuses the next send with a new window of its own, and every send right
        behind it (a millisecond later, in real time) would buy another second.
        """
        lead = max(PROBE_SILENCE_MIN, PROBE_SILENCE * self._refusal_time)
        margin = max(PUNISHED_MARGIN_MIN, PUNISHED_MARGIN * retry_after)
        self._cooldown.close_until(end + margin, lead=lead)

    def _probe_refused(self, now: float, end: float | None) -> None:
        self._failed_probes += 1
        self._interval *= 2
        cooldown = self._cooldown
        if end is not None:
            # The window stated last still ends it; the next probe may not come before it.
            self._stated_end = max(self._stated_end, end)
            cooldown.hold(end, probe_at=now + self._interval)
            return
        # Nothing stated: a refused probe is the only word, and it says "not yet". The
        # hold outlasts the next probe by as much again, so the gate does not open on
        # its own before that probe could answer (an upstream that extends its window
        # for every send inside it would take a whole queue's worth of extensions).
        cooldown.hold(now + 2 * self._interval, probe_at=now + self._interval)

    def refusal(self, retry_after: float | None, message: str | None = None) -> Refusal:
        """What a congestion reply just observed names: a rate, a crowd, or it cannot tell.

        A body's ``message`` naming concurrency says it outright: a crowd
        (``signals.names_concurrency``). Else a concurrency cap cannot say when a slot
        frees up (DeepSeek sends no Retry-After); a rate limiter can, and its headers
        then show a window with nothing left. Headers that show room in every window,
        with no Retry-After, name a crowd: too many in flight. Call after ``observe``
        with the reply's headers.
        """
        if names_concurrency(message):
            return "crowd"
        if retry_after is not None:
            return "rate"
        quota = self._last_reading
        if quota is None:
            return "unknown"
        windows = [w for w in (quota.requests, quota.tokens) if w.remaining is not None]
        if any(window.remaining == 0 for window in windows):
            return "rate"
        return "crowd" if windows else "unknown"

    def lost(self, probe: int) -> None:
        """A probe ended with no answer about the quota: the next may go at once."""
        if probe:
            self._cooldown.probe_lost(probe)

    def _apply_pace(self) -> None:
        rate = self._pace.rate
        if rate is None and self.punishes:
            mirror = self._rate.mirror_rate
            rate = None if mirror is None else PUNISHED_SPREAD * mirror
        if rate is None or rate * 60 >= self._rpm:
            self._rate.reconfigure(per_minute=self._rpm, burst=self._rpm_burst)
        else:
            # A small burst: a pace held after a pause must not come back as a wave. None
            # on an upstream that punishes: a loop held up for a few ms let the pace's
            # burst go at once, and each send after the first that found the bucket empty
            # bought a second (the matrix's penalty rows in real time).
            burst = 1.0 if self._pace.careful else max(1.0, rate * PACE_BURST)
            self._rate.reconfigure(per_minute=rate * 60, burst=burst)

    # ------------------------------------------------------------------ headers

    def ample(self, headers: Mapping[str, str], now: float) -> bool:
        """Whether a full read of these headers can wait (see ``AMPLE_READ_INTERVAL``).

        The glance is total: a count that is not a plain run of ASCII digits, or an
        absurdly long one, means "read in full".
        """
        if now >= self._full_read_due or not self._glances:
            return False
        if not (self._rate.mirror_ample() and self._tokens.mirror_ample()):
            return False  # our mirror is low while the upstream says plenty: re-anchor
        for name, half in self._glances:
            text = headers.get(name)
            if (
                text is None
                or not (text.isascii() and text.isdigit())
                or len(text) > _MAX_COUNT_DIGITS
                or int(text) < half
            ):
                return False
        return True

    def observe(
        self, headers: Mapping[str, str], now: float, sent_at: float, marks: Marks
    ) -> None:
        """Let the gates pace by what the upstream says is left (``x-ratelimit-*``).

        ``marks`` are the gates' ``taken`` when the request went out (at ``sent_at``,
        its own units left out), and their mirrors' levels then (see ``Marks``): the
        mirrors are re-anchored at ``remaining`` less what went out since, plus what the
        mirror's rate refilled meanwhile, and no higher than ``remaining``
        (``TokenBucket.sync``). The reading was taken somewhere between the send and the
        reply, and that bound holds either way: a reply 20 s long (a streamed answer)
        still puts right a mirror that was wrong.
        """
        snapshot = _parse_quota(headers, now=self.reply_time(headers, now - sent_at))
        if snapshot.is_empty:
            self._last_reading = None
            return
        self.quota = self._last_reading = snapshot
        tokens = snapshot.tokens if not snapshot.tokens.is_empty else snapshot.input_tokens
        glances = []
        for kind, window in (
            ("requests", snapshot.requests),
            ("tokens" if tokens is snapshot.tokens else "input_tokens", tokens),
        ):
            name = _REMAINING_HEADERS.get((snapshot.provider or "", kind))
            if window.limit and name is not None:
                glances.append((name, window.limit / 2))
        self._glances = tuple(glances)
        self._full_read_due = now + AMPLE_READ_INTERVAL
        age = now - sent_at
        # The reading was written when the reply left the upstream: a refusal's time at
        # the door (a send and its answer, nothing worked on) bounds how long ago that was.
        # Not an overloaded service's 529, which comes after the request was worked on.
        lag = max(READING_LAG_MIN, self._door_time)
        token_rounding = _TOKEN_ROUNDING.get(snapshot.provider or "", 0)
        for gate, window, mark, level, rounding in (
            (self._rate, snapshot.requests, marks.rate_mark, marks.rate_level, 0),
            (self._tokens, tokens, marks.token_mark, marks.token_level, token_rounding),
        ):
            if window.remaining is None:
                continue
            # A count rounded to the nearest ``rounding`` may be half of it high: the
            # anchor may raise the mirror, so it takes the count's lower bound.
            remaining = max(0, window.remaining - rounding // 2) if rounding else window.remaining
            if self.fleet is not None:  # the fleet's shared level is lowered to it too
                self.fleet.observed("requests" if gate is self._rate else "tokens", remaining)
            with contextlib.suppress(ValueError, TypeError):  # a reading the gate refuses
                gate.sync(
                    remaining=remaining,
                    reset_after=window.reset_after,
                    limit=window.limit or None,
                    sent_mark=mark,
                    sent_age=age,
                    sent_level=level,
                    lag=lag,
                )
        requests = snapshot.requests
        if requests.limit and requests.remaining is not None:
            # What the upstream took over the last window, less what it may have held
            # then (a full bucket) and still holds, it refilled: a floor under its rate,
            # from our sends alone, long before a slow reply could raise a rate learnt too
            # low (a reset rounded to the second reads 100 a second as 50).
            pace = self._pace
            accepted = pace.recent_sent(now) - pace.recent_refused(now)
            floor = (accepted - requests.limit + requests.remaining) / PACE_WINDOW
            if floor > 0:
                self._rate.at_least(floor)

    def reply_time(self, headers: Mapping[str, str], elapsed: float) -> float:
        """Unix time of a reply on the upstream's clock (dates in it are read against it).

        Its ``Date``, to within an exchange's time once a few replies have bounded the
        upstream's clock (``UpstreamClock``), else our wall clock. ``elapsed``: seconds
        since its request went out.
        """
        return self._upstream_clock.read(headers.get("date"), elapsed)

    def __repr__(self) -> str:
        return (
            f"<Feedback pace={self._pace!r} punishes={self.punishes} "
            f"cooldown={self._cooldown!r}>"
        )

"""Counters in Redis: the governance layer's memory shared by a fleet of processes.

A chatbot service runs several processes (gunicorn workers, pods) that spend the same
tenants' tiers and the same budget. With ``MemoryStore`` each process counts alone, so four
processes grant four times a tenant's minute and overshoot a budget four times;
``SQLiteStore`` serialises one machine, not a fleet. ``RedisStore`` keeps the counters in
one Redis, so every ``TenantQuotas`` and ``BudgetGuard`` on it, in any process on any
machine, shares them exactly: ``Gateway.from_config`` builds one for
``store = "redis://host:6379/0"``.

Each write is one Lua script, run atomically by Redis (``EVALSHA``, falling back to
loading the script when Redis has forgotten it after a restart), and a read one ``MGET``,
so a call is one round trip (~0.1 ms on loopback): ``reserve_all`` checks
every counter of a request (its tier minute, day and tokens; its budget and cap) and adds to
all of them or none, so no process ever sees part of a request counted and no sum passes a
limit, however many processes reserve at once.

**Keys.** Every key of a store sits under one hash tag, ``{aq:<name>}:``, so a Redis
Cluster keeps the whole store on one slot and multi-key scripts stay legal there:
counters at ``{aq:<name>}:c:<key>``, operation records at ``{aq:<name>}:op:<id>``.
Stores with the same name on the same Redis share their counters; give unrelated
deployments different names (or databases).

**Numbers.** Counters are floats (requests, tokens, dollars). Each is kept as the text of
an IEEE double written with ``%.17g``, which reads back as exactly the same double, and
the scripts add in doubles as Python does: a counter in Redis holds bit for bit what a
``MemoryStore`` would after the same operations, so a budget drifts no more than it does in
memory (the budget's ``SLACK`` absorbs that). ``INCRBYFLOAT`` was not used: it adds in
long doubles and prints 17 decimal places, so its sums differ from Python's in the last
bits and the same test would pass in memory and fail in Redis. Integer units were not
either: micro-dollars round a cheap model's token ($0.00000015) to nothing, and units fine
enough for it (1e-12) leave Lua's exact integers (2^53) past $9 000, while one store also
counts tokens in the billions.

**Expiry** is Redis's own: a counter is forgotten at its ``expires_at`` (``PEXPIREAT``,
rounded up to the millisecond) by Redis's clock, and a live counter keeps its later expiry
(an earlier one never shortens it), as in the other stores. The process's wall clock is
not read at all; the windows' keys (which minute, which day) come from the callers' clock.

**Round trips.** Calls made in one turn of the event loop go to Redis together, in one
pipeline (each still its own atomic script; a script Redis has not got, after a restart,
is sent whole in a second one): under load the requests of a Gateway share round trips
(a tier's reservation, a budget's, their settlements, the reads), alone a call costs one.

**Redis failing.** Every call is bounded by ``timeout`` (the wait for a connection, a
reconnection and a script reloaded after a restart included) and fails with
:class:`~asyncquota.errors.StoreUnavailableError` naming the URL scrubbed of its password:
tiers and budgets then refuse the request rather than waive a limit. A failure opens a
breaker for ``BREAKER_OPEN`` seconds: calls fail at once meanwhile, then one asks Redis
again (a dead Redis costs a request microseconds, not a whole timeout). Nothing is kept
open across a failure: the next call connects again, so calls succeed as soon as Redis is
back.

**Exactly once.** A call whose reply is lost (a timeout, a dropped connection) may or may
not have run on Redis. Each write therefore carries a random operation id, and a script
that writes records its reply under that id (a reservation's for ``OPERATION_TTL``
seconds, an add's for as long as its call may last; a refusal wrote nothing and records
nothing): run again with the same id it changes nothing and returns the recorded reply,
so redis-py's one retry of a call whose connection broke (a stale connection after a
Redis restart) never counts twice. A
reservation whose outcome stays unknown (the timeout passed, or its caller was cancelled
while it ran) is *undone* by id in the background as soon as Redis answers: if it had run,
its amounts are given back once; if it has not arrived yet, a tombstone makes it a no-op
when it does. The caller was told the request is refused, so nothing stays counted for it,
and a retried request is counted once. An ``add`` (a refund, a reconcile) is not retried
by the store beyond that: one whose outcome is unknown is reported as a failure and, like
in ``SQLiteStore``, may have applied or not; callers log it as dropped. An undo that Redis
does not take within ``OPERATION_TTL`` is given up (the counter stays high until its
window ends: the closed side). The records cost Redis memory: about 300 bytes a
reservation for ``OPERATION_TTL`` seconds, ~35 MB for a gateway serving a thousand requests
a second (a tier reservation and a budget one each).

Redis is an optional dependency: this module imports without it, and ``RedisStore(...)``
raises ``ImportError`` naming ``pip install 'asyncquota[redis]'`` when it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import StoreUnavailableError
from ..urls import redact_text, redact_url
from .store import Reservation, _check_amount, _check_limit

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["DEFAULT_TIMEOUT", "OPERATION_TTL", "RedisStore", "is_redis_url"]

logger = logging.getLogger("asyncquota.governance")

DEFAULT_TIMEOUT = 0.5
"""Seconds one call may take by default before it fails with ``StoreUnavailableError``.
A call takes ~0.1 ms on loopback, but a burst of a thousand concurrent admissions in one
process queues for the store's connections for ~0.1 s: the bound must not refuse those,
and is still short enough that a request is refused quickly while Redis is away."""

OPERATION_TTL = 60.0
"""Seconds a reservation's reply is kept in Redis (so a retry or an undo of it finds it),
and the longest an undo of a lost reservation is tried before it is given up. An add's
reply is kept only as long as its call may last (its retry is within the call)."""

MAX_CONNECTIONS = 32
"""Connections one store opens at most; more concurrent calls wait for one (within their
timeout). Each script takes microseconds, so a few connections carry thousands of calls
a second."""

MAX_PENDING_UNDOS = 10_000
"""Reservations of unknown outcome kept for undoing at most; past it the oldest are given
up (a long outage refuses many requests, most of which never reached Redis)."""

UNDO_BATCH = 500
"""Undos sent in one pipeline."""

BREAKER_OPEN = 0.25
"""Seconds after a failed call during which calls fail at once, without asking Redis (the
breaker is open); then one call asks (the others still fail at once until it answers),
and its answer closes the breaker. A dead Redis then costs each request microseconds,
not a whole ``timeout``; a Redis back is seen within ``BREAKER_OPEN`` seconds."""

UNDO_RETRY = 0.5
"""Seconds between two attempts to send the undos while Redis does not answer."""

INSTALL_HINT = "RedisStore needs redis-py: pip install 'asyncquota[redis]'"

_TTL_MS = str(round(OPERATION_TTL * 1000))  # the reservations' records, for PX

_SCHEMES = ("redis://", "rediss://", "unix://")


def is_redis_url(text: str) -> bool:
    """True when ``text`` is a Redis URL (``redis://``, ``rediss://`` or ``unix://``)."""
    return text.lower().startswith(_SCHEMES)


# ---------------------------------------------------------------------------------- scripts
#
# Replies are short strings: "+v1,v2,..." (done: the counters' new values, %.17g), "-i"
# (refused at the i-th reservation, from 0: nothing written), "U" (undone before it ran).

_PRELUDE = """
local function value_of(raw)
  if not raw then return 0 end
  local value = tonumber(raw)
  if not value then
    error({err = 'ERR a counter of this asyncquota store holds something not a number'})
  end
  return value
end

local now_ms
-- Write a counter, forgotten at `at` (Unix ms) or at its current expiry if later.
local function write(key, value, at, existed)
  if existed then
    local left = redis.call('PTTL', key)
    if left > 0 then
      if not now_ms then
        local t = redis.call('TIME')
        now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      if now_ms + left > at then at = now_ms + left end
    end
  end
  redis.call('SET', key, string.format('%.17g', value))
  redis.call('PEXPIREAT', key, string.format('%.0f', at))
end
"""

# KEYS: the operation, then one counter per reservation (a key may repeat).
# ARGV: the operation's TTL (ms), then per reservation: amount, limit ('' for none), at (ms).
_RESERVE = (
    _PRELUDE
    + """
local done = redis.call('GET', KEYS[1])
if done then return done end
local values, existed, until_ms, out = {}, {}, {}, {}
for i = 2, #KEYS do
  local key, base = KEYS[i], 3 * (i - 2) + 1
  if values[key] == nil then
    local raw = redis.call('GET', key)
    existed[key] = raw and true or false
    values[key] = value_of(raw)
  end
  local new = values[key] + tonumber(ARGV[base + 1])
  local limit = ARGV[base + 2]
  if limit ~= '' and new > tonumber(limit) then
    -- Not recorded: nothing was written, so running it again (a retry) is harmless, and a
    -- tenant hammering past its limit costs Redis no memory.
    return '-' .. (i - 2)
  end
  values[key] = new
  local at = tonumber(ARGV[base + 3])
  if until_ms[key] == nil or at > until_ms[key] then until_ms[key] = at end
  out[#out + 1] = string.format('%.17g', new)
end
for key, value in pairs(values) do write(key, value, until_ms[key], existed[key]) end
local reply = '+' .. table.concat(out, ',')
redis.call('SET', KEYS[1], reply, 'PX', ARGV[1])
return reply
"""
)

# KEYS: the operation, the counter. ARGV: the operation's TTL (ms), amount, at (ms).
_ADD = (
    _PRELUDE
    + """
local done = redis.call('GET', KEYS[1])
if done then return done end
local raw = redis.call('GET', KEYS[2])
local new = value_of(raw) + tonumber(ARGV[2])
if not (new > 0) then new = 0 end
write(KEYS[2], new, tonumber(ARGV[3]), raw and true or false)
local reply = '+' .. string.format('%.17g', new)
redis.call('SET', KEYS[1], reply, 'PX', ARGV[1])
return reply
"""
)

# KEYS: the reservation's operation, then its counters.
# ARGV: the TTL of the tombstone (ms), then per reservation: amount, at (ms).
_UNDO = (
    _PRELUDE
    + """
local done = redis.call('GET', KEYS[1])
local values, until_ms = {}, {}
if done and string.sub(done, 1, 1) == '+' then
  -- Read (and check) every counter before writing any: an error leaves nothing half done.
  for i = 2, #KEYS do
    local key, base = KEYS[i], 2 * (i - 2) + 1
    if values[key] == nil then
      local raw = redis.call('GET', key)
      values[key] = raw and value_of(raw) or false  -- a counter gone has nothing to give back
    end
    if values[key] then
      values[key] = values[key] - tonumber(ARGV[base + 1])
      local at = tonumber(ARGV[base + 2])
      if until_ms[key] == nil or at > until_ms[key] then until_ms[key] = at end
    end
  end
end
for key, value in pairs(values) do
  if value then write(key, value > 0 and value or 0, until_ms[key], true) end
end
redis.call('SET', KEYS[1], 'U', 'PX', ARGV[1])
return 1
"""
)


def _number(value: float) -> str:
    """A float as text that Lua's ``tonumber`` reads back as the same double."""
    return repr(float(value))


def _limit(limit: float | None) -> str:
    if limit is None or limit == math.inf:
        return ""
    return _number(limit)


def _ms(expires_at: float) -> str:
    if (
        isinstance(expires_at, bool)
        or not isinstance(expires_at, int | float)
        or not math.isfinite(expires_at)
    ):
        raise ValueError(f"expires_at must be a finite Unix time, not {expires_at!r}.")
    return str(math.ceil(expires_at * 1000))


class RedisStore:
    """Counters in Redis, shared exactly by every process on the same Redis and name.

    Implements the ``Store`` protocol (``reserve``, ``reserve_all``, ``add``, ``get``,
    ``aclose``) with one atomic Lua script per call; see the module docstring for the keys,
    the numbers, expiry, failures and what "exactly once" means here.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) or
            ``unix:///path/to.sock?db=0``, as redis-py reads it.
        name: the store's name: stores of one name on one Redis share counters.
        prefix: the namespace before it; the keys' hash tag is ``{prefix:name}``.
        timeout: the longest one call may take, in seconds (default ``DEFAULT_TIMEOUT``).

    Raises:
        ImportError: redis-py is not installed (``pip install 'asyncquota[redis]'``).
        ValueError: a URL redis-py cannot use, a name or prefix that is empty or holds a
            brace, or a timeout that is not a positive number.
    """

    __slots__ = (
        "_add",
        "_add_ttl_ms",
        "_batch",
        "_calls",
        "_client",
        "_closed",
        "_drainer",
        "_failures",
        "_given_up",
        "_lost_reply",
        "_name",
        "_open_until",
        "_probing",
        "_redacted",
        "_reply_error",
        "_reserve",
        "_round_trips",
        "_tag",
        "_timeout",
        "_undo",
        "_undos",
        "_url",
    )

    def __init__(
        self,
        url: str,
        *,
        name: str = "governance",
        prefix: str = "aq",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        try:
            import redis.asyncio as redis_asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import RedisError, ResponseError
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        if isinstance(timeout, bool) or not (
            isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0
        ):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}.")
        for field, value in (("name", name), ("prefix", prefix)):
            if not isinstance(value, str) or not value or "{" in value or "}" in value:
                raise ValueError(
                    f"A RedisStore's {field} must be a non-empty string without braces "
                    f"(it goes inside the keys' hash tag), not {value!r}."
                )
        if not isinstance(url, str) or not is_redis_url(url):
            shown = redact_url(url) if isinstance(url, str) else repr(url)
            raise ValueError(
                f"A RedisStore needs a redis://, rediss:// or unix:// URL, not {shown}."
            )
        self._url = url
        self._redacted = redact_url(url)
        self._timeout = float(timeout)
        # An add's record serves only redis-py's retry, within the same call.
        self._add_ttl_ms = str(round((self._timeout + 1) * 1000))
        self._name = name
        self._tag = f"{{{prefix}:{name}}}:"
        try:
            pool = redis_asyncio.BlockingConnectionPool.from_url(
                url,
                max_connections=MAX_CONNECTIONS,
                timeout=self._timeout,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                # One retry, on a broken connection (a stale one after a restart): safe,
                # as every write is idempotent by its operation id.
                retry=Retry(NoBackoff(), 1),
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"A RedisStore cannot use {self._redacted}: {self._scrub(str(exc))}"
            ) from None
        self._client: Redis = redis_asyncio.Redis(connection_pool=pool)
        self._reserve: AsyncScript = self._client.register_script(_RESERVE)
        self._add: AsyncScript = self._client.register_script(_ADD)
        self._undo: AsyncScript = self._client.register_script(_UNDO)
        self._reply_error: type[Exception] = ResponseError
        self._lost_reply: tuple[type[BaseException], ...] = (RedisError, OSError)
        self._undos: dict[str, tuple[float, tuple[Reservation, ...]]] = {}
        self._drainer: asyncio.Task[None] | None = None
        self._closed = False
        self._open_until = -math.inf  # the breaker: loop time until which calls fail at once
        self._probing = False  # a call is asking whether Redis is back
        self._calls = 0
        self._round_trips = 0
        # Calls made in one turn of the loop, sent together (see _send): (command, future).
        self._batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._failures = 0
        self._given_up = 0

    @property
    def url(self) -> str:
        """The Redis URL, scrubbed (its userinfo and query values shown as ``***``)."""
        return self._redacted

    @property
    def name(self) -> str:
        """The store's name (stores of one name on one Redis share counters)."""
        return self._name

    @property
    def timeout(self) -> float:
        """The longest one call may take, in seconds."""
        return self._timeout

    # ------------------------------------------------------------------ the Store protocol

    async def reserve(
        self, key: str, amount: float, *, limit: float | None, expires_at: float
    ) -> float | None:
        _check_amount(amount, signed=False)
        _check_limit(limit)
        reply = await self._reserve_all((Reservation(key, amount, limit, expires_at),))
        return float(reply[1:]) if reply.startswith("+") else None

    async def reserve_all(self, reservations: Sequence[Reservation]) -> int | None:
        for item in reservations:
            _check_amount(item.amount, signed=False)
            _check_limit(item.limit)
        if not reservations:
            self._check_open()
            return None
        reply = await self._reserve_all(tuple(reservations))
        return None if reply.startswith("+") else int(reply[1:])

    async def add(self, key: str, amount: float, *, expires_at: float) -> float:
        _check_amount(amount, signed=True)
        at = _ms(expires_at)
        self._check_open()
        keys = [self._operation(), self._tag + "c:" + key]
        args = [self._add_ttl_ms, _number(amount), at]
        # Shielded: a refund or a charge whose caller is cancelled still applies.
        running = asyncio.ensure_future(self._run(self._add, keys, args))
        running.add_done_callback(_read_outcome)
        reply = await asyncio.shield(running)
        return float(reply[1:])

    async def get(self, keys: Sequence[str]) -> list[float]:
        self._check_open()
        if not keys:
            return []
        names = [self._tag + "c:" + key for key in keys]
        values = await self._call(("MGET", names))
        return [0.0 if value is None else float(value) for value in values]

    async def aclose(self) -> None:
        """Give back what can be given back (within the timeout), then close the pool."""
        if self._closed:
            return
        self._closed = True
        drainer, self._drainer = self._drainer, None
        if drainer is not None:
            drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drainer
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._timeout):
                while self._undos:
                    await self._flush()
        if self._undos:
            self._give_up(len(self._undos), "the store was closed")
            self._undos.clear()
        await self._client.aclose()
        await self._client.connection_pool.aclose()

    # ------------------------------------------------------------------ calls

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"This RedisStore ({self._redacted}) is closed.")

    def _operation(self) -> str:
        return f"{self._tag}op:{secrets.token_hex(8)}"

    async def _reserve_all(self, reservations: tuple[Reservation, ...]) -> str:
        args = [_TTL_MS]
        for item in reservations:
            args += (_number(item.amount), _limit(item.limit), _ms(item.expires_at))
        self._check_open()
        operation = self._operation()
        keys = [operation, *(self._tag + "c:" + item.key for item in reservations)]
        return await self._run(self._reserve, keys, args, undo=reservations)

    async def _run(
        self,
        script: AsyncScript,
        keys: list[str],
        args: list[str],
        *,
        undo: tuple[Reservation, ...] | None = None,
    ) -> str:
        """One script, bounded; a reservation whose outcome is lost is undone later."""
        try:
            reply = await self._call(("EVALSHA", script, keys, args))
        except asyncio.CancelledError:
            if undo is not None:
                self._undo_later(keys[0], undo)
            raise
        except StoreUnavailableError as exc:
            if undo is not None and not isinstance(exc.__cause__, self._reply_error):
                self._undo_later(keys[0], undo)
            raise
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    @property
    def round_trips(self) -> int:
        """Round trips to Redis so far: calls made in one turn of the loop share one."""
        return self._round_trips

    def _refusing(self, now: float) -> StoreUnavailableError | None:
        """The breaker's refusal while it is open (or a call is asking), else None."""
        if now < self._open_until or self._probing:
            return self._unavailable(
                "it failed a moment ago and is asked again "
                + ("now" if self._probing else f"in {self._open_until - now:.2f} s")
            )
        return None

    async def _call(self, command: tuple[Any, ...]) -> Any:
        """One command (a script or a read), sent with the others of this turn of the loop.

        Auto-pipelining: under load, the requests of a turn (their tier and budget
        reservations, their settlements, their reads) share one round trip, each still
        its own atomic script; alone, a call costs one round trip as before. Bounded by
        the timeout like every call (the batch is); every failure a StoreUnavailableError
        whose cause is what Redis (or the connection) said.
        """
        loop = asyncio.get_running_loop()
        refused = self._refusing(loop.time())
        if refused is not None:
            raise refused
        future: asyncio.Future[Any] = loop.create_future()
        self._calls += 1
        if not self._batch:
            loop.call_soon(self._send_batch)
        self._batch.append((command, future))
        return await future

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        live = [(command, future) for command, future in batch if not future.done()]
        if not live:
            return
        task = asyncio.get_running_loop().create_task(self._send(live))
        task.add_done_callback(_read_outcome)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        """One pipeline of this turn's commands (scripts by SHA; ones Redis lost, resent
        whole): every future resolved, whatever happens."""
        try:
            await self._send_pipelined(batch)
        finally:
            # Whatever went wrong (a bug, the store closed under it, this task cancelled),
            # no caller waits for ever: an answer it did not get is a failed call.
            abandoned = self._unavailable("its answer was lost")
            for _, future in batch:
                if not future.done():
                    future.set_exception(_copy(abandoned, None))

    async def _send_pipelined(
        self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]
    ) -> None:
        loop = asyncio.get_running_loop()
        probe = self._open_until > -math.inf
        self._probing = probe
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._pipeline([command for command, _ in batch], by_sha=True)
                missing = [i for i, reply in enumerate(replies) if _no_script(reply)]
                if missing:  # a Redis restarted or flushed: the scripts whole, once more
                    again = await self._pipeline([batch[i][0] for i in missing], by_sha=False)
                    for i, reply in zip(missing, again, strict=True):
                        replies[i] = reply
        except TimeoutError:
            self._trip(loop)
            error = self._unavailable(f"it did not answer within {self._timeout:g} s")
            for _, future in batch:
                if not future.done():
                    future.set_exception(_copy(error, None))
            return
        except self._lost_reply as exc:
            self._trip(loop)
            error = self._unavailable(self._describe(exc))
            for _, future in batch:
                if not future.done():
                    future.set_exception(_copy(error, exc))
            return
        finally:
            if probe:
                self._probing = False
        self._open_until = -math.inf  # it answered: the breaker closes
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, BaseException):  # an error reply: an answer, no trip
                future.set_exception(_copy(self._unavailable(self._describe(reply)), reply))
            else:
                future.set_result(reply)

    async def _pipeline(self, commands: list[tuple[Any, ...]], *, by_sha: bool) -> list[Any]:
        self._round_trips += 1
        async with self._client.pipeline(transaction=False) as pipe:
            for command in commands:
                if command[0] == "MGET":
                    pipe.mget(command[1])
                else:
                    _, script, keys, args = command
                    if by_sha:
                        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                    else:
                        pipe.execute_command("EVAL", script.script, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def _trip(self, loop: asyncio.AbstractEventLoop) -> None:
        self._failures += 1
        self._open_until = loop.time() + BREAKER_OPEN

    def _unavailable(self, why: str) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"The counter store {self._redacted} ({self._tag[:-1]}) is unavailable: {why}; "
            "the limits kept there can be neither checked nor charged.",
            path=self._redacted,
        )

    def _describe(self, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        return self._scrub(f"{type(exc).__name__}: {text}".rstrip("."))

    def _scrub(self, text: str) -> str:
        return redact_text(text, self._url)

    # ------------------------------------------------------------------ undoing lost outcomes

    def _undo_later(self, operation: str, reservations: tuple[Reservation, ...]) -> None:
        if self._closed:
            self._give_up(1, "the store was closed")
            return
        loop = asyncio.get_running_loop()
        self._undos[operation] = (loop.time(), reservations)
        if len(self._undos) > MAX_PENDING_UNDOS:
            del self._undos[next(iter(self._undos))]
            self._give_up(1, f"more than {MAX_PENDING_UNDOS} were waiting")
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())

    async def _drain(self) -> None:
        """Send the pending undos until none is left, retrying while Redis does not answer."""
        loop = asyncio.get_running_loop()
        try:
            while self._undos:
                stale = [
                    op
                    for op, (since, _) in self._undos.items()
                    if loop.time() - since > OPERATION_TTL
                ]
                for op in stale:
                    del self._undos[op]
                if stale:
                    self._give_up(len(stale), f"Redis did not answer for {OPERATION_TTL:g} s")
                    continue
                try:
                    await self._flush()
                except StoreUnavailableError:
                    await asyncio.sleep(UNDO_RETRY)
        finally:
            if self._drainer is asyncio.current_task():
                self._drainer = None

    async def _flush(self) -> None:
        """Up to ``UNDO_BATCH`` undos, sent together (one pipeline, see ``_call``); the ones
        Redis answered are done, the first failure is raised for the rest."""
        batch = list(itertools.islice(self._undos.items(), UNDO_BATCH))
        calls = []
        for operation, (_, reservations) in batch:
            keys = [operation, *(self._tag + "c:" + item.key for item in reservations)]
            args = [_TTL_MS]
            for item in reservations:
                args += (_number(item.amount), _ms(item.expires_at))
            calls.append(self._call(("EVALSHA", self._undo, keys, args)))
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for (operation, _), outcome in zip(batch, outcomes, strict=True):
            if not isinstance(outcome, BaseException):
                self._undos.pop(operation, None)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    def _give_up(self, count: int, why: str) -> None:
        self._given_up += count
        logger.warning(
            "%s: %d reservation(s) whose outcome was lost could not be undone (%s); "
            "their counters may stay high until their windows end.",
            self._redacted,
            count,
            why,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<RedisStore {self._redacted} name={self._name!r} {state} "
            f"calls={self._calls} round_trips={self._round_trips} failures={self._failures} "
            f"undos={len(self._undos)} "
            f"given_up={self._given_up}>"
        )


def _copy(error: StoreUnavailableError, cause: BaseException | None) -> StoreUnavailableError:
    """A fresh exception per caller (one raised object must not travel through several
    tasks' tracebacks), with what Redis said as its cause."""
    fresh = StoreUnavailableError(str(error), path=error.path)
    fresh.__cause__ = cause
    return fresh


def _no_script(reply: Any) -> bool:
    """Whether a reply says Redis does not have the script (redis-py's ``NoScriptError``)."""
    return isinstance(reply, Exception) and any(
        kind.__name__ == "NoScriptError" for kind in type(reply).__mro__
    )


def _read_outcome(done: asyncio.Future[Any]) -> None:
    # An add whose caller left: its failure is read here rather than leaked as unread.
    if not done.cancelled():
        done.exception()

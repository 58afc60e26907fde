"""``cookbook``: the OpenAI cookbook's parallel processor, fed by the fleet instead of a file.

``api_request_parallel_processor.py`` keeps request and token budgets that refill at the
configured RPM and TPM (starting full: a minute's worth), and runs one loop that every
millisecond takes the next request (retries first), sends it if both budgets allow, and
sleeps. A reply whose body has an ``error`` is a failure; if its message says "rate limit",
the whole loop pauses for 15 s after it. A failed request goes back to the retry queue
until its 5 attempts are spent. It does not know when a caller stopped waiting: a request
whose caller gave up is still sent when its turn comes.

Adapted only where a file does not fit: each call is a job with a future the caller awaits,
the clock is the event loop's (so it also runs on virtual time), and the loop runs until
the strategy closes. Budgets are set to the provider's full quota; the cookbook advises
50–75 % of it, which would only lower its goodput further.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from dataclasses import dataclass

import orjson

from ...testing.replies import estimate_tokens
from ..sessions import Call
from .base import HTTPStatusError, Strategy, Target, chat_request
from .naive import DEFAULT_POOL

__all__ = ["CookbookStrategy"]

MAX_ATTEMPTS = 5
PAUSE_AFTER_RATE_LIMIT = 15.0
LOOP_SLEEP = 0.001


@dataclass(slots=True)
class _Job:
    call: Call
    tokens: float
    future: asyncio.Future[None]
    attempts_left: int = MAX_ATTEMPTS


class CookbookStrategy(Strategy):
    """RPM/TPM budgets, a 1 ms scheduling loop, a 15 s pause after a rate-limit error."""

    name = "cookbook"
    description = "OpenAI cookbook parallel processor: RPM/TPM budgets, 15 s pause, 5 attempts"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        config = target.config
        self._transport = target.transport(max_connections=DEFAULT_POOL)
        self._max_rpm = config.rps * 60.0
        self._max_tpm = config.tpm if config.tpm is not None else math.inf
        self._new: collections.deque[_Job] = collections.deque()
        self._retries: collections.deque[_Job] = collections.deque()
        self._in_progress: set[asyncio.Task[None]] = set()
        self._last_rate_limit_error = -math.inf
        self._loop_task: asyncio.Task[None] | None = None

    async def complete(self, call: Call) -> None:
        """Queue the call for the processor loop and wait for its fate."""
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._process())
        prompt = sum(len(message["content"]) for message in call.messages)
        job = _Job(
            call=call,
            tokens=estimate_tokens(prompt) + call.max_tokens,
            future=asyncio.get_running_loop().create_future(),
        )
        self._new.append(job)
        await job.future

    async def _process(self) -> None:
        loop = asyncio.get_running_loop()
        available_requests = self._max_rpm
        available_tokens = self._max_tpm
        last_update = loop.time()
        next_job: _Job | None = None
        while True:
            if next_job is None:
                if self._retries:
                    next_job = self._retries.popleft()
                elif self._new:
                    next_job = self._new.popleft()
            now = loop.time()
            elapsed = now - last_update
            available_requests = min(
                available_requests + self._max_rpm * elapsed / 60.0, self._max_rpm
            )
            available_tokens = min(available_tokens + self._max_tpm * elapsed / 60.0,
                                   self._max_tpm)
            last_update = now
            if (
                next_job is not None
                and available_requests >= 1
                and available_tokens >= next_job.tokens
            ):
                available_requests -= 1
                available_tokens -= next_job.tokens
                next_job.attempts_left -= 1
                task = asyncio.create_task(self._call_api(next_job))
                self._in_progress.add(task)
                task.add_done_callback(self._in_progress.discard)
                next_job = None
            await asyncio.sleep(LOOP_SLEEP)
            since_rate_limit = loop.time() - self._last_rate_limit_error
            if since_rate_limit < PAUSE_AFTER_RATE_LIMIT:
                await asyncio.sleep(PAUSE_AFTER_RATE_LIMIT - since_rate_limit)

    async def _call_api(self, job: _Job) -> None:
        error: BaseException | None = None
        try:
            response = await self._transport.send(chat_request(self.target.base_url, job.call))
            reply = orjson.loads(response.body)
            if isinstance(reply, dict) and "error" in reply:
                error = HTTPStatusError(response)
                message = str((reply["error"] or {}).get("message", ""))
                if "rate limit" in message.lower():
                    self._last_rate_limit_error = asyncio.get_running_loop().time()
        except Exception as exc:
            error = exc
        if error is None:
            if not job.future.done():
                job.future.set_result(None)
        elif job.attempts_left:
            self._retries.append(job)
        elif not job.future.done():
            job.future.set_exception(error)

    async def aclose(self) -> None:
        """Stop the loop and the requests in progress; close the session."""
        tasks = list(self._in_progress)
        if self._loop_task is not None:
            tasks.append(self._loop_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for job in (*self._new, *self._retries):
            job.future.cancel()
        await self._transport.aclose()

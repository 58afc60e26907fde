"""Refused requests leave no reference cycles: their memory goes back at once, not at a GC.

A refusal raised from a frame that still holds it (a local, a future that keeps it) makes
a cycle through its traceback: the frames, the ticket, the plan and the body stay alive
until the cyclic garbage collector finds them. Under overload most requests are refused,
and that garbage grew the heap fast enough to trigger full collections of hundreds of
milliseconds in a busy process's first seconds, the event loop stalled all the while.
"""

import asyncio
import collections
import gc
from collections.abc import Awaitable, Iterator

import pytest

from asyncquota import BusyError, Fixed, MockTransport, QuotaError, Request, Response, Shaper
from asyncquota.governance.budget import Price
from asyncquota.governance.gateway import Gateway
from asyncquota.governance.routing import Model, Router

HASTY = {"critical": 60.0, "interactive": 0.5, "batch": 60.0}
"""Interactive requests wait half a second at most: the line refuses the rest."""

FREE = Price(0.0, 0.0)


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The collector off, and what was garbage before collected: what follows is the test's."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def slow_upstream(seconds: float) -> MockTransport:
    async def answer(request: Request) -> Response:
        await asyncio.sleep(seconds)
        return Response(200, {}, b'{"usage": {"prompt_tokens": 10, "completion_tokens": 10}}')

    return MockTransport(answer)


def shaper(name: str) -> Shaper:
    return Shaper(
        f"http://{name}.test",
        transport=slow_upstream(5.0),
        limit=Fixed(1),
        hooks=(),
        max_wait=HASTY,
    )


async def outcome(call: Awaitable[object]) -> type[BaseException] | None:
    """The class of the refusal ``call`` ended with (None: served); the refusal dropped here,
    so only the library's frames could keep it."""
    try:
        await call
    except QuotaError as exc:
        return type(exc)
    return None


async def test_requests_that_leave_the_line_unserved_leave_no_cycle(collector_off):
    async with shaper("a") as a:
        first = asyncio.create_task(outcome(a.request("GET", "/v1/a", priority="interactive")))
        await asyncio.sleep(0)
        waiting = [
            asyncio.create_task(outcome(a.request("GET", "/v1/b", priority="interactive")))
            for _ in range(20)
        ]
        await asyncio.sleep(1)  # past their max_wait: the line refused them
        assert [task.result() for task in waiting] == [BusyError] * 20
        assert await first is None
        del waiting, first
    assert gc.collect() == 0


async def test_requests_every_model_refuses_through_a_gateway_leave_no_cycle(collector_off):
    shapers = {name: shaper(name) for name in ("a", "b")}
    router = Router(
        models=(
            Model("big", upstream="a", context_window=32_000, price=FREE),
            Model("small", upstream="b", context_window=32_000, price=FREE),
        ),
        fallbacks={"big": ["small"]},
        default_model="big",
    )
    body = {"messages": [{"role": "user", "content": "Where is my parcel?"}], "max_tokens": 50}

    def ask() -> asyncio.Task[type[BaseException] | None]:
        return asyncio.create_task(outcome(gateway.request(body, priority="interactive")))

    async with Gateway(upstreams=shapers, router=router) as gateway:
        # One in flight on each model, the rest in line until they leave it unserved ...
        waiting = [ask() for _ in range(40)]
        await asyncio.sleep(0.1)
        # ... and, while the lines are long, newcomers refused at each model's door.
        late = [ask() for _ in range(20)]
        refusals = collections.Counter(await asyncio.gather(*waiting, *late))
        del waiting, late
    assert refusals[None] == 2  # one served on each model
    assert refusals[BusyError] == 58
    assert gc.collect() == 0

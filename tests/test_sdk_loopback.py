"""The SDKs through a Shaper over real sockets: the Shaper's aiohttp transport, the simulated
upstream served on loopback (real time), and the README's example as written."""

import re
from pathlib import Path

import aiohttp
import pytest

from asyncquota.sdk import anthropic_client, openai_client
from asyncquota.shaper import Shaper
from asyncquota.testing import UpstreamConfig
from asyncquota.testing.server import serve

pytestmark = pytest.mark.looptime(False)

README = Path(__file__).resolve().parent.parent / "README.md"
MESSAGES = [{"role": "user", "content": "Where is my parcel?"}]


def quick_upstream() -> UpstreamConfig:
    return UpstreamConfig.preset("steady", latency_base=0.01, latency_per_token=0.0)


async def upstream_requests(base_url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/stats") as reply:
        return (await reply.json())["totals"]["requests"]


async def test_both_sdks_chat_stream_and_message_over_loopback():
    async with serve(quick_upstream()) as base_url:
        async with (
            Shaper(base_url, hooks=()) as shaper,
            openai_client(shaper, api_key="sk-test", base_url=f"{base_url}/v1") as oai,
            anthropic_client(shaper, api_key="sk-ant-test") as ant,
        ):
            reply = await oai.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=20
            )
            assert reply.choices[0].message.content.startswith("tok")
            stream = await oai.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                max_tokens=40,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"X-AsyncQuota-Priority": "batch"},
            )
            chunks = [chunk async for chunk in stream]
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 10
            message = await ant.messages.create(
                model="claude-haiku", messages=MESSAGES, max_tokens=20
            )
            assert message.content[0].text.startswith("tok")
            stats = shaper.statistics()
        assert (stats.sent, stats.ok, stats.inflight, stats.open_reservations) == (3, 3, 0, 0)
        assert await upstream_requests(base_url) == 3


async def test_the_readme_sdk_example_answers(monkeypatch):
    match = re.search(r"<!-- example: sdk -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README has no sdk example"
    namespace: dict[str, object] = {"__name__": "readme_sdk"}
    async with serve(quick_upstream()) as base_url:
        monkeypatch.setenv("LLM_BASE_URL", base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        exec(compile(match.group(1), "README.md:sdk", "exec"), namespace)
        answer = await namespace["ask"]("Where is my parcel?")  # type: ignore[operator]
        assert isinstance(answer, str) and answer.startswith("tok")
        assert await upstream_requests(base_url) == 1

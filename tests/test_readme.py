"""The README's examples run as written, against the simulated upstream on loopback."""

import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from asyncquota.testing import UpstreamConfig
from asyncquota.testing.server import serve

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.looptime(False)


def example(name: str) -> dict[str, object]:
    """Execute the README's python block marked ``<!-- example: name -->``; its namespace."""
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no example named {name!r}"
    namespace: dict[str, object] = {"__name__": f"readme_{name}"}
    exec(compile(match.group(1), f"README.md:{name}", "exec"), namespace)
    return namespace


def quick_upstream() -> UpstreamConfig:
    return UpstreamConfig.preset("steady", latency_base=0.01, latency_per_token=0.0)


async def test_the_embedding_example_serves_a_chat_turn(monkeypatch):
    async with serve(quick_upstream()) as base_url:
        monkeypatch.setenv("LLM_BASE_URL", base_url)
        make_app = example("embed")["make_app"]
        async with TestClient(TestServer(make_app())) as client:  # type: ignore[operator]
            response = await client.post("/chat", json={"question": "Where is my parcel?"})
            assert response.status == 200
            assert isinstance((await response.json())["answer"], str)


async def test_the_middleware_example_summarises_a_batch(monkeypatch):
    async with serve(quick_upstream()) as base_url:
        monkeypatch.setenv("LLM_BASE_URL", base_url)
        summarise_overnight = example("middleware")["summarise_overnight"]
        answers = await summarise_overnight(["late parcel", "refund", "broken zip"])  # type: ignore[operator]
        assert len(answers) == 3
        assert all(isinstance(answer, str) for answer in answers), answers

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


def readme_block(kind: str, name: str) -> str:
    match = re.search(rf"<!-- {kind}: {name} -->\n```\w+\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no {kind} block named {name!r}"
    return match.group(1)


async def test_the_governance_config_loads_and_the_gateway_example_answers(tmp_path, capsys):
    from asyncquota import MockTransport, Request, Response
    from asyncquota.governance import Gateway, load_config
    from asyncquota.testing import SimulatedUpstream

    path = tmp_path / "governance.toml"
    path.write_text(readme_block("config", "governance"))
    config = load_config(path)
    assert [m.name for m in config.models] == ["gpt-4o", "gpt-4o-mini", "claude-haiku"]
    assert config.store == tmp_path / "quota.sqlite3"
    openai = SimulatedUpstream(quick_upstream())
    keys: list[str | None] = []

    async def with_key(request: Request) -> Response:
        keys.append(request.headers.get("Authorization"))
        return await openai.handle(request)

    gateway = Gateway.from_config(
        path,
        transports={
            "openai": MockTransport(with_key),
            "anthropic": MockTransport(SimulatedUpstream(quick_upstream()).handle),
        },
        environ={
            "OPENAI_API_KEY": "sk-test",
            "ANTHROPIC_API_KEY": "sk-ant-test",
            "WECOM_WEBHOOK_URL": "http://127.0.0.1:9/cgi-bin/webhook/send?key=test",
        },
    )
    answer = example("gateway")["answer"]
    async with gateway:
        text = await answer(gateway, "acme", "Where is my parcel?")  # type: ignore[operator]
        status = await gateway.quota_status("acme", "gpt-4o-mini")
    assert isinstance(text, str) and text
    assert "gpt-4o-mini (default model)" in capsys.readouterr().out
    assert keys == ["Bearer sk-test"]
    assert {d.dimension: d.used for d in status.models["gpt-4o-mini"]}["rpd"] == 1
    assert (tmp_path / "quota.sqlite3").exists()  # the counters' store, beside the file


async def test_the_metrics_example_serves_what_the_shaper_did(monkeypatch):
    async with serve(quick_upstream()) as base_url:
        monkeypatch.setenv("LLM_BASE_URL", base_url)
        namespace = example("metrics")
        app = namespace["make_app"]()  # type: ignore[operator]
        async with TestClient(TestServer(app)) as client:
            shaper = app[namespace["SHAPER"]]
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
            await shaper.request("POST", "/v1/chat/completions", json=body)
            response = await client.get("/metrics")
            text = await response.text()
    assert response.status == 200
    assert 'asyncquota_requests_total{class="interactive",outcome="ok",upstream="openai"}' in text
    assert 'asyncquota_inflight{upstream="openai"} 0.0' in text

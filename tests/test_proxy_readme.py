"""The README's proxy section runs as written: its file, its curl and its SDK example, against
the proxy that file configures, over the simulated upstream on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import orjson
import pytest

from asyncquota.proxy import Proxy, load, serve
from asyncquota.testing import serve as serve_upstream

README = Path(__file__).resolve().parent.parent / "README.md"
ENVIRON = {
    "OPENAI_API_KEY": "sk-openai",
    "ANTHROPIC_API_KEY": "sk-ant",
    "ACME_PROXY_KEY": "sk-acme-0000",
}
README_URL = "http://127.0.0.1:8080"

pytestmark = pytest.mark.looptime(False)


def block(kind: str, name: str) -> str:
    match = re.search(rf"<!-- {kind}: {name} -->\n```\w+\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no {kind} block named {name!r}"
    return match.group(1)


async def readme_proxy(tmp_path: Path, upstream: str) -> Proxy:
    text = block("config", "proxy")
    for real in ("https://api.openai.com", "https://api.anthropic.com"):
        assert real in text
        text = text.replace(real, upstream)
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    settings, config = load(path)
    assert [key.tenant for key in settings.keys] == ["acme", "trial"]
    return Proxy.from_config(settings, config, environ=ENVIRON)


async def test_the_readme_curl_is_answered_through_the_proxy(tmp_path):
    from test_readme import quick_upstream

    script = block("shell", "proxy-curl")
    assert script.startswith("asyncquota proxy --config gateway.toml --port 8080 &\n")
    curl = script.partition("\n")[2].replace(README_URL, "{url}")
    async with serve_upstream(quick_upstream()) as upstream:
        proxy = await readme_proxy(tmp_path, upstream)
        async with serve(proxy) as url:
            done = await asyncio.create_subprocess_exec(
                "bash", "-c", curl.replace("{url}", url),
                env={**os.environ, **ENVIRON}, stdout=subprocess.PIPE,
            )
            out, _ = await done.communicate()
    assert done.returncode == 0
    assert orjson.loads(out)["choices"][0]["message"]["content"]


async def test_the_readme_sdk_example_asks_both_models_through_the_proxy(tmp_path, monkeypatch):
    from test_readme import quick_upstream

    for name, value in ENVIRON.items():
        monkeypatch.setenv(name, value)
    async with serve_upstream(quick_upstream()) as upstream:
        proxy = await readme_proxy(tmp_path, upstream)
        async with serve(proxy) as url:
            source = block("example", "proxy-sdk").replace(README_URL, url)
            namespace: dict[str, object] = {"__name__": "readme_proxy_sdk"}
            # The example's clients are synchronous: they run beside the loop serving them.
            await asyncio.to_thread(exec, compile(source, "README.md:proxy-sdk", "exec"), namespace)
        served = proxy.gateway.statistics().served
    assert namespace["reply"].choices[0].message.content  # type: ignore[attr-defined]
    assert namespace["message"].content[0].text  # type: ignore[attr-defined]
    assert served == 2

"""The one ``asyncquota`` command: its help, a missing extra, and the proxy as a process
(reloaded by SIGHUP, drained by SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from test_proxy import ENVIRON, HI, PRO_KEY, write_config

from asyncquota.cli import main
from asyncquota.testing import UpstreamConfig
from asyncquota.testing import serve as serve_upstream

ROOT = Path(__file__).resolve().parent.parent


def test_the_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in ("proxy", "bench", "tune"):
        assert f"    {command} " in out


@pytest.mark.parametrize(
    ("argv", "module", "extra"),
    [
        (["proxy", "--config", "gateway.toml"], "prometheus_client", "proxy"),
        (["bench", "--virtual"], "looptime", "bench"),
        (["tune", "--param", "retry_budget=0.1"], "matplotlib", "bench"),
    ],
)
def test_a_missing_extra_is_one_line_naming_the_pip_command(
    monkeypatch, capsys, argv, module, extra
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"needs {module}: pip install 'asyncquota[{extra}]'" in err


def test_a_wrong_proxy_file_is_one_line_naming_the_field(tmp_path, capsys):
    path = tmp_path / "gateway.toml"
    path.write_text(
        "[proxy]\nmax_body_bytes = -1\n[[proxy.keys]]\nname = 'x'\ntenant = 't'\nkey_env = 'K'\n"
    )
    assert main(["proxy", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == "asyncquota proxy: proxy.max_body_bytes must be an integer >= 1, not -1.\n"


# ---------------------------------------------------------------------------- as a process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def proxy_process(config: Path) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncquota", "proxy", "--config", str(config),
        "--port", str(port),
        cwd=ROOT, env={**os.environ, **ENVIRON}, stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(30):
            while b"listening on" not in (line := await process.stderr.readline()):
                assert line, "the proxy exited before it listened"
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def limit_of(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(
        f"{url}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 5},
        headers={"Authorization": f"Bearer {PRO_KEY}"},
    ) as response:
        assert response.status == 200
        return response.headers["x-ratelimit-limit-requests"]


@pytest.mark.looptime(False)
async def test_sighup_reloads_the_file_and_sigterm_lets_the_request_in_flight_finish(tmp_path):
    slow = UpstreamConfig.preset("steady", latency_base=0.5, latency_per_token=0.0)
    async with serve_upstream(slow) as upstream, aiohttp.ClientSession() as http:
        config = write_config(tmp_path / "gateway.toml", openai=upstream)
        async with proxy_process(config) as (url, process):
            assert await limit_of(http, url) == "600"
            config.write_text(config.read_text().replace("rpm = 600", "rpm = 900"))
            process.send_signal(signal.SIGHUP)
            assert process.stderr is not None
            async with asyncio.timeout(10):
                while b"reloaded" not in await process.stderr.readline():
                    pass
            assert await limit_of(http, url) == "900"

            in_flight = asyncio.ensure_future(limit_of(http, url))
            await asyncio.sleep(0.2)  # sent, and waiting for the upstream's half second
            process.send_signal(signal.SIGTERM)
            assert await in_flight == "900"
            assert await asyncio.wait_for(process.wait(), 30) == 0
            with pytest.raises(aiohttp.ClientConnectionError):
                await limit_of(http, url)

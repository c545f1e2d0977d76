"""``gpu-coordinator api-keys``: keys made, listed and revoked through a running
coordinator's admin API, and what the gateway then makes of them; ``serve``'s gateway."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from support.processes import free_port
from support.tls import make_server_tls

from coordinator import cli_args
from coordinator.errors import ConfigError
from coordinator.server import Coordinator


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    server = Coordinator(db_path=tmp_path / "coordinator.db", state_dir=tmp_path / "state")
    async with server:
        yield server


async def _cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _models(coordinator: Coordinator, key: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.get(
            f"{coordinator.gateway_url}/models", headers={"authorization": f"Bearer {key}"}
        )


async def test_a_key_is_created_shown_once_listed_without_its_text_and_revoked(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    code, out, err = await _cli("api-keys", "create", "alice", "--rate", "5", *state)
    assert (code, err) == (0, "")
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    key_id, key = fields["key id"].strip(), fields["key"].strip()
    assert key.startswith("gpk-")
    assert (await _models(coordinator, key)).json() == {"object": "list", "data": []}
    code, out, err = await _cli("api-keys", "list", "--json", *state)
    assert code == 0
    [listed] = json.loads(out)["keys"]
    assert (listed["key_id"], listed["name"], listed["rate_per_min"]) == (key_id, "alice", 5)
    assert key not in out
    code, out, _ = await _cli("api-keys", "list", *state)
    assert key_id in out
    assert "active" in out
    assert (await _cli("api-keys", "revoke", key_id, *state))[0] == 0
    refused = await _models(coordinator, key)
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
    assert "revoked" in (await _cli("api-keys", "list", *state))[1]


async def test_key_arguments_are_checked_before_anything_is_asked(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    for argv, code in (
        (["create", "", *state], "bad_key_name"),
        (["create", "a\nb", *state], "bad_key_name"),
        (["create", "alice", "--rate", "0", *state], "bad_rate"),
        (["revoke", "key-../../x", *state], "unknown_key_id"),
    ):
        status, out, err = await _cli("api-keys", *argv)
        assert (status, out) == (2, "")
        assert f"[{code}]" in err
    assert coordinator.store.api_keys.all() == []
    status, _, err = await _cli("api-keys", "revoke", "key-" + "0" * 16, *state)
    assert (status, "[unknown_key_id]" in err) == (1, True)


async def test_the_key_routes_need_the_admin_token_even_to_list(
    coordinator: Coordinator,
) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        listing = await client.get(f"{coordinator.admin_url}/api/keys")
        made = await client.post(f"{coordinator.admin_url}/api/keys", json={"name": "x"})
        public = await client.get(f"{coordinator.dashboard_url}api/keys")
    assert (listing.status_code, made.status_code, public.status_code) == (401, 401, 404)
    assert coordinator.store.api_keys.all() == []


def _serve_lines(argv: list[str]) -> list[str]:
    """What ``serve`` prints as it starts (it is stopped with SIGTERM after)."""
    command = [sys.executable, "-m", "coordinator.cli", "serve", *argv]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(5)]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        process.stdout.close()
    return lines


def test_the_gateway_is_two_ports_after_the_agents_unless_told() -> None:
    assert cli_args.gateway_port(8765, None) == 8767
    assert cli_args.gateway_port(8765, 9000) == 9000
    assert cli_args.gateway_port(0, None) == 0
    with pytest.raises(ConfigError) as refused:
        cli_args.gateway_port(65534, None)
    assert refused.value.code == "bad_address"


def test_serve_puts_the_gateway_where_told_or_any_free_port(tmp_path: Path) -> None:
    port, told = free_port(), free_port()
    state = ["--db", str(tmp_path / "c.db"), "--state-dir", str(tmp_path / "s")]
    lines = _serve_lines(
        ["--port", str(port), "--artifacts-port", "0", "--gateway-port", str(told), *state]
    )
    assert f"gateway at http://127.0.0.1:{told}/v1\n" in lines
    lines = _serve_lines(["--port", "0", *state])
    assert any(line.startswith("gateway at http://127.0.0.1:") for line in lines)


async def test_the_gateway_speaks_tls_with_the_coordinators_certificate(tmp_path: Path) -> None:
    tls = make_server_tls(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    server = Coordinator(
        db_path=tmp_path / "c.db", state_dir=tmp_path / "state", ssl_context=context
    )
    async with server:
        key = server.store.api_keys.create("tls", 60, 0.0)[1]
        assert server.gateway_url.startswith("https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=str(tls.ca_file))
        async with httpx.AsyncClient(trust_env=False, verify=trusting) as client:
            answer = await client.get(
                f"{server.gateway_url}/models", headers={"authorization": f"Bearer {key}"}
            )
        assert answer.json() == {"object": "list", "data": []}
        async with httpx.AsyncClient(trust_env=False) as untrusting:
            with pytest.raises(httpx.ConnectError):
                await untrusting.get(f"{server.gateway_url}/models")

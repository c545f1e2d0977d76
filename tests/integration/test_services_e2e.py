"""Issue 13's end to end, on the real engine with real daemons: one deployment of two
replicas over two nodes, called through the gateway with the official client. A stream
whose node is killed -9 ends in an error, not a hang, and the next request goes to the
other replica; a node drained lets its stream finish, then stops; a bad key gets 401, a
flood from one key 429 while another key is served.

The server is busybox in the container: a token stream of its own, one event every
0.2 s, so that "mid-stream" is a moment a test can hold (the real llama-server behind the
gateway and the tunnel is tests/integration/test_service_llama.py's and
test_gateway_llama.py's).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import openai
import pytest
from support.daemon_loop import DUAL_A5000, Loop, two_nodes
from support.gateway import new_key

MODEL = "slow"
EVENTS = 40
_EVENT = (
    'data: {"id":"c","object":"text_completion","created":0,"model":"slow",'
    '"choices":[{"index":0,"text":"x","finish_reason":null,"logprobs":null}]}'
)
SCRIPT = rf"""#!/bin/sh
length=0
while IFS= read -r line; do
  line=$(printf '%s' "$line" | tr -d '\r')
  [ -z "$line" ] && break
  case "$line" in [Cc]ontent-[Ll]ength:*) length=$(echo ${{line#*:}});; esac
done
[ "$length" -gt 0 ] && head -c "$length" > /dev/null
printf 'HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n'
i=0
while [ $i -lt {EVENTS} ]; do
  printf '%s\n\n' '{_EVENT}'
  i=$((i + 1))
  sleep 0.2
done
printf 'data: [DONE]\n\n'
"""
SERVE = (
    "mkdir -p /scratch && cat > /scratch/stream.sh <<'EOF'\n"
    + SCRIPT
    + "EOF\nchmod +x /scratch/stream.sh && exec nc -ll -p 8080 -e /scratch/stream.sh"
)


def _spec(image: str) -> dict[str, Any]:
    return {
        "kind": "service",
        "image": image,
        "command": ["sh", "-c", SERVE],
        "grace_s": 30,  # a drain lets a whole stream (8 s) finish
        "service": {
            "port": 8080,
            "models": [MODEL],
            "readiness": {"interval_s": 0.2, "timeout_s": 1},
            "liveness": {"interval_s": 1, "timeout_s": 1, "failures": 3},
        },
    }


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


_AGENT = (sys.executable, "-m", "agent.cli")


async def _read_all(stream: openai.AsyncStream[Any]) -> None:
    async for _ in stream:
        pass


def _cli(loop: Loop, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args, "--state-dir", str(loop.c.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_deployment_of_two_replicas_serves_through_the_gateway_and_outlives_a_node(
    tmp_path: Path,
    library_for: Callable[[Path], Path],
    test_image_id: str,
    docker_engine: str,
) -> None:
    library = library_for(DUAL_A5000)
    async with two_nodes(
        tmp_path, library, test_image_id, deploy_grace_s=600, deploy_interval_s=0.2
    ) as (a, b):
        c = a.c
        spec_file = tmp_path / "slow.json"
        spec_file.write_bytes(msgspec.json.encode(_spec(test_image_id)))
        deployed = await asyncio.to_thread(
            _cli, a, "deploy", str(spec_file), "--replicas", "2", "--name", "slow"
        )
        assert deployed.returncode == 0, deployed.stderr

        def ready_nodes() -> set[str]:
            return {
                row.node_id
                for row in c.store.jobs.recent(limit=50)
                if row.state == "ready" and row.node_id in c.tunnels.connected()
            }

        await _until(lambda: ready_nodes() == {a.node_id, b.node_id}, "a replica on each node")
        key, flood = new_key(c), new_key(c, rate_per_min=2, name="flood")
        client = openai.AsyncOpenAI(base_url=c.gateway_url, api_key=key, max_retries=0, timeout=60)
        async with client:
            # A bad key reaches no replica.
            async with openai.AsyncOpenAI(
                base_url=c.gateway_url, api_key="gpk-not-a-key", max_retries=0
            ) as stranger:
                with pytest.raises(openai.AuthenticationError):
                    await stranger.models.list()
            # A flood from one key: refused past its rate, while another key is served.
            async with openai.AsyncOpenAI(
                base_url=c.gateway_url, api_key=flood, max_retries=0
            ) as flooder:
                codes = []
                for _ in range(4):
                    try:
                        await flooder.models.list()
                        codes.append(200)
                    except openai.RateLimitError:
                        codes.append(429)
            assert codes[-1] == 429
            assert [m.id for m in (await client.models.list()).data] == [MODEL]

            # A stream; its node killed -9 mid-stream: an error, not a hang.
            stream = await client.completions.create(model=MODEL, prompt="hi", stream=True)
            first = await anext(aiter(stream))
            assert first.choices[0].text == "x"
            [serving] = [n for n in (a.node_id, b.node_id) if c.tunnels.open_streams(n)]
            victim, survivor = (a, b) if serving == a.node_id else (b, a)
            assert victim.agent is not None
            victim.agent.send_signal(signal.SIGKILL)
            await victim.exited()
            with pytest.raises((openai.APIError, openai.APIConnectionError)):
                await asyncio.wait_for(_read_all(stream), timeout=60)
            # The next request goes to the replica left.
            await _until(lambda: ready_nodes() == {survivor.node_id}, "the dead node gone")
            events = [e async for e in await client.completions.create(
                model=MODEL, prompt="hi", stream=True
            )]  # fmt: skip
            assert len(events) == EVENTS
            assert c.tunnels.open_streams(survivor.node_id) == 0

            # The survivor drained: the stream under way finishes whole, then the service
            # stops, and nothing is left to serve the model.
            stream = await client.completions.create(model=MODEL, prompt="hi", stream=True)
            received = [await anext(aiter(stream))]
            socket_path = survivor.workdir / "run" / "agent.sock"
            drain = asyncio.create_task(
                asyncio.to_thread(
                    subprocess.run,
                    [*_AGENT, "pause", "--drain", "--socket", str(socket_path)],
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
            )
            received += [event async for event in stream]
            assert len(received) == EVENTS
            assert (await drain).returncode == 0
            with pytest.raises(openai.APIStatusError) as gone:
                await client.completions.create(model=MODEL, prompt="hi")
            assert gone.value.status_code in (404, 503)

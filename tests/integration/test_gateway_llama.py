"""The gateway in front of the real llama-server: the official client, through the real
coordinator's gateway and a real tunnel, to the server in a container on an internal
network, serving the tiny real model; streamed and not, with the usage recorded."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import openai
import pytest
from support.gateway import new_key, replica, until
from support.llama_server import MODEL_ALIAS, PORT, LlamaServer, running_llama_server

from coordinator.admission import Settings
from coordinator.server import Coordinator

#: The end-of-sequence token is forbidden, so every request runs to its token budget.
NO_EOS = {"2": -100}
MAX_TOKENS = 12

pytestmark = pytest.mark.timeout(1800)  # a first build of the image, on a busy machine


@pytest.fixture(scope="module")
def server(docker_engine: str, llama_image: str, tiny_model_file: Path) -> Iterator[LlamaServer]:
    with running_llama_server(
        docker_engine, llama_image, tiny_model_file, args=["--embeddings", "--pooling", "mean"]
    ) as running:
        yield running


class Through(NamedTuple):
    """A client of the gateway, the coordinator, and a client straight to the server."""

    client: openai.AsyncOpenAI
    coordinator: Coordinator
    direct: openai.AsyncOpenAI


@pytest.fixture
async def through(server: LlamaServer, tmp_path: Path) -> AsyncIterator[Through]:
    async with (
        Coordinator(
            db_path=tmp_path / "c.db",
            state_dir=tmp_path / "state",
            settings=Settings(handshake_timeout_s=5.0),
        ) as coordinator,
        replica(coordinator, "svc-llama", (server.ip, PORT), [MODEL_ALIAS]),
        openai.AsyncOpenAI(
            base_url=coordinator.gateway_url,
            api_key=new_key(coordinator),
            max_retries=0,
            timeout=60,
        ) as opened,
        openai.AsyncOpenAI(
            base_url=server.base_url, api_key="unused", max_retries=0, timeout=60
        ) as direct,
    ):
        yield Through(opened, coordinator, direct)


async def _record(coordinator: Coordinator, count: int) -> dict[str, Any]:
    """The newest record, once ``count`` are written."""

    def written() -> bool:
        coordinator.gateway.records.flush()
        return len(coordinator.store.requests.recent(count)) == count

    await until(written, "the request's record")
    record: dict[str, Any] = msgspec.to_builtins(coordinator.store.requests.recent(1)[0])
    return record


async def test_a_chat_completion_and_an_embedding_through_the_gateway(through: Through) -> None:
    client = through.client
    assert [m.id for m in (await client.models.list()).data] == [MODEL_ALIAS]
    chat = await client.chat.completions.create(
        model=MODEL_ALIAS,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        logit_bias=NO_EOS,
    )
    assert chat.usage is not None
    assert chat.usage.completion_tokens == MAX_TOKENS
    record = await _record(through.coordinator, 2)  # after GET /v1/models
    assert (record["job_id"], record["status"], record["code"]) == ("svc-llama", 200, "")
    assert (record["tokens_in"], record["tokens_out"]) == (chat.usage.prompt_tokens, MAX_TOKENS)
    embedded = await client.embeddings.create(model=MODEL_ALIAS, input="the water")
    assert len(embedded.data[0].embedding) > 8


async def _deltas(client: openai.AsyncOpenAI) -> tuple[list[str | None], int]:
    """A greedy streamed chat's deltas, event by event, and its reported completion tokens."""
    stream = await client.chat.completions.create(
        model=MODEL_ALIAS,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        logit_bias=NO_EOS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    usage = [c.usage.completion_tokens for c in chunks if c.usage is not None]
    return [c.choices[0].delta.content for c in chunks if c.choices], usage[-1]


async def test_a_token_stream_through_the_gateway_is_the_servers_event_by_event(
    through: Through,
) -> None:
    deltas, tokens = await _deltas(through.client)
    assert (deltas, tokens) == await _deltas(through.direct)
    assert tokens == MAX_TOKENS
    assert len([d for d in deltas if d]) >= 3
    record = await _record(through.coordinator, 1)
    assert (record["stream"], record["tokens_out"]) == (True, MAX_TOKENS)
    assert record["ttft_s"] is not None

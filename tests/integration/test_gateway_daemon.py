"""The gateway over the whole loop: the coordinator offers a service, the real agent
daemon runs it in a container and reports it ready, and a client's request, with the
official client, reaches it through the gateway and the node's tunnel."""

from __future__ import annotations

import openai
from support.daemon_loop import Loop, job_spec
from support.gateway import new_key

# An OpenAI-style answer from busybox: nc serves each connection with the script, which
# reads the request's head and body and answers one completion (its /health as well).
ANSWER = (
    '{"id":"c","object":"text_completion","created":0,"model":"tiny",'
    '"system_fingerprint":"in-the-container","choices":[{"index":0,"text":"hi",'
    '"finish_reason":"stop","logprobs":null}],'
    '"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}'
)
SCRIPT = r"""#!/bin/sh
length=0
while IFS= read -r line; do
  line=$(printf '%s' "$line" | tr -d '\r')
  [ -z "$line" ] && break
  case "$line" in [Cc]ontent-[Ll]ength:*) length=$(echo ${line#*:});; esac
done
[ "$length" -gt 0 ] && head -c "$length" > /dev/null
body='ANSWER'
printf 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
printf 'Content-Length: %d\r\nConnection: close\r\n\r\n%s' "${#body}" "$body"
""".replace("ANSWER", ANSWER)
SERVE = (
    "mkdir -p /scratch && cat > /scratch/answer.sh <<'EOF'\n"
    + SCRIPT
    + "EOF\nchmod +x /scratch/answer.sh && exec nc -ll -p 8080 -e /scratch/answer.sh"
)
SERVICE = {
    "port": 8080,
    "models": ["tiny"],
    "readiness": {"interval_s": 0.2},
    "liveness": {"interval_s": 0.5},
}


async def test_a_service_the_daemon_runs_answers_a_client_through_the_gateway(
    loop: Loop,
) -> None:
    node_id = loop.node_id
    spec = {**job_spec(loop.image, SERVE), "kind": "service", "service": SERVICE}
    job_id = await loop.c.submit(node_id, spec)
    await loop.until(lambda: "ready" in loop.states(job_id), "the service to be ready")
    await loop.until(lambda: node_id in loop.c.tunnels.connected(), "the node's tunnel")
    async with openai.AsyncOpenAI(
        base_url=loop.c.gateway_url, api_key=new_key(loop.c), max_retries=0, timeout=30
    ) as client:
        assert [m.id for m in (await client.models.list()).data] == ["tiny"]
        answer = await client.completions.create(model="tiny", prompt="hello")
    assert answer.system_fingerprint == "in-the-container"
    assert answer.choices[0].text == "hi"

    def recorded() -> bool:
        loop.c.gateway.records.flush()
        return len(loop.c.store.requests.recent(2)) == 2

    await loop.until(recorded, "the records")
    record = loop.c.store.requests.recent(1)[0]
    assert (record.node_id, record.job_id, record.status) == (node_id, job_id, 200)
    assert (record.tokens_in, record.tokens_out) == (2, 1)

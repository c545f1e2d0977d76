"""The real llama-server straight to its container: the baseline the tunnel is measured against.

Run with ``python bench/llama_direct.py --runs N --tokens T`` (``make llama-image`` first, or
the first run builds the image). One container (tests/support/llama_server.py: internal
network, no published port, the tiny model of tests/support/tiny_model.py), called with the
official ``openai`` client at the container's address:

- small: wall time of a one-token completion (the request's round trip, nearly no compute);
- stream: a streamed chat completion of ``T`` tokens (end-of-sequence forbidden): time to
  first token, tokens/s seen by the client (the tokens after the first over the time from
  the first chunk to the last), and tokens/s the server reports for itself (its
  ``timings.predicted_per_second``).

The server decodes on ``--threads`` threads (default 1: on a shared two-core machine a
second thread makes the figures swing tenfold, ggml's threads spinning on a preempted one).

Min/median/max printed and written to ``bench/results/llama_direct.json``. Nothing asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.llama import llama_server_image  # noqa: E402
from support.llama_server import MODEL_ALIAS, running_llama_server  # noqa: E402
from support.stats import spread  # noqa: E402
from support.tiny_model import tiny_model  # noqa: E402

SOCKET = "/var/run/docker.sock"
NO_EOS = {"2": -100}


def _small(client: openai.OpenAI) -> float:
    start = time.perf_counter()
    client.completions.create(model=MODEL_ALIAS, prompt="hello", max_tokens=1, temperature=0)
    return time.perf_counter() - start


def _stream(client: openai.OpenAI, tokens: int) -> tuple[float, float, float]:
    """Time to first token, client-side tokens/s after it, the server's own tokens/s."""
    start = time.perf_counter()
    first = last = 0.0
    server_rate = 0.0
    generated = 0
    stream = client.chat.completions.create(
        model=MODEL_ALIAS,
        messages=[{"role": "user", "content": "tell me a story about the water"}],
        max_tokens=tokens,
        temperature=0,
        logit_bias=NO_EOS,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
            if chunk.usage is not None:
                generated = chunk.usage.completion_tokens
            timings = (chunk.model_extra or {}).get("timings")
            if isinstance(timings, dict):
                server_rate = float(timings.get("predicted_per_second", 0.0))
    # Tokens, from the usage the server reports: a chunk may carry more than one (a
    # character's bytes are held back until it is whole).
    rate = (generated - 1) / (last - first) if generated > 1 and last > first else 0.0
    return first - start, rate, server_rate


def main(runs: int, tokens: int, threads: int) -> dict[str, object]:
    """Start one server; ``runs`` small requests and ``runs`` streams; the figures."""
    image = llama_server_image(SOCKET)
    model = tiny_model()
    with (
        running_llama_server(SOCKET, image, model, threads=threads) as server,
        openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client,
    ):
        _small(client)  # warm-up: the first requests pay for buffers the others reuse
        _stream(client, tokens)
        small = [_small(client) for _ in range(runs)]
        streams = [_stream(client, tokens) for _ in range(runs)]
    return {
        "image": image,
        "model_bytes": model.stat().st_size,
        "runs": runs,
        "tokens": tokens,
        "threads": threads,
        "small_request_s": spread(small),
        "ttft_s": spread([s[0] for s in streams]),
        "client_tokens_per_s": spread([s[1] for s in streams]),
        "server_tokens_per_s": spread([s[2] for s in streams]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    text = json.dumps(main(args.runs, args.tokens, args.threads), indent=2)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "llama_direct.json").write_text(text + "\n")

"""The real llama-server, built from source into a scratch image, serving the tiny real model
in a container on an internal network, called with the official ``openai`` client."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from support.llama import EngineUnreachable, llama_server_image
from support.llama_server import MODEL_ALIAS, PORT, LlamaServer, running_llama_server
from support.paths import ROOT
from support.tiny_model import TinyModel, write_tiny_model

#: The end-of-sequence token is forbidden, so every request runs to its token budget.
NO_EOS = {"2": -100}
MAX_TOKENS = 12

#: A request that gets no answer fails after this long, not after the client's ten minutes.
REQUEST_TIMEOUT_S = 60

# The first run on a machine builds the image in the fixture's setup (nine minutes on two
# busy cores; ``make llama-image`` or .ci/run does it before the tests instead).
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def server(docker_engine: str, llama_image: str, tiny_model_file: Path) -> Iterator[LlamaServer]:
    """One server for the module, with embeddings (mean pooling) beside completions."""
    with running_llama_server(
        docker_engine, llama_image, tiny_model_file, args=["--embeddings", "--pooling", "mean"]
    ) as running:
        yield running


@pytest.fixture
def client(server: LlamaServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.base_url, api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    ) as opened:
        yield opened


def _docker(docker_engine: str, *args: str) -> str:
    return subprocess.run(
        ["docker", "--host", f"unix://{docker_engine}", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _labelled(docker_engine: str) -> tuple[list[str], list[str]]:
    """The test containers (running or not) and networks of llama servers."""
    label = "label=gpu-agent-test=llama"
    containers = _docker(docker_engine, "ps", "--all", "--quiet", "--filter", label).split()
    networks = _docker(docker_engine, "network", "ls", "--quiet", "--filter", label).split()
    return sorted(containers), sorted(networks)


def test_the_image_holds_the_server_its_libraries_and_the_loader_only(
    docker_engine: str, llama_image: str
) -> None:
    container = _docker(docker_engine, "create", llama_image)
    try:
        exported = subprocess.run(
            ["docker", "--host", f"unix://{docker_engine}", "export", container],
            capture_output=True,
            check=True,
        ).stdout
    finally:
        _docker(docker_engine, "rm", container)
    with tarfile.open(fileobj=io.BytesIO(exported)) as archive:
        files = {m.name for m in archive.getmembers() if m.isfile()}
    # What the engine itself puts in every container's root, as empty files.
    files -= {".dockerenv", "dev/console", "etc/hostname", "etc/hosts", "etc/resolv.conf"}
    libraries = files - {"bin/llama-server"}
    assert "bin/llama-server" in files
    assert {name.rsplit("/", 1)[1].split(".so")[0] for name in libraries} == {
        "ld-linux-x86-64",
        "libc",
        "libgcc_s",
        "libgomp",
        "libm",
        "libstdc++",
    }
    user = _docker(docker_engine, "image", "inspect", "-f", "{{.Config.User}}", llama_image)
    assert user == "65534:65534"


def test_the_server_sits_on_an_internal_network_with_no_published_port(
    docker_engine: str, server: LlamaServer, client: openai.OpenAI
) -> None:
    assert _docker(docker_engine, "network", "inspect", "-f", "{{.Internal}}", server.network) == (
        "true"
    )
    assert _docker(docker_engine, "port", server.container) == ""
    # ...and the host reaches it at its own address on that network all the same.
    assert [model.id for model in client.models.list()] == [MODEL_ALIAS]
    assert server.base_url == f"http://{server.ip}:{PORT}/v1"


def test_a_completion_returns_real_tokens_and_their_count(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL_ALIAS,
        prompt="hello world, the model",
        max_tokens=MAX_TOKENS,
        temperature=0,
        logit_bias=NO_EOS,
    )
    assert completion.choices[0].text
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == MAX_TOKENS
    # <s>, then "▁hello", "▁world", ",", "▁the", "▁model": the tokenizer ran on the vocabulary.
    assert completion.usage.prompt_tokens == 6


def test_greedy_decoding_is_repeatable(client: openai.OpenAI) -> None:
    texts = {
        client.completions.create(
            model=MODEL_ALIAS, prompt="the water", max_tokens=8, temperature=0, logit_bias=NO_EOS
        )
        .choices[0]
        .text
        for _ in range(2)
    }
    assert len(texts) == 1


def test_a_chat_completion_goes_through_the_chat_template(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL_ALIAS,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        logit_bias=NO_EOS,
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None
    assert chat.usage.completion_tokens == MAX_TOKENS
    # The template's "<|user|>\n", "</s>\n" and "<|assistant|>\n" around one word.
    assert chat.usage.prompt_tokens > 10


def test_a_streamed_chat_completion_arrives_in_several_chunks(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_ALIAS,
        messages=[{"role": "user", "content": "tell me a story"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        logit_bias=NO_EOS,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        chunks = list(stream)
    texts = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices]
    assert len([text for text in texts if text]) >= 3
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] == "length"
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1
    assert usage[0].completion_tokens == MAX_TOKENS


def test_embeddings_are_served_beside_completions(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=MODEL_ALIAS, input=["hello world", "the water"])
    vectors = [item.embedding for item in result.data]
    assert [len(v) for v in vectors] == [128, 128]  # the model's n_embd
    assert vectors[0] != vectors[1]
    assert result.usage.prompt_tokens > 0


def test_an_f16_model_is_served_too(docker_engine: str, llama_image: str, tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "model.gguf", TinyModel(f16=True))
    model.chmod(0o644)
    with (
        running_llama_server(docker_engine, llama_image, model) as server,
        openai.OpenAI(
            base_url=server.base_url, api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
        ) as client,
    ):
        completion = client.completions.create(
            model=MODEL_ALIAS, prompt="hello", max_tokens=4, temperature=0, logit_bias=NO_EOS
        )
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4
    assert completion.choices[0].text


def test_a_server_that_cannot_load_its_model_fails_with_its_log_and_leaves_nothing(
    docker_engine: str, llama_image: str, tmp_path: Path
) -> None:
    model = write_tiny_model(tmp_path / "model.gguf", TinyModel(n_embd=64, n_ff=128))
    model.chmod(0o600)  # root's alone: the server runs as nobody
    before = _labelled(docker_engine)
    with (
        pytest.raises(RuntimeError, match=r"never became ready(?s:.*)Permission denied"),
        running_llama_server(docker_engine, llama_image, model),
    ):
        pytest.fail("the server came up")
    assert _labelled(docker_engine) == before


def _build_script(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/build_llama_image.py"), *args],
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_the_build_script_finds_the_image_and_fetches_nothing(
    docker_engine: str, llama_image: str, tmp_path: Path
) -> None:
    done = _build_script(tmp_path / "cache", "--docker-socket", docker_engine)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{llama_image}\n", "")
    assert not (tmp_path / "cache").exists()  # no download, no build tree


def test_no_engine_on_the_socket_is_a_usage_error_before_anything_is_fetched(
    tmp_path: Path,
) -> None:
    done = _build_script(tmp_path / "cache", "--docker-socket", str(tmp_path / "none.sock"))
    assert done.returncode == 2
    assert "build-llama-image: no Docker engine at" in done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "cache").exists()
    with pytest.raises(EngineUnreachable):
        llama_server_image(str(tmp_path / "none.sock"))

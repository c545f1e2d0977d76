"""``gpu-coordinator`` against hostile input: every bad argument or file gets a coded error
on stderr, exit status 2 (1 for a coordinator that cannot be reached or answers nonsense),
no traceback, and nothing written, signed or sent.

The CLI runs in-process (``cli.main``), against a real Coordinator on 127.0.0.1:0 with a
real SQLite file where it needs one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.admission import acks_stored
from support.coordinator_cli_hostile import Capsys, main, refused
from support.coordinator_peer import Peer, connected

from agent.protocol.messages import AttestRequest
from coordinator import cli
from coordinator.errors import JobError
from coordinator.server import Coordinator, Settings

GOOD_SPEC = 'image = "busybox@sha256:' + "a" * 64 + '"\ncommand = ["true"]\n'


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    server = Coordinator(
        db_path=tmp_path / "c.db",
        state_dir=tmp_path / "state",
        settings=Settings(handshake_timeout_s=5.0),
    )
    async with server:
        yield server


async def _known_node(coordinator: Coordinator) -> str:
    """A node the coordinator knows (it connected once), so that it would be offered jobs."""
    peer = Peer()
    pinned = {coordinator.key.key_id: coordinator.key.public_key}
    async with connected(coordinator.url, pinned, peer) as link:
        await link.take(AttestRequest)
    await acks_stored(coordinator, peer.node_id)
    return peer.node_id


# ------------------------------------------------------------------ 1. specs checked before signing


@pytest.mark.parametrize(
    ("file", "code"),
    [
        (("empty.toml", ""), "missing_field"),
        (("unknown.toml", GOOD_SPEC + "colour = 'red'\n"), "unknown_field"),
        (("privileged.toml", GOOD_SPEC + "privileged = true\n"), "forbidden_field"),
        (("nested.json", '{"image": "x", "gpus": {"CapAdd": ["ALL"]}}'), "forbidden_field"),
        (("escape.toml", GOOD_SPEC + 'outputs = ["../../etc/passwd"]\n'), "bad_value"),
        (
            ("input.toml", GOOD_SPEC + '[[inputs]]\npath = "../../etc/passwd"\ncontent = "x"\n'),
            "bad_value",
        ),
        (("docker-units.toml", GOOD_SPEC + '[resources]\nmemory_bytes = "1g"\n'), "bad_value"),
        (("list.json", "[1, 2]"), "bad_spec"),
    ],
)
async def test_submit_refuses_a_spec_a_node_would_refuse_with_its_code_and_sends_nothing(
    coordinator: Coordinator, tmp_path: Path, capsys: Capsys, file: tuple[str, str], code: str
) -> None:
    name, text = file
    node = await _known_node(coordinator)
    before = coordinator.store.streams.outbound(node)
    (tmp_path / name).write_text(text)
    state = str(coordinator.state_dir)
    returned = await main("submit", str(tmp_path / name), "--node", node, "--state-dir", state)
    refused(capsys, cli.EXIT_USAGE, code)(returned)
    assert coordinator.store.jobs.recent() == []
    assert coordinator.store.streams.outbound(node) == before


async def test_submit_of_a_good_spec_still_goes_out(
    coordinator: Coordinator, tmp_path: Path, capsys: Capsys
) -> None:
    node = await _known_node(coordinator)
    (tmp_path / "job.toml").write_text(GOOD_SPEC + '[resources]\nmemory_bytes = "64MiB"\n')
    argv = ["submit", str(tmp_path / "job.toml"), "--node", node, "--job-id", "job-ok"]
    assert await main(*argv, "--state-dir", str(coordinator.state_dir)) == 0
    assert capsys.readouterr().out == "job-ok\n"
    [job] = coordinator.store.jobs.recent()
    assert job.job_id == "job-ok"


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ({"image": "x", "privileged": True}, "forbidden_field"),
        ({"image": "x", "outputs": ["../../etc/passwd"]}, "bad_value"),
        ({}, "missing_field"),
    ],
)
async def test_the_coordinator_signs_no_spec_a_node_would_refuse(
    coordinator: Coordinator, spec: dict[str, object], code: str
) -> None:
    node = await _known_node(coordinator)
    with pytest.raises(JobError) as refused:
        await coordinator.submit(node, spec)
    assert refused.value.code == code
    assert coordinator.store.jobs.recent() == []


# ------------------------------------------------------------------ 2. nesting, ids, ttl


@pytest.mark.parametrize(
    ("options", "code"),
    [
        (["--job-id", "../../x"], "bad_job_id"),
        (["--job-id", ""], "bad_job_id"),
        (["--job-id", "j" * 65], "bad_job_id"),
        (["--job-id=-x"], "bad_job_id"),
        (["--job-id", "job-1\n"], "bad_job_id"),  # the protocol's pattern would take it
        (["--node", "no de"], "bad_node_id"),
        (["--node", "node\n"], "bad_node_id"),
        (["--node", "n" * 129], "bad_node_id"),
        (["--ttl", "inf"], "bad_argument"),
        (["--ttl", "nan"], "bad_argument"),
        (["--ttl", str(31 * 86400)], "bad_ttl"),
        (["--upload", "result.txt"], "bad_upload_target"),
        (["--upload", "=https://s3.example/b/k"], "bad_upload_target"),
        (["--upload", "a=https://x/1", "--upload", "a=https://x/2"], "bad_upload_target"),
        (["--out", "outputs"], "bad_request"),  # --out without --wait
    ],
)
async def test_submit_refuses_bad_ids_and_ttls_before_reaching_the_coordinator(
    coordinator: Coordinator, tmp_path: Path, capsys: Capsys, options: list[str], code: str
) -> None:
    node = await _known_node(coordinator)
    (tmp_path / "job.toml").write_text(GOOD_SPEC)
    argv = ["submit", str(tmp_path / "job.toml"), "--node", node, *options]
    returned = await main(*argv, "--state-dir", str(coordinator.state_dir))
    refused(capsys, cli.EXIT_USAGE, code)(returned)
    assert coordinator.store.jobs.recent() == []


# ------------------------------------------------------------------ 3. serve: nothing written


# ------------------------------------------------------------------ 4. key is read-only


# ------------------------------------------------------------------ 5. URLs


# ------------------------------------------------------------------ 6. bounded reads

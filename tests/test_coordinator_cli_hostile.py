"""``gpu-coordinator`` against hostile input: every bad argument or file gets a coded error
on stderr, exit status 2 (1 for a coordinator that cannot be reached or answers nonsense),
no traceback, and nothing written, signed or sent.

The CLI runs in-process (``cli.main``), against a real Coordinator on 127.0.0.1:0 with a
real SQLite file where it needs one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest
from coordinator_peer import Peer, connected

from agent.protocol.jobs import Offer
from agent.protocol.messages import AttestRequest
from coordinator import cli, cli_args, keys
from coordinator.errors import JobError
from coordinator.server import Coordinator, Settings

GOOD_SPEC = 'image = "busybox@sha256:' + "a" * 64 + '"\ncommand = ["true"]\n'
Capsys = pytest.CaptureFixture[str]


def _refused(capsys: Capsys, status: int, code: str) -> Callable[[int], None]:
    """A check that ``main`` returned ``status`` and said ``code``, in the CLI's format."""

    def check(returned: int) -> None:
        err = capsys.readouterr().err
        assert returned == status, err
        # argparse's own errors name the command: "gpu-coordinator submit: error [...]".
        assert re.match(rf"gpu-coordinator( [a-z]+)?: error \[{code}\]: ", err), err
        assert "Traceback" not in err

    return check


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


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
    return peer.node_id


def _run(argv: list[str]) -> int:
    """``cli.main``'s exit status, also when argparse exits."""
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return int(str(exit_.code))


async def _main(*argv: str) -> int:
    """:func:`_run` in a thread: it blocks, and the coordinator runs on this loop."""
    return await asyncio.to_thread(_run, list(argv))


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
    returned = await _main("submit", str(tmp_path / name), "--node", node, "--state-dir", state)
    _refused(capsys, cli.EXIT_USAGE, code)(returned)
    assert coordinator.store.jobs.recent() == []
    assert coordinator.store.streams.outbound(node) == before


async def test_submit_of_a_good_spec_still_goes_out(
    coordinator: Coordinator, tmp_path: Path, capsys: Capsys
) -> None:
    node = await _known_node(coordinator)
    (tmp_path / "job.toml").write_text(GOOD_SPEC + '[resources]\nmemory_bytes = "64MiB"\n')
    argv = ["submit", str(tmp_path / "job.toml"), "--node", node, "--job-id", "job-ok"]
    assert await _main(*argv, "--state-dir", str(coordinator.state_dir)) == 0
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
    ("name", "text"),
    [("deep.json", "[" * 100_000), ("deep.toml", "a = " + "[" * 100_000)],
)
def test_deeply_nested_spec_is_a_coded_error(
    tmp_path: Path, capsys: Capsys, name: str, text: str
) -> None:
    (tmp_path / name).write_text(text)
    returned = cli.main(["submit", str(tmp_path / name), "--node", "n", "--state-dir", "x"])
    _refused(capsys, cli.EXIT_USAGE, "bad_spec")(returned)


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
    returned = await _main(*argv, "--state-dir", str(coordinator.state_dir))
    _refused(capsys, cli.EXIT_USAGE, code)(returned)
    assert coordinator.store.jobs.recent() == []


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["cancel", "../../x"], "bad_job_id"),
        (["cancel", "job-1", "--reason", "r" * 1025], "bad_reason"),
    ],
)
def test_cancel_refuses_bad_arguments_before_reaching_the_coordinator(
    tmp_path: Path, capsys: Capsys, argv: list[str], code: str
) -> None:
    # No coordinator ran there: a check after reaching it would say admin_file_missing.
    returned = cli.main([*argv, "--state-dir", str(tmp_path)])
    _refused(capsys, cli.EXIT_USAGE, code)(returned)


@pytest.mark.parametrize(
    "value",
    [
        *("job-1", "a", "A.b_c-9", "j" * 64, "j" * 65, "", "-x", ".x", "_x", "a b", "../x"),
        *("n" * 128, "n" * 129, "a:b@c/d+e=f", "é", "x\ty", "x/"),
    ],
)
def test_the_clis_id_checks_agree_with_the_protocol(value: str) -> None:
    def protocol_takes(field: str) -> bool:
        offer = {"job_id": "j", "node_id": "n", "spec": {}, "issued_at": 0, "expires_at": 1}
        try:
            msgspec.convert({**offer, field: value}, Offer)
        except msgspec.ValidationError:
            return False
        return True

    assert bool(cli_args.JOB_ID.fullmatch(value)) == protocol_takes("job_id")
    assert bool(cli_args.NODE_ID.fullmatch(value)) == protocol_takes("node_id")


# ------------------------------------------------------------------ 3. serve: nothing written


def _serve(tmp_path: Path, *options: str, db: Path | None = None) -> list[str]:
    argv = ["serve", "--port", "0", "--state-dir", str(tmp_path / "state")]
    return [*argv, "--db", str(db or tmp_path / "c.db"), *options]


@pytest.mark.parametrize(
    "db",
    [
        lambda d: d,  # a directory
        lambda d: d / "missing" / "c.db",  # in a folder that does not exist
        lambda d: d / "notes.txt",  # a file that is not a database
        lambda d: d / "fifo.db",  # a FIFO: opening it would block
        lambda d: d / "notes.txt" / "c.db",  # under a file
        lambda d: d / "outbox.db",  # another program's database
        lambda d: d / "corrupt.db",
    ],
    ids=[
        *("directory", "missing-folder", "not-a-database", "fifo", "under-a-file"),
        *("another-programs-database", "corrupt"),
    ],
)
def test_serve_refuses_an_unusable_database_and_writes_nothing(
    tmp_path: Path, capsys: Capsys, db: Callable[[Path], Path]
) -> None:
    (tmp_path / "notes.txt").write_text("not a database, but my notes\n")
    os.mkfifo(tmp_path / "fifo.db")
    with contextlib.closing(sqlite3.connect(tmp_path / "outbox.db")) as other:
        other.execute("PRAGMA journal_mode=WAL")
        other.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, body BLOB)")
        other.execute("CREATE TABLE jobs (job_id TEXT PRIMARY KEY)")
    (tmp_path / "corrupt.db").write_bytes(b"SQLite format 3\0" + b"\xff" * 4096)
    contents = {p: p.read_bytes() for p in tmp_path.glob("*.*") if p.is_file()}
    before = _tree(tmp_path)
    returned = cli.main(_serve(tmp_path, db=db(tmp_path)))
    _refused(capsys, cli.EXIT_USAGE, "bad_db")(returned)
    assert _tree(tmp_path) == before  # no key, no -wal or -shm beside a database
    assert {p: p.read_bytes() for p in contents} == contents


@pytest.mark.parametrize(
    ("options", "code"),
    [
        (["--host", "999.1.1.1"], "bad_address"),
        (["--host", "bad\0host"], "bad_address"),
        (["--host", "203.0.113.7"], "bad_address"),  # not an address of this machine
        (["--port", "{busy}"], "address_in_use"),
        (["--admin-port", "{busy}"], "address_in_use"),
        (["--port", "{free}", "--admin-port", "{free}"], "address_in_use"),
    ],
)
def test_serve_refuses_an_unusable_address_before_writing_anything(
    tmp_path: Path, capsys: Capsys, options: list[str], code: str
) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        ports = {"{free}": str(free.getsockname()[1])}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports["{busy}"] = str(busy.getsockname()[1])
        returned = cli.main(_serve(tmp_path, *[ports.get(o, o) for o in options]))
    _refused(capsys, cli.EXIT_USAGE, code)(returned)
    assert _tree(tmp_path) == []  # no key, no state directory, no database


def test_serve_refuses_a_state_dir_that_is_a_file(tmp_path: Path, capsys: Capsys) -> None:
    (tmp_path / "state").write_text("")
    returned = cli.main(_serve(tmp_path))
    _refused(capsys, cli.EXIT_USAGE, "bad_state_dir")(returned)
    assert _tree(tmp_path) == ["state"]


@pytest.mark.timeout(30)
def test_serve_refuses_tls_files_that_are_no_regular_files(tmp_path: Path, capsys: Capsys) -> None:
    os.mkfifo(tmp_path / "cert.pem")  # loading it would block for ever
    options = ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", "/dev/zero"]
    returned = cli.main(_serve(tmp_path, *options))
    _refused(capsys, cli.EXIT_USAGE, "tls_unreadable")(returned)
    assert _tree(tmp_path) == ["cert.pem"]


# ------------------------------------------------------------------ 4. key is read-only


def test_key_of_a_state_dir_without_a_key_is_an_error_that_says_how_to_make_one(
    tmp_path: Path, capsys: Capsys
) -> None:
    returned = cli.main(["key", "--state-dir", str(tmp_path / "TYPO")])
    err = capsys.readouterr().err
    assert returned == cli.EXIT_USAGE
    assert err.startswith("gpu-coordinator: error [key_missing]: ")
    assert "gpu-coordinator serve" in err
    assert "key --create" in err
    assert _tree(tmp_path) == []


def test_key_create_makes_the_key_once_and_key_prints_it(tmp_path: Path, capsys: Capsys) -> None:
    state = str(tmp_path / "state")
    assert cli.main(["key", "--create", "--state-dir", state]) == 0
    created = capsys.readouterr().out
    assert cli.main(["key", "--state-dir", state]) == 0
    assert capsys.readouterr().out == created
    assert keys.load(tmp_path / "state").public_key_b64 in created


def test_the_default_state_dir_is_the_users_data_dir_not_the_working_dir(
    tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["key", "--create"]) == 0
    key = tmp_path / "data" / "gpu-coordinator" / keys.KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert _tree(tmp_path) == ["data", "data/gpu-coordinator", f"data/gpu-coordinator/{key.name}"]
    assert keys.load(key.parent).public_key_b64 in capsys.readouterr().out


# ------------------------------------------------------------------ 5. URLs


@pytest.mark.parametrize(
    "url",
    [
        "garbage",
        "ftp://127.0.0.1/",
        "http://",
        "http://[::1",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:port",
        "http://127.0.0.1/a b",
        "http://127.0.0.1/\r\nX-Injected: 1",
        "http://user:secret@127.0.0.1/",
        "http://127.0.0.1/?q=1",
    ],
)
@pytest.mark.parametrize("command", [["jobs"], ["cancel", "job-1"]])
def test_a_bad_url_is_a_coded_error(
    tmp_path: Path, capsys: Capsys, url: str, command: list[str]
) -> None:
    returned = cli.main([*command, "--url", url, "--state-dir", str(tmp_path)])
    _refused(capsys, cli.EXIT_USAGE, "bad_url")(returned)


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "bad_answer"),  # not HTTP at all
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "bad_answer"),  # cut short
        (b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"[" * 200_000, "bad_answer"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 21\r\n\r\n{"jobs": [{"a": 1}]}\n', "bad_answer"),
        (b"HTTP/1.1 404 No\r\nContent-Length: 100000\r\n\r\n" + b"[" * 100_000, "bad_answer"),
    ],
    ids=["not-http", "cut-short", "deep-json", "wrong-shape", "deep-error"],
)
async def test_a_url_that_answers_nonsense_is_a_coded_error(
    tmp_path: Path, capsys: Capsys, answer: bytes, code: str
) -> None:
    returned = await _jobs_answered_by(tmp_path, answer)
    _refused(capsys, cli.EXIT_ERROR, code)(returned)


async def test_a_job_time_no_calendar_holds_is_shown_as_it_came(
    tmp_path: Path, capsys: Capsys
) -> None:
    job = b'{"job_id": "job-1", "node_id": "n", "state": "running", "updated": 1e300}'
    body = b'{"jobs": [' + job + b"]}"
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    assert await _jobs_answered_by(tmp_path, head + body) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["job-1", "n", "running", "1e+300"]


async def _jobs_answered_by(state: Path, answer: bytes) -> int:
    """``gpu-coordinator jobs`` against a server that answers ``answer`` to any request."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(reply, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        _write_admin_file(state, {"url": url, "token": "t"})
        return await _main("jobs", "--state-dir", str(state))


def _write_admin_file(state: Path, content: object) -> None:
    fd = os.open(state / "admin.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(content, file)


@pytest.mark.parametrize(
    "content",
    [
        {"url": "garbage", "token": "t"},
        {"url": "http://127.0.0.1:1", "token": "t\r\nX-Injected: 1"},
        {"url": "http://127.0.0.1:1", "token": ""},
    ],
)
def test_an_admin_file_with_a_bad_url_or_token_is_corrupt(
    tmp_path: Path, capsys: Capsys, content: object
) -> None:
    _write_admin_file(tmp_path, content)
    returned = cli.main(["jobs", "--state-dir", str(tmp_path)])
    _refused(capsys, cli.EXIT_ERROR, "admin_file_corrupt")(returned)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_an_admin_file_that_is_no_regular_file_is_refused(
    tmp_path: Path, capsys: Capsys, kind: str
) -> None:
    if kind == "fifo":
        os.mkfifo(tmp_path / "admin.json", 0o600)  # opening it would block for ever
    else:
        (tmp_path / "admin.json").mkdir(0o700)
    returned = cli.main(["jobs", "--state-dir", str(tmp_path)])
    _refused(capsys, cli.EXIT_ERROR, "admin_file_unsafe")(returned)


# ------------------------------------------------------------------ 6. bounded reads


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda p: p.symlink_to("/dev/zero"), "bad_spec"),  # only a regular file is read
        (lambda p: p.write_bytes(b"#" * (1024 * 1024 + 1)), "spec_too_large"),
        (lambda p: os.truncate(p.write_bytes(b"") or p, 1 << 40), "spec_too_large"),
        (os.mkfifo, "bad_spec"),  # opening it would block for ever
        (lambda p: p.mkdir(), "bad_spec"),
        (lambda p: None, "bad_spec"),  # missing
        (lambda p: p.write_bytes(b"image = '\xff'"), "bad_spec"),
    ],
    ids=["dev-zero", "over-1-MiB", "sparse-1-TiB", "fifo", "directory", "missing", "not-utf8"],
)
def test_a_spec_file_is_read_within_bounds(
    tmp_path: Path, capsys: Capsys, make: Callable[[Path], object], code: str
) -> None:
    path = tmp_path / "job.toml"
    make(path)
    returned = cli.main(["submit", str(path), "--node", "n", "--state-dir", str(tmp_path)])
    _refused(capsys, cli.EXIT_USAGE, code)(returned)

"""Deployments end to end: the reference coordinator (in this process) and two
``gpu-agent run`` daemons (children, two nodes) on the real engine, a busybox ``httpd``
as the service. ``gpu-coordinator deploy --replicas 2`` spreads the replicas over both
nodes; their leases are renewed past ``lease_s``; a node killed -9 has its replica placed
again after the grace (on the node left: a deployment keeps its capacity), and moved back
when the node returns; undeploy cancels every replica."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.coordinator_peer import Peer, connected
from support.daemon_loop import DUAL_A5000, Loop, two_nodes
from support.dashboard import render
from support.registry import push_busybox, running_registry

from agent.protocol.messages import JobOffer, NodeStatusBody
from coordinator import deployments, deployments_api
from coordinator.errors import JobError
from coordinator.images import ImagePinner
from coordinator.server import Coordinator
from oci import Credentials

LEASE_S = 10.0
GRACE_S = 2.0
# busybox's httpd in the foreground, serving /health from the job's scratch space.
SERVE = "mkdir -p /scratch/www && echo up > /scratch/www/health && exec httpd -f -p 8080 -h /scratch/www"  # noqa: E501


def service_spec(image: str) -> dict[str, Any]:
    return {
        "kind": "service",
        "image": image,
        "command": ["sh", "-c", SERVE],
        "timeout_s": 3600,
        "grace_s": 2,
        "service": {
            "port": 8080,
            "models": ["tiny"],
            "lease_s": LEASE_S,
            "start_allowance_s": 30,
            "readiness": {"interval_s": 0.2, "timeout_s": 1},
            "liveness": {"interval_s": 0.5, "timeout_s": 1, "failures": 3},
        },
    }


class Nodes:
    """One coordinator, two agents (each a :class:`Loop` of its own state directory)."""

    def __init__(self, a: Loop, b: Loop) -> None:
        self.a, self.b = a, b

    @property
    def c(self) -> Coordinator:
        return self.a.c

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        state = ["--state-dir", str(self.c.state_dir)]
        return subprocess.run(
            [sys.executable, "-m", "coordinator.cli", *args, *state],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def deployment(self, name: str) -> dict[str, Any]:
        """The API's view, read in this process (the coordinator shares its event loop)."""
        row = self.c.store.deployments.get(name)
        assert row is not None
        return deployments_api.view(self.c.store, row, self.c.connected())

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET a path of the read API, in a thread."""

        def get() -> tuple[int, dict[str, Any]]:
            try:
                with urllib.request.urlopen(self.c.dashboard_url + path, timeout=10) as answer:
                    return answer.status, json.load(answer)
            except urllib.error.HTTPError as exc:
                return exc.code, json.load(exc)

        return await asyncio.to_thread(get)

    def job_state(self, job_id: str) -> tuple[str, str]:
        row = self.c.store.jobs.get(job_id)
        assert row is not None
        return row.state, row.code


@pytest.fixture
async def nodes(
    tmp_path: Path, library_for: Callable[[Path], Path], test_image_id: str, docker_engine: str
) -> AsyncIterator[Nodes]:
    library = library_for(DUAL_A5000)
    async with two_nodes(
        tmp_path, library, test_image_id, deploy_grace_s=GRACE_S, deploy_interval_s=0.2
    ) as (a, b):
        yield Nodes(a, b)


async def test_deploy_spreads_renews_replaces_a_lost_node_and_undeploy_cancels(
    nodes: Nodes, tmp_path: Path
) -> None:
    spec_file = tmp_path / "web.json"
    spec_file.write_text(json.dumps(service_spec(nodes.a.image)))
    deployed = await asyncio.to_thread(nodes.cli, "deploy", str(spec_file), "--replicas", "2")
    assert (deployed.returncode, deployed.stdout, deployed.stderr) == (0, "web\n", "")

    def ready() -> list[dict[str, Any]]:
        return [r for r in nodes.deployment("web")["live"] if r["state"] == "ready"]

    await nodes.a.until(lambda: len(ready()) == 2, "two replicas ready")
    first = nodes.deployment("web")["live"]
    assert {r["node_id"] for r in first} == {nodes.a.node_id, nodes.b.node_id}
    status, shown = await nodes.get("api/deployments/web")
    assert (status, shown["ready"], shown["replicas"]) == (200, 2, 2)

    # Renewed: still ready once the lease they started with has run out.
    placed = max(r["created"] for r in first)
    await nodes.a.until(lambda: time.time() > placed + LEASE_S + 3, "the first lease to pass")
    assert [nodes.job_state(r["job_id"]) for r in first] == [("ready", "")] * 2
    assert all(r["renewed_until"] > placed + LEASE_S for r in nodes.deployment("web")["live"])

    # Node b killed -9: after the grace its replica goes to the node left.
    [lost] = [r["job_id"] for r in first if r["node_id"] == nodes.b.node_id]
    assert nodes.b.agent is not None
    nodes.b.agent.kill()
    await nodes.b.exited()
    await nodes.a.until(
        lambda: (
            [r["job_id"] for r in nodes.deployment("web")["retired"]] == [lost]
            and len(ready()) == 2
        ),
        "the lost replica placed again and ready",
        timeout=90,
    )
    shown = nodes.deployment("web")
    assert shown["retired"][0]["retired_code"] == "node_lost"
    assert {r["node_id"] for r in shown["live"]} == {nodes.a.node_id}
    assert lost not in {r["job_id"] for r in shown["live"]}

    # Node b back: its old replica does not run on (the agent reaps it; the cancel follows),
    # and the spread comes back: a replica on b, then one of a's two retired.
    nodes.b.start_agent()
    await nodes.a.until(lambda: nodes.c.store.jobs.get(lost).final, "the lost replica to end")  # type: ignore[union-attr]
    assert await nodes.b.containers(lost) == []
    both = {nodes.a.node_id, nodes.b.node_id}
    await nodes.a.until(
        lambda: (
            {r["node_id"] for r in ready()} == both and len(nodes.deployment("web")["live"]) == 2
        ),
        "the spread restored",
        timeout=90,
    )
    shown = nodes.deployment("web")
    [moved] = [r for r in shown["retired"] if r["retired_code"] == "rebalanced"]
    assert moved["node_id"] == nodes.a.node_id
    await nodes.a.until(lambda: nodes.c.store.jobs.get(moved["job_id"]).final, "it to stop")  # type: ignore[union-attr]
    assert nodes.job_state(moved["job_id"]) == ("stopped", "cancelled")

    # Scaled in place: up to 3 (a node takes a second), then down to 1, never short: the
    # two retired are rebalanced away only while the one kept is ready.
    scaled = await asyncio.to_thread(nodes.cli, "scale", "web", "--replicas", "3")
    assert (scaled.returncode, scaled.stdout) == (0, "web 3\n"), scaled.stderr
    await nodes.a.until(lambda: len(ready()) == 3, "three replicas ready")
    three = {r["job_id"] for r in nodes.deployment("web")["live"]}
    scaled = await asyncio.to_thread(nodes.cli, "scale", "web", "--replicas", "1")
    assert scaled.returncode == 0, scaled.stderr
    await nodes.a.until(lambda: len(nodes.deployment("web")["live"]) == 1, "scaled down to one")
    shown = nodes.deployment("web")
    [kept] = [r["job_id"] for r in shown["live"]]
    dropped = {r["job_id"]: r["retired_code"] for r in shown["retired"] if r["job_id"] in three}
    assert dropped == dict.fromkeys(three - {kept}, "rebalanced")
    assert nodes.job_state(kept) == ("ready", "")

    listed = await asyncio.to_thread(nodes.cli, "deployments")
    assert listed.returncode == 0
    assert sum(line.startswith("web ") for line in listed.stdout.splitlines()) == 1

    live = [r["job_id"] for r in shown["live"]]
    undeployed = await asyncio.to_thread(nodes.cli, "undeploy", "web")
    assert undeployed.returncode == 0, undeployed.stderr
    assert sorted(undeployed.stdout.split()) == sorted(live)
    await nodes.a.until(
        lambda: all(nodes.c.store.jobs.get(j).final for j in live),  # type: ignore[union-attr]
        "every replica to stop",
    )
    assert [nodes.job_state(j) for j in live] == [("stopped", "cancelled")]
    assert nodes.c.store.deployments.all() == []
    status, gone = await nodes.get("api/deployments/web")
    assert (status, gone["error"]["code"]) == (404, "unknown_deployment")


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    async with Coordinator(
        db_path=tmp_path / "coordinator.db", state_dir=tmp_path / "coordinator"
    ) as started:
        yield started


def _cli(coordinator: Coordinator, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args, "--state-dir", str(coordinator.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--replicas", "0"], "bad_replicas"),
        (["--replicas", "65"], "bad_replicas"),
        (["--replicas", "two"], "bad_argument"),
        (["--name", "Web Server"], "bad_name"),
        (["--name", "../etc"], "bad_name"),
        (["--name", "x" * 64], "bad_name"),
        (["--job"], "not_a_service"),
        (["--missing"], "bad_spec"),
        (["--stem"], "bad_name"),
        (["--registry-logins", "/nonexistent/logins.toml"], "bad_logins_file"),
    ],
)
async def test_a_bad_deploy_is_refused_with_a_code_exit_2_and_nothing_changes(
    coordinator: Coordinator, tmp_path: Path, args: list[str], code: str
) -> None:
    spec = service_spec("sha256:" + "0" * 64)
    path = tmp_path / "web.json"
    if args == ["--job"]:
        spec = {k: v for k, v in spec.items() if k not in ("kind", "service")}
        args = []
    elif args == ["--missing"]:
        path, args = tmp_path / "missing.json", []
    elif args == ["--stem"]:
        path, args = tmp_path / "Web Server.json", []
    if path.name != "missing.json":
        path.write_text(json.dumps(spec))
    done = await asyncio.to_thread(_cli, coordinator, "deploy", str(path), *args)
    assert done.returncode == 2, done.stderr
    assert f"[{code}]" in done.stderr
    assert "Traceback" not in done.stderr
    assert coordinator.store.deployments.all() == []
    assert coordinator.jobs.recent() == []


@pytest.mark.parametrize("grace", ["0", "-1", "nan", "soon"])
def test_serve_refuses_a_grace_that_is_not_a_positive_number(tmp_path: Path, grace: str) -> None:
    argv = ["serve", "--db", str(tmp_path / "c.db"), "--state-dir", str(tmp_path / "state")]
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *argv, "--deploy-grace", grace],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, "[bad_argument]" in done.stderr) == (2, True)
    assert not (tmp_path / "c.db").exists()


async def test_undeploy_of_no_such_deployment_is_a_coded_error(coordinator: Coordinator) -> None:
    unknown = await asyncio.to_thread(_cli, coordinator, "undeploy", "nothing")
    assert (unknown.returncode, "[unknown_deployment]" in unknown.stderr) == (1, True)
    bad = await asyncio.to_thread(_cli, coordinator, "undeploy", "../../x")
    assert (bad.returncode, "[bad_name]" in bad.stderr) == (2, True)


@pytest.mark.parametrize(
    ("args", "status", "code"),
    [
        (["nothing", "--replicas", "2"], 1, "unknown_deployment"),
        (["web", "--replicas", "0"], 2, "bad_replicas"),
        (["web", "--replicas", "65"], 2, "bad_replicas"),
        (["web", "--replicas", "many"], 2, "bad_argument"),
        (["web"], 2, "bad_argument"),
        (["../x", "--replicas", "2"], 2, "bad_name"),
    ],
)
async def test_a_bad_scale_is_a_coded_error_and_changes_nothing(
    coordinator: Coordinator, args: list[str], status: int, code: str
) -> None:
    body = json.dumps({"name": "web", "spec": service_spec("sha256:" + "0" * 64), "replicas": 2})
    created = await asyncio.to_thread(
        _admin, coordinator, "POST", "/api/deployments", body.encode()
    )
    assert created == (201, "")
    done = await asyncio.to_thread(_cli, coordinator, "scale", *args)
    assert (done.returncode, f"[{code}]" in done.stderr) == (status, True), done.stderr
    assert "Traceback" not in done.stderr
    [row] = coordinator.store.deployments.all()
    assert row.replicas == 2


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "bad_request"),
        (b'{"replicas": 2, "extra": 1}', "bad_request"),
        (b'{"replicas": true}', "bad_replicas"),
        (b'{"replicas": 1.5}', "bad_replicas"),
        (b'{"replicas": 1e9}', "bad_replicas"),
        (b'{"replicas": -1}', "bad_replicas"),
    ],
)
async def test_the_admin_api_refuses_a_bad_scale_with_a_code(
    coordinator: Coordinator, body: bytes, code: str
) -> None:
    deploy = json.dumps({"name": "web", "spec": service_spec("sha256:" + "0" * 64), "replicas": 2})
    created = await asyncio.to_thread(
        _admin, coordinator, "POST", "/api/deployments", deploy.encode()
    )
    assert created == (201, "")
    answer = await asyncio.to_thread(
        _admin, coordinator, "POST", "/api/deployments/web/scale", body
    )
    assert answer == (400, code)
    [row] = coordinator.store.deployments.all()
    assert row.replicas == 2


def _with_logins(logins: Any) -> bytes:
    """A deployment that would be fine, but for its ``registry_logins``."""
    spec = service_spec("busybox@sha256:" + "0" * 64)
    return json.dumps(
        {"name": "web", "spec": spec, "replicas": 1, "registry_logins": logins}
    ).encode()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"not json", 400, "bad_request"),
        (b'{"name": "web", "spec": {}, "replicas": 1, "extra": 1}', 400, "bad_request"),
        (b'{"name": "web", "spec": {}}', 400, "bad_request"),
        (b'{"name": "web", "spec": "x", "replicas": 1}', 400, "not_a_service"),
        (b'{"name": "web", "spec": {"kind": "service"}, "replicas": true}', 400, "bad_replicas"),
        (b'{"name": "web", "spec": {"kind": "service"}, "replicas": 1.5}', 400, "bad_replicas"),
        (b'{"name": "web", "spec": {"kind": "service"}, "replicas": 1e9}', 400, "bad_replicas"),
        (b'{"name": ["web"], "spec": {"kind": "service"}, "replicas": 1}', 400, "bad_name"),
        (b'{"name": "web", "spec": {"kind": "service"}, "replicas": 1}', 400, "missing_field"),
        (_with_logins({"r.example": "x"}), 400, "bad_registry_login"),
        (
            _with_logins({"bad host!": {"username": "u", "password": "p"}}),
            400,
            "bad_registry_login",
        ),
        (_with_logins(["r.example"]), 400, "bad_registry_login"),
    ],
)
async def test_the_admin_api_refuses_a_bad_deployment_with_a_code(
    coordinator: Coordinator, body: bytes, status: int, code: str
) -> None:
    answer = await asyncio.to_thread(_admin, coordinator, "POST", "/api/deployments", body)
    assert answer == (status, code)
    assert coordinator.store.deployments.all() == []


async def test_a_name_is_deployed_once_within_a_bound_and_writes_need_the_token(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = json.dumps(
        {"name": "web", "spec": service_spec("sha256:" + "0" * 64), "replicas": 1}
    ).encode()
    assert await asyncio.to_thread(_admin, coordinator, "POST", "/api/deployments", body) == (
        201,
        "",
    )
    again = await asyncio.to_thread(_admin, coordinator, "POST", "/api/deployments", body)
    assert again == (409, "deployment_exists")
    monkeypatch.setattr(deployments, "MAX_DEPLOYMENTS", 1)
    other = body.replace(b'"web"', b'"web2"')
    full = await asyncio.to_thread(_admin, coordinator, "POST", "/api/deployments", other)
    assert full == (409, "too_many_deployments")
    anonymous = await asyncio.to_thread(
        _admin, coordinator, "DELETE", "/api/deployments/web", b"", token=""
    )
    assert anonymous == (401, "unauthorized")
    assert [d.name for d in coordinator.store.deployments.all()] == ["web"]
    missing = await asyncio.to_thread(_admin, coordinator, "DELETE", "/api/deployments/x", b"")
    assert missing == (404, "unknown_deployment")
    gone = await asyncio.to_thread(_admin, coordinator, "DELETE", "/api/deployments/web", b"")
    assert gone == (202, "")
    assert coordinator.store.deployments.all() == []


def _admin(
    coordinator: Coordinator, method: str, path: str, body: bytes, *, token: str | None = None
) -> tuple[int, str]:
    """The status and error code (or "") of one admin API request."""
    host, port = coordinator.admin_url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        bearer = coordinator.admin_token if token is None else token
        headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"}
        connection.request(method, path, body=body, headers=headers)
        answer = connection.getresponse()
        shown = json.loads(answer.read() or b"{}")
    finally:
        connection.close()
    error = shown.get("error") if isinstance(shown, dict) else None
    return answer.status, error["code"] if isinstance(error, dict) else ""


class _ReplicaRows(HTMLParser):
    """The dashboard's ``tr.replica`` rows: their data attributes and classed cells' text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[dict[str, str]] = []
        self._cell: str | None = None
        self._in_replica = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        classes = attributes.get("class", "").split()
        if tag == "tr":
            self._in_replica = "replica" in classes
            if self._in_replica:
                self.rows.append({k: v for k, v in attributes.items() if k.startswith("data-")})
        elif tag == "td" and self._in_replica and classes:
            self._cell = classes[0]
            self.rows[-1][self._cell] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell:
            self.rows[-1][self._cell] += data


async def test_the_dashboard_shows_each_deployment_and_its_replicas(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    spec = service_spec("sha256:" + "0" * 64)
    await coordinator.deployments.deploy("idle", spec, 1)
    await coordinator.deployments.deploy("web", spec, 2)
    # A replica recorded as the reconciler does, on a node known but not connected.
    coordinator.store.nodes.seen("node-x", coordinator.key.public_key_b64, time.time())
    job_id = await coordinator.submit("node-x", spec)
    coordinator.store.deployments.add_replica("web", job_id, "node-x", time.time(), 1e10)
    url = f"http://127.0.0.1:{coordinator.port}/"
    rendered = await asyncio.to_thread(render, chromium, tmp_path / "chromium", "--dump-dom", url)
    parser = _ReplicaRows()
    parser.feed(rendered.stdout)
    assert parser.rows == [
        {
            "data-deployment": "idle",
            "data-job-id": "",
            "deployment": "idle",
            "ready": "0/1",
            "job-id": "-",
            "node": "-",
            "state": "placing",
        },
        {
            "data-deployment": "web",
            "data-job-id": job_id,
            "deployment": "web",
            "ready": "0/2",
            "job-id": job_id,
            "node": "node-x",
            "state": "offered",
        },
    ]


async def test_a_tag_is_pinned_once_at_deploy_and_every_replica_runs_that_digest(
    tmp_path: Path,
) -> None:
    (tmp_path / "registry").mkdir()
    with running_registry(tmp_path / "registry") as registry:
        tag = f"{registry.host}/deploy/web:1"
        pinned = await asyncio.to_thread(push_busybox, registry, tag, os.urandom(1024), tmp_path)
        login = Credentials(registry.username, registry.password)
        pinner = ImagePinner(logins={registry.host: login}, ca_file=registry.ca_file)
        async with Coordinator(
            db_path=tmp_path / "c.db", state_dir=tmp_path / "state", pinner=pinner
        ) as coordinator:
            row = await coordinator.deployments.deploy("web", service_spec(tag), 2)
            assert row.spec["image"] == pinned
            with pytest.raises(JobError) as err:
                await coordinator.deployments.deploy("gone", service_spec(tag + "-missing"), 1)
            assert err.value.code == "image_not_found"
            assert [d.name for d in coordinator.store.deployments.all()] == ["web"]


async def test_a_private_images_login_pins_it_and_goes_in_each_replicas_offer(
    tmp_path: Path,
) -> None:
    (tmp_path / "registry").mkdir()
    with running_registry(tmp_path / "registry") as registry:
        tag = f"{registry.host}/deploy/private:1"
        pinned = await asyncio.to_thread(push_busybox, registry, tag, os.urandom(1024), tmp_path)
        login = {"username": registry.username, "password": registry.password}
        # The coordinator has no login of its own to this registry: only the deployment's.
        pinner = ImagePinner(ca_file=registry.ca_file)
        async with Coordinator(
            db_path=tmp_path / "c.db", state_dir=tmp_path / "state", pinner=pinner
        ) as coordinator:
            with pytest.raises(JobError) as err:
                await coordinator.deployments.deploy("web", service_spec(tag), 1)
            assert err.value.code == "registry_auth_failed"
            row = await coordinator.deployments.deploy(
                "web", service_spec(tag), 1, {registry.host: login}
            )
            assert row.spec["image"] == pinned
            pinned_keys = {coordinator.key.key_id: coordinator.key.public_key}
            peer = Peer()
            async with connected(coordinator.url, pinned_keys, peer) as link:
                await link.send(NodeStatusBody(available=True, units=[]))
                await coordinator.deployments.tick()
                offer = link.verify(await link.take(JobOffer), pinned_keys)
            assert offer.spec["image"] == pinned
            assert msgspec.to_builtins(offer.registry_logins) == {registry.host: login}
            shown = deployments_api.view(
                coordinator.store, coordinator.store.deployments.all()[0], set()
            )
            assert shown["registry_logins"] == [registry.host]
            assert registry.password not in json.dumps(shown)

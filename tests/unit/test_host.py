"""Host facts through psutil, and the Docker check over a real unix socket."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hal.backend import HalConfig
from hal.host import host_profile, host_sample
from hal.runtime import RuntimeProbe, docker_socket, runtime_info
from hal.types import Unavailable


def _serve_once(sock_path: Path, status: str, body: bytes) -> Iterator[list[bytes]]:
    """A one-request HTTP server on a unix socket; yields the requests it received."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)
    requests: list[bytes] = []

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            requests.append(conn.recv(4096))
            conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n\r\n".encode())
            conn.sendall(body)

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        yield requests
    finally:
        thread.join(timeout=5)
        server.close()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "docker.sock"
    info = {
        "ServerVersion": "25.0.3",
        "Runtimes": {"runc": {}, "nvidia": {}},
        "CDISpecDirs": ["/etc/cdi", "/var/run/cdi"],
    }
    for _ in _serve_once(sock, "200 OK", json.dumps(info).encode()):
        yield sock


def test_profile_matches_psutil() -> None:
    host = host_profile(HalConfig(docker_socket=Path("/nonexistent.sock")))
    assert host.memory_total_bytes == psutil.virtual_memory().total
    assert host.cpu.threads == psutil.cpu_count()
    assert any(i.name == "lo" for i in host.interfaces)
    assert host.kernel


def test_docker_engine_version_and_runtimes_are_read_from_its_socket(engine: Path) -> None:
    runtime = runtime_info(engine, ())
    assert runtime.docker_reachable is True
    assert runtime.docker_version == "25.0.3"
    assert runtime.docker_runtimes == ["nvidia", "runc"]
    assert runtime.docker_cdi is True


def test_no_engine_is_unreachable_not_an_error(tmp_path: Path) -> None:
    runtime = runtime_info(tmp_path / "docker.sock", ())
    assert runtime.docker_reachable is False
    assert isinstance(runtime.docker_version, Unavailable)
    assert runtime.docker_version.reason == "docker_unreachable"


def test_engine_answering_an_error_is_reported(tmp_path: Path) -> None:
    sock = tmp_path / "docker.sock"
    for _ in _serve_once(sock, "500 Internal Server Error", b"{}"):
        runtime = runtime_info(sock, ())
    assert isinstance(runtime.docker_reachable, Unavailable)
    assert runtime.docker_reachable.reason == "docker_error"


def test_probe_asks_when_made_and_the_answer_is_read_later(tmp_path: Path) -> None:
    sock = tmp_path / "docker.sock"
    for requests in _serve_once(sock, "200 OK", b'{"ServerVersion": "27.1.0"}'):
        with RuntimeProbe(sock) as probe:
            for _ in range(500):  # the engine has the question before anyone waits for it
                if requests:
                    break
                time.sleep(0.01)
            assert requests[0].startswith(b"GET /info HTTP/1.0\r\n")
            runtime = probe.result(())
    assert runtime.docker_version == "27.1.0"
    assert runtime.docker_runtimes == []


def test_docker_host_names_the_engine_socket() -> None:
    assert docker_socket({}) == Path("/var/run/docker.sock")
    assert docker_socket({"DOCKER_HOST": "unix:///run/user/1000/docker.sock"}) == Path(
        "/run/user/1000/docker.sock"
    )


def test_only_cdi_specs_naming_nvidia_gpus_are_listed(tmp_path: Path) -> None:
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\n")
    (cdi / "other.yaml").write_text("cdiVersion: 0.5.0\nkind: vendor.com/fpga\n")
    (cdi / "notes.txt").write_text("kind: nvidia.com/gpu\n")
    runtime = runtime_info(tmp_path / "docker.sock", (cdi, tmp_path / "absent"))
    assert runtime.cdi_specs == [str(cdi / "nvidia.yaml")]


def test_sample_reads_memory_and_network_counters() -> None:
    sample = host_sample()
    assert 0 < sample.memory_used_bytes < psutil.virtual_memory().total
    assert sample.net_rx_bytes >= 0

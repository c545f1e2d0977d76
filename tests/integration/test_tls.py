"""``wss://`` end to end: the agent verifies the coordinator's certificate against its CA.

A throwaway CA and certificates are made here with ``cryptography.x509``. An agent given
``--ca-file`` streams to a coordinator whose certificate chains to that CA, and refuses at
TLS a man in the middle with another certificate: one self-signed, one issued by the same
CA for another address. Both sides are real processes, as in :mod:`test_link`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support.processes import DUAL_A5000, Agent, Coordinator, assert_exactly_once_no_gaps, wait_for

from coordinator.cli import EXIT_USAGE, main

LOCALHOST = ipaddress.IPv4Address("127.0.0.1")


# ------------------------------------------------------------------ a throwaway PKI


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate the agent trusts
    server: tuple[Path, Path]  # (certificate, key) issued by the CA for 127.0.0.1
    mitm: tuple[Path, Path]  # self-signed for 127.0.0.1: not from the CA
    other_host: tuple[Path, Path]  # issued by the CA, but for 127.0.0.2


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    ip: ipaddress.IPv4Address | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        usage = x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False,
        )  # fmt: skip
        builder = builder.add_extension(usage, critical=True)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ip)]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("gpu-agent test CA", ca_key, None, ca=True)
    ca_path, _ = _write(directory, "ca", ca_cert, ca_key)
    issuer = (ca_cert.subject, ca_key)
    server_key, mitm_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in "abc")
    server = _certificate("127.0.0.1", server_key, issuer, ip=LOCALHOST)
    mitm = _certificate("127.0.0.1", mitm_key, None, ip=LOCALHOST)
    other = _certificate("127.0.0.2", other_key, issuer, ip=ipaddress.IPv4Address("127.0.0.2"))
    return Pki(
        ca=ca_path,
        server=_write(directory, "server", server, server_key),
        mitm=_write(directory, "mitm", mitm, mitm_key),
        other_host=_write(directory, "other", other, other_key),
    )


# ------------------------------------------------------------------ both sides, over TLS


class TlsCoordinator(Coordinator):
    """``gpu-coordinator serve --tls-cert --tls-key`` as a child process."""

    def __init__(self, workdir: Path, cert: Path, key: Path) -> None:
        super().__init__(workdir)
        self.cert, self.key = cert, key

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--artifacts-port", str(self.artifacts_port),
             "--db", str(self.db), "--state-dir", str(self.workdir / "state"),
             "--gateway-port", "0",
             "--tls-cert", str(self.cert), "--tls-key", str(self.key)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert self.process.stdout is not None
        listening = self.process.stdout.readline()
        assert listening.startswith(b"listening on wss://127.0.0.1:"), listening
        dashboard = self.process.stdout.readline()
        assert dashboard.startswith(b"dashboard at https://127.0.0.1:"), dashboard


def _tls_agent(workdir: Path, library: Path, coordinator: Coordinator, ca: Path) -> Agent:
    agent = Agent(workdir, library, coordinator, coordinator.public_key())
    url = agent.argv.index("--coordinator") + 1
    agent.argv[url] = f"wss://127.0.0.1:{coordinator.port}/agent"
    agent.argv += ["--ca-file", str(ca)]
    return agent


@pytest.fixture
def processes() -> Iterator[list[Coordinator | Agent]]:
    """Whatever a test starts is killed and reaped however it ends."""
    started: list[Coordinator | Agent] = []
    yield started
    for side in reversed(started):
        if side.process is not None and side.process.poll() is None:
            side.process.kill()
            side.process.wait()
        if isinstance(side, Coordinator) and side.process and side.process.stdout:
            side.process.stdout.close()


def test_agent_streams_to_a_coordinator_whose_certificate_chains_to_its_ca(
    tmp_path: Path,
    library_for: Callable[[Path], Path],
    pki: Pki,
    processes: list[Coordinator | Agent],
) -> None:
    coordinator = TlsCoordinator(tmp_path, *pki.server)
    processes.append(coordinator)
    coordinator.start()
    agent = _tls_agent(tmp_path, library_for(DUAL_A5000), coordinator, pki.ca)
    processes.append(agent)
    agent.start()
    wait_for(lambda: len(coordinator.seqs()) >= 4, "four messages over wss://", 10.0)
    # The read API is on the same port, so over HTTPS too.
    trust = ssl.create_default_context(cafile=str(pki.ca))
    url = f"https://127.0.0.1:{coordinator.port}/api/nodes"
    with urllib.request.urlopen(url, context=trust, timeout=5) as response:
        nodes = json.load(response)["nodes"]
    assert len(nodes) == 1
    assert agent.stop() == 0
    seqs = coordinator.seqs()
    assert_exactly_once_no_gaps(seqs)
    # The profile answers the coordinator's attest_request; the first node_status (queued
    # when the sampler has checked the GPUs once) may be in the outbox before it.
    assert "profile" in [kind for _, kind in seqs[:2]]
    assert b"CERTIFICATE_VERIFY_FAILED" not in agent.log.read_bytes()


def test_agent_refuses_a_man_in_the_middle_with_another_certificate(
    tmp_path: Path,
    library_for: Callable[[Path], Path],
    pki: Pki,
    processes: list[Coordinator | Agent],
) -> None:
    # Two impostors side by side (one self-signed, one from the same CA for another
    # address), so that the agents' stop-time flush waits overlap.
    cases = {"self-signed": (pki.mitm, b"self-signed certificate"),
             "other-address": (pki.other_host, b"IP address mismatch")}  # fmt: skip
    agents: dict[str, tuple[Coordinator, Agent]] = {}
    for name, ((cert, key), _) in cases.items():
        workdir = tmp_path / name
        workdir.mkdir()
        coordinator = TlsCoordinator(workdir, cert, key)
        processes.append(coordinator)
        coordinator.start()
        agent = _tls_agent(workdir, library_for(DUAL_A5000), coordinator, pki.ca)
        processes.append(agent)
        agent.start()
        agents[name] = (coordinator, agent)

    for name, (impostor, agent) in agents.items():
        log = agent.log.read_bytes

        def refusals(log: Callable[[], bytes] = log) -> int:
            return log().count(b"CERTIFICATE_VERIFY_FAILED")

        # Refused at TLS, then retried with backoff (0.5 s, then up to 2 s), never crashing.
        wait_for(lambda: refusals() >= 2, f"{name}: two refused attempts", 10.0)
        assert cases[name][1] in log()
        assert agent.process is not None
        assert agent.process.poll() is None
        assert impostor.seqs() == []
        assert b"connected to" not in log()

    for _, agent in agents.values():  # SIGTERM both, then reap: the flush waits overlap
        assert agent.process is not None
        agent.process.send_signal(signal.SIGTERM)
    for _, agent in agents.values():
        assert agent.process is not None
        assert agent.process.wait(timeout=30) == 0
        assert b"Traceback" not in agent.log.read_bytes()


# ------------------------------------------------------------------ the command line


def test_serve_wants_both_tls_options(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--db", str(tmp_path / "c.db"), "--tls-cert", str(pki.server[0])])
    assert exit_.value.code == EXIT_USAGE


@pytest.mark.parametrize(
    ("files", "code"),
    [
        (lambda p, d: (d / "missing.pem", p.server[1]), "tls_unreadable"),
        (lambda p, d: (p.server[1], p.server[1]), "tls_invalid"),  # a key is no certificate
        (lambda p, d: (p.server[0], p.mitm[1]), "tls_invalid"),  # key does not match
    ],
    ids=["missing", "not-a-certificate", "mismatched-key"],
)
def test_serve_refuses_unusable_tls_files_with_a_code(
    tmp_path: Path,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    files: Callable[[Pki, Path], tuple[Path, Path]],
    code: str,
) -> None:
    cert, key = files(pki, tmp_path)
    argv = ["serve", "--db", str(tmp_path / "c.db"), "--state-dir", str(tmp_path / "state")]
    assert main([*argv, "--tls-cert", str(cert), "--tls-key", str(key)]) == EXIT_USAGE
    assert f"error [{code}]" in capsys.readouterr().err
    assert not (tmp_path / "c.db").exists()  # refused before anything is opened

"""``gpu-agent run-local`` as a provider runs it, on the real Docker engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from support.processes import free_port
from support.registry import build_busybox, push_busybox, running_registry

from sandbox.events import Event, Finished


def _run(tmp_path: Path, spec: str, *extra: str) -> subprocess.CompletedProcess[str]:
    spec_file = tmp_path / "job.toml"
    spec_file.write_text(spec)
    env = {
        **os.environ,
        "HOME": str(tmp_path),  # jobs directories go under ~/.cache
        "GPU_AGENT_NVML_LIB": str(tmp_path / "absent" / "libnvidia-ml.so.1"),
        "GPU_AGENT_SYSFS_ROOT": str(tmp_path),
    }
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "run-local", str(spec_file), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_spec_file_runs_and_prints_its_result(tmp_path: Path, test_image: str) -> None:
    spec = f'image = "{test_image}"\ncommand = ["sh", "-c", "echo hi there"]\ntimeout_s = 30\n'
    result = _run(tmp_path, spec, "--json")
    assert result.returncode == 0, result.stderr
    events = [msgspec.json.decode(line, type=Event) for line in result.stdout.splitlines()]
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.result.reason == "completed"
    assert any(getattr(e, "data", b"") == b"hi there\n" for e in events)
    assert not any((tmp_path / ".cache" / "gpu-agent" / "jobs").glob("*"))


def test_failing_job_exits_1(tmp_path: Path, test_image: str) -> None:
    spec = f'image = "{test_image}"\ncommand = ["sh", "-c", "exit 7"]\n'
    result = _run(tmp_path, spec)
    assert result.returncode == 1
    assert '"exit_code": 7' in result.stdout


def test_policy_refusal_lists_every_rule_broken_and_exits_3(
    tmp_path: Path, test_image: str
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('allowed_images = ["ghcr.io/acme/*"]\nmax_cpus = 1.0\n')
    spec = f'image = "{test_image}"\nnetwork = "egress"\n[resources]\ncpus = 2.0\n'
    result = _run(tmp_path, spec, "--policy", str(policy))
    assert result.returncode == 3
    for code in ("image_not_allowed", "cpus_over_limit", "egress_not_allowed"):
        assert code in result.stderr


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ('image = "x"\nprivileged = true\n', "forbidden_field"),
        ('image = "x"\nvolumes = ["/:/host"]\n', "forbidden_field"),
        ('image = "x"\ncolour = "blue"\n', "unknown_field"),
        ('image = "x"\ntimeout_s = -1\n', "bad_value"),
        ("image = ", "bad_spec"),
    ],
)
def test_bad_spec_is_refused_with_its_code_and_exit_2(tmp_path: Path, spec: str, code: str) -> None:
    result = _run(tmp_path, spec)
    assert result.returncode == 2
    assert f"error [{code}]" in result.stderr


def test_unreadable_policy_is_a_coded_error(tmp_path: Path) -> None:
    result = _run(tmp_path, 'image = "x"\n', "--policy", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "error [bad_policy]" in result.stderr


def test_a_tag_is_resolved_at_its_registry_printed_and_pulled_by_that_digest(
    tmp_path: Path, docker_engine: str
) -> None:
    (tmp_path / "registry").mkdir()
    with running_registry(tmp_path / "registry") as registry:
        tag = f"{registry.host}/local/tagged:1"
        pinned = push_busybox(registry, tag, os.urandom(1 << 12), tmp_path)
        logins = tmp_path / "registries.toml"
        logins.write_text(
            f'[registry."{registry.host}"]\n'
            f'username = "{registry.username}"\npassword = "{registry.password}"\n'
        )
        logins.chmod(0o600)
        spec = f'image = "{tag}"\ncommand = ["sh", "-c", "wc -c < /blob"]\ntimeout_s = 60\n'
        try:
            # Without the login: the registry's code, before anything runs.
            refused = _run(tmp_path, spec, "--registry-ca", str(registry.ca_file))
            assert refused.returncode == 1
            assert "error [registry_auth_failed]" in refused.stderr
            ran = _run(
                tmp_path,
                spec,
                "--registry-logins",
                str(logins),
                "--registry-ca",
                str(registry.ca_file),
            )
            assert ran.returncode == 0, ran.stderr
            assert f"resolved {tag} to {pinned}" in ran.stderr
            assert f"pulled {pinned}" in ran.stderr
            assert ran.stdout.startswith("4096\n")
            assert registry.password not in ran.stdout + ran.stderr
        finally:
            subprocess.run(
                ["docker", "image", "rm", "--force", pinned], capture_output=True, check=False
            )


def test_a_tag_the_engine_has_is_the_owners_image_and_no_registry_is_asked(
    tmp_path: Path, docker_engine: str
) -> None:
    # A registry host that does not answer: a tag found locally never reaches it.
    tag = f"127.0.0.1:{free_port()}/owner/made:1"
    build_busybox(tag, tmp_path / "image", b"mine")
    try:
        spec = f'image = "{tag}"\ncommand = ["cat", "/blob"]\ntimeout_s = 60\n'
        ran = _run(tmp_path, spec)
        assert ran.returncode == 0, ran.stderr
        assert f"{tag} is a local image: sha256:" in ran.stderr
        assert ran.stdout.startswith("mine")
    finally:
        subprocess.run(["docker", "image", "rm", "--force", tag], capture_output=True, check=False)

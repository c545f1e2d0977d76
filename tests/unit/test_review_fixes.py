"""What an adversarial review found: each hole, pinned shut."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from support.control_target import MemoryTarget, short_dir

from agent.config.settings import load_config
from agent.control.client import ControlClient
from agent.control.server import ControlServer
from agent.errors import ConfigError, ControlError
from sandbox.container import create_body
from sandbox.engine_types import ContainerConfig
from sandbox.errors import SpecError
from sandbox.gpu_mapping import ContainerGpus
from sandbox.jobdir import JobMounts
from sandbox.policy import load_policy_file
from sandbox.spec import Resources, WorkloadSpec, load_spec


def _body(spec: WorkloadSpec) -> ContainerConfig:
    return create_body(
        job_id="j",
        spec=spec,
        image_id="sha256:" + "0" * 64,
        gpus=ContainerGpus(),
        mounts=JobMounts(),
        user="1000:1000",
        runtime="runc",
        cgroup_parent=None,
        runner="r",
        image_volumes=[],
    )


# ------------------------------------------------------------------ 1. the CPU cap


@pytest.mark.parametrize("cpus", ["1e-10", "1e-9", "0.005", "0.00999", "0", "nan", "inf", "-inf"])
def test_a_cpu_limit_under_dockers_minimum_or_not_finite_is_refused(cpus: str) -> None:
    with pytest.raises(SpecError) as refused:
        load_spec(f'image = "x"\n[resources]\ncpus = {cpus}\n'.encode(), "toml")
    assert (refused.value.code, refused.value.field) == ("bad_value", "resources.cpus")


def test_dockers_minimum_cpu_limit_is_accepted_and_capped() -> None:
    spec = load_spec(b'image = "x"\n[resources]\ncpus = 0.01\n', "toml")
    assert _body(spec).host_config.nano_cpus == 10_000_000


@pytest.mark.parametrize("cpus", [1e-10, 0.0, float("nan"), float("inf"), -1.0])
def test_the_container_body_never_asks_for_no_cpu_limit(cpus: float) -> None:
    # A spec built in code skips load_spec's checks: the body builder refuses it itself.
    spec = WorkloadSpec(image="x", resources=Resources(cpus=cpus))
    with pytest.raises(SpecError) as refused:
        _body(spec)
    assert refused.value.field == "resources.cpus"


# ------------------------------------------------------------------ 2. NUL in strings


def _toml(value: object, top: bool = True) -> str:
    """A document of strings, lists and tables as TOML, NULs escaped as JSON does it."""
    if isinstance(value, dict):
        pairs = [f"{msgspec.json.encode(k).decode()} = {_toml(v, False)}" for k, v in value.items()]
        return "\n".join(pairs) + "\n" if top else "{" + ", ".join(pairs) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item, False) for item in value) + "]"
    return msgspec.json.encode(value).decode()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"env": {"A": "x\0y"}}, "env.A"),
        ({"env": {"A\0B": "x"}}, "env.A\0B"),
        ({"command": ["sh", "-c\0", "true"]}, "command[1]"),
        ({"args": ["\0"]}, "args[0]"),
        ({"workdir": "/scratch/\0x"}, "workdir"),
        ({"inputs": [{"path": "a\0b", "content": ""}]}, "inputs[0].path"),
        ({"outputs": ["a\0"]}, "outputs[0]"),
        ({"image": "busybox\0:latest"}, "image"),
    ],
)
@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_a_nul_in_any_string_that_reaches_the_engine_is_refused(
    raw: dict[str, Any], field: str, fmt: Literal["json", "toml"]
) -> None:
    doc = {"image": "busybox", **raw}
    data = msgspec.json.encode(doc) if fmt == "json" else _toml(doc).encode()
    with pytest.raises(SpecError) as refused:
        load_spec(data, fmt)
    assert (refused.value.code, refused.value.field) == ("bad_value", field)


# ------------------------------------------------------------------ 3. settings that never work

_NEVER = [
    ("policy", "max_cpus", "inf"),
    ("policy", "max_timeout_s", "inf"),
    ("policy", "max_timeout_s", "2592001"),
    ("policy", "max_grace_s", "1e309"),
    ("policy", "max_grace_s", "nan"),
    ("policy", "max_memory_bytes", "9223372036854775807"),
    ("policy", "max_pids", "9223372036854775807"),
    ("policy", "max_gpus", "9223372036854775807"),
    ("owner", "idle_delay_s", "inf"),
    ("owner", "idle_delay_s", "86401"),
    ("owner", "power_limit_w", "inf"),
    ("owner", "power_limit_w", "1e308"),
    ("owner", "max_shared_gpus", "9223372036854775807"),
]


@pytest.mark.parametrize(("section", "key", "value"), _NEVER)
def test_an_unbounded_setting_in_the_agent_file_is_a_bad_config(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, {}, system=True)
    assert refused.value.code == "bad_config"
    assert f"{section}.{key}" in refused.value.detail


@pytest.mark.parametrize(("section", "key", "value"), _NEVER)
def test_an_unbounded_setting_in_a_variable_is_a_bad_config(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("")
    with pytest.raises(ConfigError) as refused:
        load_config(path, {f"GPU_AGENT_{section}_{key}".upper(): value}, system=True)
    assert refused.value.code == "bad_config"


@pytest.mark.parametrize(
    ("key", "value"), [(k, v) for section, k, v in _NEVER if section == "policy"]
)
def test_an_unbounded_limit_in_the_policy_file_is_a_bad_policy(
    tmp_path: Path, key: str, value: str
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(f"{key} = {value}\n")
    with pytest.raises(SpecError) as refused:
        load_policy_file(path)
    assert refused.value.code == "bad_policy"


@pytest.mark.parametrize(
    "changes",
    [
        {"power_limit_w": 1e308},
        {"power_limit_w": 10001},
        {"max_shared_gpus": 99999999999999999999999},
        {"max_shared_gpus": 1025},
        {"idle_delay_s": 1e300},
    ],
)
async def test_an_unbounded_setting_over_the_control_api_is_refused_and_not_kept(
    changes: dict[str, Any],
) -> None:
    target = MemoryTarget()
    before = target.settings()
    with short_dir() as sock_dir:
        async with (
            ControlServer(target, sock_dir / "agent.sock") as server,
            await ControlClient.connect(server.path) as client,
        ):
            with pytest.raises(ControlError) as refused:
                await client.set_settings(changes)
            assert refused.value.code == "bad_settings"
            assert await client.settings() == before


# ------------------------------------------------------------------ 4. an over-long socket path


async def test_the_client_says_why_an_over_long_socket_path_cannot_be_reached() -> None:
    with pytest.raises(ControlError) as refused:
        await ControlClient.connect(Path("/tmp/" + "s" * 195))
    assert not refused.value.detail.endswith("None")


# ------------------------------------------------------------------ 5. cgroup leftovers

"""The agent's configuration: one TOML file, overridden by ``GPU_AGENT_<SECTION>_<KEY>``.

Every key, its default and its variable are listed in ``docs/configuration.md`` (a test
keeps the two in step). Values come from, highest first: the environment, the file, the
defaults. The file and the environment are typed and checked alike; a bad value is refused
as :class:`~agent.errors.ConfigError` (``bad_config``) naming where it came from (the file
or the variable), the key (``telemetry.interval_s``) and what is wrong.

Two kinds of install differ only in defaults:

- **system** (the systemd service): ``/etc/gpu-agent/agent.toml``, ``/var/lib/gpu-agent``,
  ``/run/gpu-agent``, control socket group ``gpu-agent``;
- **user** (the tray app, a developer): platformdirs' user config, data and runtime
  directories, no socket group.

:func:`is_system_install` picks one: root, or anyone on a machine that has the system file
(so that ``gpu-agent status`` run by a member of the ``gpu-agent`` group talks to the
service, not to a user agent that is not running).
"""

from __future__ import annotations

import os
import re
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec
import platformdirs

from agent.config.checks import (
    check_absolute,
    check_no_nul,
    check_url,
    is_loopback,
    split_host_port,
)
from agent.config.files import (
    ca_file_fault,
    directory_fault,
    enrolment_token_fault,
    read_toml,
    registry_logins_fault,
)
from agent.config.overrides import (
    NOT_CONFIG_VARIABLES,
    Flag,
    Override,
    decode_path,
    env_overrides,
    env_var,
    flag_overrides,
)
from agent.control.socket_file import socket_path_fault
from agent.errors import ConfigError
from agent.jobs.images import load_keys
from agent.owner.policy import OwnerPolicy
from agent.protocol import crypto
from agent.protocol.limits import MAX_TELEMETRY_BATCH
from sandbox.policy import Policy

__all__ = [
    "MAX_INTERVAL_S",
    "NOT_CONFIG_VARIABLES",
    "SYSTEM_CONFIG_PATH",
    "AgentConfig",
    "CacheConfig",
    "ControlConfig",
    "CoordinatorConfig",
    "Flag",
    "JobsConfig",
    "MetricsConfig",
    "PathsConfig",
    "TelemetryConfig",
    "default_config_path",
    "env_var",
    "is_system_install",
    "load_config",
]

_APP_NAME = "gpu-agent"
SYSTEM_CONFIG_PATH = Path("/etc/gpu-agent/agent.toml")
_SYSTEM_STATE_DIR = Path("/var/lib/gpu-agent")
_SYSTEM_RUNTIME_DIR = Path("/run/gpu-agent")
_SYSTEM_SOCKET_GROUP = "gpu-agent"
#: The longest telemetry interval: samples also drive the owner's guards and GPU health.
MAX_INTERVAL_S: typing.Final = 3600.0
# The highest uid or gid (2**32 - 1 is the kernel's "no id").
_MAX_ID = 2**32 - 2

_NonNegative = Annotated[int, msgspec.Meta(ge=0)]
_USER = re.compile(r"\d+:\d+")
# A message raised from __post_init__ starts with the key it is about: "url: ...".
_KEYED = re.compile(r"(\w+(?:\[\d+\])?): (.*)", re.DOTALL)
_AT = re.compile(r"(.*) - at `\$\.?(.*)`", re.DOTALL)
_UNKNOWN = re.compile(r"Object contains unknown field `(.*)`")


class CoordinatorConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[coordinator]``: where the coordinator is and how to know it is the right one."""

    url: str | None = None
    keys: tuple[str, ...] = ()
    ca_file: Path | None = None
    allow_plaintext: bool = False
    enrolment_token_file: Path | None = None

    def __post_init__(self) -> None:
        for index, key in enumerate(self.keys):
            try:
                raw = crypto.b64decode(key)
            except ValueError:
                raise ValueError(f"keys[{index}]: {key!r} is not base64") from None
            if len(raw) != crypto.PUBLIC_KEY_SIZE:
                raise ValueError(f"keys[{index}]: {key!r} is not a 32-byte Ed25519 public key")
        if self.url is not None:
            check_url(self.url, self.allow_plaintext)
        for name in ("ca_file", "enrolment_token_file"):
            if (path := getattr(self, name)) is not None:
                check_absolute(name, path)

    @property
    def pinned_keys(self) -> dict[str, bytes]:
        """The pinned coordinator public keys, raw, by key id (as ``LinkConfig`` takes them)."""
        raw = (crypto.b64decode(key) for key in self.keys)
        return {crypto.key_id(key): key for key in raw}


class PathsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[paths]``: where the agent keeps its state, its socket and its jobs' directories."""

    state_dir: Path
    runtime_dir: Path
    jobs_dir: Path

    def __post_init__(self) -> None:
        for name in ("state_dir", "runtime_dir", "jobs_dir"):
            check_absolute(name, getattr(self, name))

    @property
    def control_socket(self) -> Path:
        """The local control API's unix socket."""
        return self.runtime_dir / "agent.sock"


class TelemetryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[telemetry]``: how often the HAL is sampled and how samples are batched."""

    interval_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_INTERVAL_S)] = 1.0
    batch: Annotated[int, msgspec.Meta(ge=1, le=MAX_TELEMETRY_BATCH)] = 10


class JobsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[jobs]``: how jobs are run (what a job may ask for is ``[policy]``)."""

    docker_host: str = "unix:///var/run/docker.sock"
    user: str | None = None
    log_max_bytes: _NonNegative = 1 << 20
    log_rate_bytes_per_s: Annotated[int, msgspec.Meta(gt=0)] = 256 << 10
    max_concurrent: _NonNegative = 0
    registry_logins_file: Path | None = None
    """Credentials for image pulls, per registry (a private TOML file; see
    config.files.read_registry_logins); None: pulls go without credentials."""
    pull_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 120.0
    """A pull with no progress for this long fails ``pull_timeout``."""
    registry_ca_file: Path | None = None
    """A PEM CA bundle registries chain to, for the node's own checks of an image at its
    registry (size, signature); the engine trusts registries through /etc/docker/certs.d."""
    image_cache_max_bytes: _NonNegative = 64 << 30
    """The images the agent pulled, together, at most (least recently used out first)."""
    image_cache_min_free_bytes: _NonNegative = 5 << 30
    """Pulled images are removed while the engine's disk has less than this free."""
    upload_spool_max_bytes: _NonNegative = 4 << 30
    """Most bytes of job outputs held for upload at once (state_dir/spool); a job whose
    offer names upload targets is admitted only if its output_max_bytes fits beside the
    others' (refused ``spool_full``); 0: such offers are always refused."""

    def __post_init__(self) -> None:
        socket = self.docker_host.removeprefix("unix://")
        check_no_nul("docker_host", socket)
        if socket == self.docker_host or not socket.startswith("/"):
            raise ValueError(
                f"docker_host: {self.docker_host!r}: only a local engine is supported, "
                "as unix:///absolute/path"
            )
        if self.user is not None:
            if not _USER.fullmatch(self.user):
                raise ValueError(f"user: {self.user!r} is not numeric uid:gid, e.g. 65534:65534")
            uid, gid = (int(part) for part in self.user.split(":"))
            if uid == 0 or gid == 0:
                # Root (or root's group) in the container is root's files on the host
                # through any mount, and one escape from being root on the machine.
                raise ValueError(f"user: {self.user!r}: jobs never run as root (uid or gid 0)")
            if max(uid, gid) > _MAX_ID:
                raise ValueError(f"user: {self.user!r}: an id is at most {_MAX_ID}")

    @property
    def docker_socket(self) -> str:
        """The Docker engine's unix socket path."""
        return self.docker_host.removeprefix("unix://")


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[cache]``: the disk fetched inputs may take, and how long a fetch may take."""

    inputs_max_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 50)] = 64 << 30
    input_stall_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    input_deadline_s: Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)] = 6 * 3600.0


class ControlConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[control]``: who may use the local control socket."""

    socket_group: str | None = None
    socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o660

    def __post_init__(self) -> None:
        if self.socket_group is not None:
            check_no_nul("socket_group", self.socket_group)
        if self.socket_mode & 0o007:
            # Anyone who can connect can pause the agent and read job logs.
            raise ValueError(
                f"socket_mode: {self.socket_mode:#o} lets every local user in; "
                "grant a group instead (socket_group)"
            )


class MetricsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[metrics]``: the Prometheus endpoint, on loopback only."""

    enabled: bool = False
    listen: str = "127.0.0.1:9464"

    def __post_init__(self) -> None:
        host, port = split_host_port(self.listen)
        if not is_loopback(host):
            raise ValueError(
                f"listen: {self.listen!r} is not a loopback address; metrics are served "
                "on this machine only (put a proxy in front to share them)"
            )
        if not 0 <= port <= 65535:
            raise ValueError(f"listen: {self.listen!r}: port {port} is out of range")

    @property
    def host(self) -> str:
        """The address to listen on (IPv6 without brackets)."""
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        """The port to listen on (0: any free one)."""
        return split_host_port(self.listen)[1]


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole configuration; every section but ``paths`` has defaults for every key."""

    paths: PathsConfig
    coordinator: CoordinatorConfig = CoordinatorConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    jobs: JobsConfig = JobsConfig()
    policy: Policy = Policy()
    cache: CacheConfig = CacheConfig()
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
    owner: OwnerPolicy = OwnerPolicy()


_SECTIONS: dict[str, type[msgspec.Struct]] = {
    field.name: typing.cast(type[msgspec.Struct], field.type)
    for field in msgspec.structs.fields(AgentConfig)
}


def default_config_path(system: bool) -> Path:
    """Where the configuration file is unless one is named."""
    if system:
        return SYSTEM_CONFIG_PATH
    return Path(platformdirs.user_config_dir(_APP_NAME, appauthor=False)) / "agent.toml"


def is_system_install(*, euid: int | None = None, system_file: Path = SYSTEM_CONFIG_PATH) -> bool:
    """Whether this process uses the system install's defaults: root, or the system file exists."""
    # os.path.exists, not Path.exists: a system directory this user may not search is
    # another user's install, not an error.
    return (os.geteuid() if euid is None else euid) == 0 or os.path.exists(system_file)


def _keys_fault(policy: Policy) -> str:
    """Why the policy's image signing keys cannot be used ("" if they can)."""
    try:
        load_keys(policy.image_signature_keys)
    except ValueError as exc:
        return str(exc)
    return ""


def load_config(
    path: Path | None,
    env: Mapping[str, str],
    *,
    system: bool,
    require_coordinator: bool = False,
    flags: typing.Sequence[Flag] = (),
) -> AgentConfig:
    """The configuration from ``path`` (None: the default file), overridden by ``env``,
    overridden by the command line's ``flags``: one set of values, checked once.

    A missing default file means every default; a missing named file is an error. With
    ``require_coordinator``, ``coordinator.url`` and at least one of ``coordinator.keys``
    must be set (``gpu-agent run`` needs them, ``gpu-agent keys`` does not), and an
    enrolment token file must hold a token (config_files.read_enrolment_token). Beyond
    the types: a CA file must hold PEM certificates, and no path may be where a
    directory cannot be.

    Raises:
        ConfigError: ``bad_config``, naming the file, variable or option, the key and the
            fault.
    """
    source = default_config_path(system) if path is None else path
    raw = read_toml(source, must_exist=path is not None)
    for name, value in raw.items():
        if name not in _SECTIONS and not isinstance(value, dict):
            sections = ", ".join(f"[{s}]" for s in _SECTIONS)
            raise ConfigError(
                "bad_config", f"{source}: {name}: a key outside any section ({sections})"
            )
    sources: dict[str, str] = {}
    for flag in flags:
        if "." not in flag.key:  # a whole section, e.g. --policy FILE
            raw[flag.key] = flag.value
            sources[flag.key] = flag.option
    overrides = {**env_overrides(env, _SECTIONS), **flag_overrides(flags, _SECTIONS)}

    def blame(key: str) -> str:
        """Where the value of ``key`` (or of its section) came from."""
        section, _, name = key.partition(".")
        name = name.partition("[")[0]
        if (section, name) in overrides:
            return overrides[section, name].label
        base = sources.get(section, str(source))
        touched = sorted(o.name for (sec, _), o in overrides.items() if sec == section)
        return f"{base} with {', '.join(touched)}" if touched else base

    merged = _with_defaults(raw, overrides, system)
    try:
        config = msgspec.convert(merged, AgentConfig, dec_hook=decode_path)
    except msgspec.ValidationError as exc:
        key, what = _locate(str(exc), merged)
        raise ConfigError("bad_config", f"{blame(key)}: {key}: {what}") from None
    coordinator = config.coordinator
    faults = [
        (f"paths.{name}", directory_fault(getattr(config.paths, name)))
        for name in ("state_dir", "runtime_dir", "jobs_dir")
    ]
    faults.append(("paths.runtime_dir", socket_path_fault(config.paths.control_socket)))
    if coordinator.ca_file is not None:
        faults.append(("coordinator.ca_file", ca_file_fault(coordinator.ca_file)))
    if require_coordinator and (token_file := coordinator.enrolment_token_file) is not None:
        # `run`'s alone: the file is for the service's user, not for `keys show`'s.
        faults.append(("coordinator.enrolment_token_file", enrolment_token_fault(token_file)))
    if require_coordinator and (logins := config.jobs.registry_logins_file) is not None:
        faults.append(("jobs.registry_logins_file", registry_logins_fault(logins)))
    if require_coordinator and (registry_ca := config.jobs.registry_ca_file) is not None:
        faults.append(("jobs.registry_ca_file", ca_file_fault(registry_ca)))
    faults.append(("policy.image_signature_keys", _keys_fault(config.policy)))
    for key, fault in faults:
        if fault:
            raise ConfigError("bad_config", f"{blame(key)}: {key}: {fault}")
    if require_coordinator:
        for key, missing in (("url", coordinator.url is None), ("keys", not coordinator.keys)):
            if missing:
                raise ConfigError(
                    "bad_config",
                    f"{blame('coordinator')}: coordinator.{key} is not set; `gpu-agent run` "
                    f"needs it (in the file, or {env_var('coordinator', key)})",
                )
    return config


def _with_defaults(
    raw: dict[str, Any], overrides: Mapping[tuple[str, str], Override], system: bool
) -> dict[str, Any]:
    """The file's tables with the environment's and the options' values set in them, and
    the defaults that depend on the kind of install filled in."""
    filled = {
        name: dict(value) if isinstance(value, dict) else value for name, value in raw.items()
    }
    for (section, key), override in overrides.items():
        table = filled.setdefault(section, {})
        if isinstance(table, dict):  # else the file's bad value is refused as it is
            table[key] = override.value
    paths = filled.setdefault("paths", {})
    if isinstance(paths, dict):
        if "state_dir" not in paths:
            paths["state_dir"] = str(
                _SYSTEM_STATE_DIR
                if system
                else platformdirs.user_data_dir(_APP_NAME, appauthor=False)
            )
        if "runtime_dir" not in paths:
            paths["runtime_dir"] = str(_SYSTEM_RUNTIME_DIR if system else _user_runtime_dir())
        if "jobs_dir" not in paths and isinstance(paths["state_dir"], str):
            paths["jobs_dir"] = str(Path(paths["state_dir"]) / "jobs")
    control = filled.setdefault("control", {})
    if isinstance(control, dict):
        if system:
            control.setdefault("socket_group", _SYSTEM_SOCKET_GROUP)
        if control.get("socket_group") == "":
            control["socket_group"] = None  # TOML has no null: "" says "no group"
    return filled


def _user_runtime_dir() -> str:
    # Without $XDG_RUNTIME_DIR (no login session: a container, a cron job) platformdirs
    # warns and falls back to a private directory under /tmp it has checked; that is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", platformdirs.RuntimeDirWarning)
        try:
            return platformdirs.user_runtime_dir(_APP_NAME, appauthor=False)
        except PermissionError as exc:
            raise ConfigError(
                "bad_config", f"paths.runtime_dir: no safe default ({exc}); set it"
            ) from None


def _locate(message: str, raw: Mapping[str, Any]) -> tuple[str, str]:
    """The dotted key and the fault in a msgspec validation message about ``raw``."""
    key, what = "", message
    if match := _AT.fullmatch(message):
        what, key = match.groups()
    if match := _UNKNOWN.fullmatch(what):
        name = match.group(1)
        if not key:
            return name, f"unknown section; known: {', '.join(_SECTIONS)}"
        known = ", ".join(f.name for f in msgspec.structs.fields(_SECTIONS[key]))
        return f"{key}.{name}", f"unknown key; [{key}] has: {known}"
    if key in _SECTIONS and (match := _KEYED.fullmatch(what)):
        name, what = match.groups()
        return f"{key}.{name}", what
    table = raw.get("policy") if key == "policy" else None
    patterns = table.get("allowed_images") if isinstance(table, dict) else None
    if isinstance(patterns, list):
        # Policy checks its image patterns as a whole; find the one it refused.
        for index, pattern in enumerate(patterns):
            try:
                Policy(allowed_images=[pattern])
            except ValueError:
                return f"policy.allowed_images[{index}]", what
    return key, what

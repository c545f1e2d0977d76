"""``GPU_AGENT_<SECTION>_<KEY>`` variables and command-line options: each a typed override
of one key of the configuration (``agent.config.settings`` merges them over the file).

A value is text, read as the file's value of the key would be: a list comma-separated, an
empty string unsets an optional key, ``*_mode`` in octal, the rest as msgspec reads a
string for the type.
"""

from __future__ import annotations

import argparse
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import msgspec

from agent.errors import ConfigError
from sandbox.errors import SandboxError
from sandbox.policy import load_policy_file

__all__ = [
    "NOT_CONFIG_VARIABLES",
    "Flag",
    "Override",
    "Sections",
    "command_line_flags",
    "decode_path",
    "env_overrides",
    "env_var",
    "flag_overrides",
]

_ENV_PREFIX = "GPU_AGENT_"
#: The ``GPU_AGENT_`` variables that are not config keys: the HAL's (README, Environment),
#: the tests' and the package build's. Any other ``GPU_AGENT_`` variable that is not
#: ``GPU_AGENT_<SECTION>_<KEY>`` is a typo, refused rather than silently ignored.
NOT_CONFIG_VARIABLES: typing.Final = frozenset(
    {
        "GPU_AGENT_NVML_LIB",
        "GPU_AGENT_SYSFS_ROOT",
        "GPU_AGENT_DEV_ROOT",
        "GPU_AGENT_PROC_ROOT",
        "GPU_AGENT_DISCOVERY_TIMEOUT",
        "GPU_AGENT_REQUIRE_DOCKER",
        "GPU_AGENT_REQUIRE_POSTGRES",
        "GPU_AGENT_VERSION",
        "GPU_AGENT_RELEASE",
        "GPU_AGENT_DEB_ARCH",
        "GPU_AGENT_VENV",
        "GPU_AGENT_PYTHON",
        "GPU_AGENT_LIBC",
        "GPU_AGENT_DOC",
    }
)
#: The options that name a file or directory, and the key each sets.
_PATH_OPTIONS: typing.Final = (
    ("--ca-file", "coordinator.ca_file"),
    ("--enrolment-token-file", "coordinator.enrolment_token_file"),
    ("--state-dir", "paths.state_dir"),
    ("--runtime-dir", "paths.runtime_dir"),
)
Sections = Mapping[str, type[msgspec.Struct]]
"""The configuration's sections by name, as ``AgentConfig`` has them."""


def env_var(section: str, key: str) -> str:
    """The environment variable that overrides ``section.key``."""
    return f"{_ENV_PREFIX}{section.upper()}_{key.upper()}"


class Flag(typing.NamedTuple):
    """A command-line option that sets a key: ``Flag("--interval", "telemetry.interval_s",
    "2")``. ``value`` is text, read as the environment's is. A whole section (``key``
    ``"policy"``) is given as its table, with ``option`` naming its file."""

    option: str
    key: str
    value: str | dict[str, Any]


class Override(typing.NamedTuple):
    """One key's value from a variable or an option, and how a refusal names its source."""

    label: str  # how a refusal names it: GPU_AGENT_X='1', --interval='inf'
    name: str  # how a refusal of its section lists it: GPU_AGENT_X, --interval
    value: Any


def command_line_flags(args: argparse.Namespace) -> list[Flag]:
    """The keys ``gpu-agent run`` (or ``keys``) options set, as text to check with the rest.

    Raises:
        ConfigError: ``bad_policy``: the ``--policy`` file cannot be read as a policy.
    """
    flags: list[Flag] = []
    for option, key, value in (
        ("--coordinator", "coordinator.url", getattr(args, "coordinator", None)),
        ("--interval", "telemetry.interval_s", getattr(args, "interval", None)),
        ("--batch", "telemetry.batch", getattr(args, "batch", None)),
    ):
        if value is not None:
            flags.append(Flag(option, key, value))
    for option, key in _PATH_OPTIONS:
        text = getattr(args, option.removeprefix("--").replace("-", "_"), None)
        if text == "":
            # An optional key takes "" as unset: from an option it is a mistake
            # (`--enrolment-token-file "$UNSET"`), never a wish to send no token.
            raise ConfigError("bad_config", f"{option}='': {key}: an empty path; give one")
        if text is not None:
            # Relative to the working directory, as the user sees it.
            flags.append(Flag(option, key, os.path.abspath(text)))
    if keys := getattr(args, "coordinator_key", None):
        flags.append(Flag("--coordinator-key", "coordinator.keys", ",".join(keys)))
    if getattr(args, "allow_plaintext", False):
        flags.append(Flag("--allow-plaintext", "coordinator.allow_plaintext", "true"))
    if (policy_file := getattr(args, "policy", None)) is not None:
        try:
            policy = load_policy_file(policy_file)
        except SandboxError as exc:
            raise ConfigError(exc.code, f"--policy {policy_file}: {exc.detail}") from None
        flags.append(Flag(f"--policy {policy_file}", "policy", msgspec.to_builtins(policy)))
    return flags


def env_overrides(env: Mapping[str, str], sections: Sections) -> dict[tuple[str, str], Override]:
    """``(section, key) -> override`` for every ``GPU_AGENT_<SECTION>_<KEY>``; any other
    ``GPU_AGENT_`` variable not in :data:`NOT_CONFIG_VARIABLES` is refused by name.

    Each value is typed and checked alone here (a list is comma-separated, an empty string
    unsets an optional key, ``*_mode`` is octal, the rest as msgspec reads a string for the
    type), and as part of its section with the file's values when the whole is converted.
    """
    found: dict[tuple[str, str], Override] = {}
    for var, text in env.items():
        if not var.startswith(_ENV_PREFIX) or var in NOT_CONFIG_VARIABLES:
            continue
        rest = var.removeprefix(_ENV_PREFIX)
        section = next((s for s in sections if rest.startswith(s.upper() + "_")), None)
        if section is None:
            raise ConfigError("bad_config", f"{var}: {_unknown_variable(var, sections)}")
        key = rest.removeprefix(section.upper() + "_").lower()
        fields = _fields(sections, section)
        if key not in fields or env_var(section, key) != var:
            raise ConfigError(
                "bad_config",
                f"{var}: {section}.{key}: unknown key; [{section}] has: {', '.join(fields)}",
            )
        found[section, key] = Override(
            f"{var}={text!r}", var, _typed(sections, f"{var}={text!r}", section, key, text)
        )
    return found


def flag_overrides(flags: Sequence[Flag], sections: Sections) -> dict[tuple[str, str], Override]:
    """``(section, key) -> override`` for every option that sets one key."""
    found: dict[tuple[str, str], Override] = {}
    for flag in flags:
        section, dot, key = flag.key.partition(".")
        if dot and isinstance(flag.value, str):
            label = f"{flag.option}={flag.value!r}"
            found[section, key] = Override(
                label, flag.option, _typed(sections, label, section, key, flag.value)
            )
    return found


def _fields(sections: Sections, section: str) -> dict[str, Any]:
    return {field.name: field.type for field in msgspec.structs.fields(sections[section])}


def _typed(sections: Sections, label: str, section: str, key: str, text: str) -> Any:
    try:
        return _env_value(key, text, _fields(sections, section)[key])
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError("bad_config", f"{label}: {section}.{key}: {exc}") from None


def _unknown_variable(var: str, sections: Sections) -> str:
    known = [env_var(s, k) for s in sections for k in _fields(sections, s)]
    close = difflib.get_close_matches(var, [*known, *sorted(NOT_CONFIG_VARIABLES)], n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    names = ", ".join(s.upper() for s in sections)
    return (
        f"not a setting: config variables are {_ENV_PREFIX}<SECTION>_<KEY> with a section "
        f"of {names} (docs/configuration.md){hint}"
    )


def _env_value(key: str, text: str, kind: Any) -> Any:
    """``text`` as a value of type ``kind``, in the builtin form the file would give."""
    plain = typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind
    origin = typing.get_origin(plain)
    value: Any = text
    if origin in (list, tuple):
        value = [part.strip() for part in text.split(",") if part.strip()]
    elif origin in (types.UnionType, typing.Union) and type(None) in typing.get_args(plain):
        value = text or None
    elif plain is Path and not text:
        # Path("") is ".": relative to wherever the agent happens to start.
        raise ValueError("an empty path; give an absolute one")
    elif key.endswith("_mode"):
        try:
            value = int(text.removeprefix("0o"), 8)
        except ValueError:
            raise ValueError("not an octal mode such as 0660") from None
    typed = msgspec.convert(value, kind, strict=False, dec_hook=decode_path)
    return msgspec.to_builtins(typed, enc_hook=str)


def decode_path(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise TypeError(f"Expected `{kind.__name__}`, got `{type(value).__name__}`")

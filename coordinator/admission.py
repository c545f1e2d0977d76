"""Who may connect, and how much each node may send and store: the coordinator's settings.

Pure pieces, driven by :mod:`coordinator.connection` with the clock it is handed:

- :func:`admit`: the admission mode (``open``, an allow-list of node ids or keys, or an
  enrolment token that a node presents in ``auth`` the first time it connects);
- :class:`TokenBucket`: a rate with a burst, for handshakes from new keys (one bucket per
  coordinator) and for frames per node (one per session);
- :class:`Strikes`: when refusals in a row become abuse, and the session is closed.

docs/protocol.md, "Admission and quotas", is the reference.
"""

from __future__ import annotations

import argparse
import hmac
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

from agent.protocol import crypto
from agent.protocol.errors import AuthError
from coordinator.errors import ConfigError
from sandbox.files import read_regular

__all__ = [
    "AdmissionMode",
    "Settings",
    "Strikes",
    "TokenBucket",
    "add_options",
    "admit",
    "allow_entry",
    "read_tokens",
    "settings_from",
]

AdmissionMode = Literal["open", "allow_list", "token"]

_MIB = 1024 * 1024
_GIB = 1024 * _MIB
#: Enrolment tokens: long enough not to be guessed, short enough for ``auth`` (256).
_MIN_TOKEN, _MAX_TOKEN = 16, 256
#: The largest number a setting may be: SQLite's integers hold 2**63 - 1, and a size, row
#: count or time beyond this one means nothing anyway.
_MAX_SETTING = 2**62
#: A node id as :func:`agent.protocol.crypto.node_id` derives it.
_NODE_ID = re.compile(r"node-[a-z2-7]{26}")
#: The largest tokens file read: thousands of tokens; /dev/zero or a huge file is refused.
_MAX_TOKENS_FILE = _MIB


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Timing the coordinator asks of agents, its nonces, admission, limits and retention.

    Attributes:
        admission: ``open`` (any key), ``allow_list`` (only :attr:`allowed`), ``token``
            (a node never seen must present one of :attr:`enrolment_tokens`).
        allowed: node ids or base64 public keys admitted in ``allow_list`` mode.
        enrolment_tokens: the tokens that enrol a new node in ``token`` mode.
        new_keys_per_s, new_keys_burst: handshakes from keys the store does not know.
        frames_per_s, frames_burst: frames per node once its session is open.
        node_quota_bytes: bytes of messages kept per node (its oldest telemetry goes first).
        unverified_quota_bytes: the same, for a node whose profile is not verified yet
            (open admission lets any fresh key in: each may keep only this little).
        store_max_bytes: bytes of messages kept by all nodes together; past it, a node's
            message is shed unless its own oldest telemetry makes room.
        attest_max_age_s: a node's verified profile stands for it this long: a node
            reconnecting within it, whose ``hello`` names the same profile's digest, is not
            asked to attest again; a session asks again once it has passed.
        abuse_strikes: frames held over the rate that moved no stream on, or messages
            shed over the quota, in a row, that close the session.
        telemetry_keep_s, telemetry_keep_rows: telemetry older, or beyond that many rows
            per node, is deleted every :attr:`retention_interval_s` (0: never).
        telemetry_raw_s: raw telemetry older than this is folded into per-minute
            aggregates per GPU metric by the same pass (:mod:`coordinator.downsample`);
            the aggregates are kept :attr:`telemetry_keep_s`.
        artifacts_keep_s: the outputs in the artifact store of a job that ended longer ago
            are removed by the same pass.
        artifacts_max_bytes: past it, the same pass also removes the outputs of the jobs
            that ended first, until the store is within it; None: no such budget.
    """

    heartbeat_s: float = 15.0
    telemetry_interval_s: float = 1.0
    handshake_timeout_s: float = 30.0
    attest_nonce_ttl_s: float = 3600.0
    attest_max_age_s: float = 3600.0
    admission: AdmissionMode = "open"
    allowed: frozenset[str] = field(default_factory=frozenset)
    enrolment_tokens: frozenset[str] = field(default_factory=frozenset)
    new_keys_per_s: float = 5.0
    new_keys_burst: int = 20
    frames_per_s: float = 200.0
    frames_burst: int = 1000
    node_quota_bytes: int = 256 * _MIB
    unverified_quota_bytes: int = 4 * _MIB
    store_max_bytes: int = 4096 * _MIB
    abuse_strikes: int = 30
    telemetry_keep_s: float = 7 * 86400.0
    telemetry_keep_rows: int = 100_000
    telemetry_raw_s: float = 3600.0
    artifacts_keep_s: float = 7 * 86400.0
    artifacts_max_bytes: int | None = None
    retention_interval_s: float = 600.0

    def __post_init__(self) -> None:
        # Every number is a rate, a size or a time: positive, but retention's interval
        # may be 0 (never); and within what SQLite's integers (and the code) hold.
        for each in fields(self):
            value = getattr(self, each.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            zero_ok = each.name == "retention_interval_s"
            if not (value >= 0 if zero_ok else value > 0) or not value <= _MAX_SETTING:
                low = "0" if zero_ok else "above 0"
                raise ConfigError(
                    "bad_setting", f"{each.name} must be {low} and at most 2**62: {value!r}"
                )
        if self.admission not in get_args(AdmissionMode):
            raise ConfigError("bad_setting", f"admission {self.admission!r} is not a mode")
        if self.admission == "allow_list" and not self.allowed:
            raise ConfigError("bad_setting", "allow_list admission with nobody on the list")
        # A list or tokens the mode does not use would be ignored: the operator meant
        # another mode, and would believe the coordinator closed when it is open.
        if self.allowed and self.admission != "allow_list":
            raise ConfigError("bad_setting", f"an allow-list with {self.admission} admission")
        if self.enrolment_tokens and self.admission != "token":
            raise ConfigError("bad_setting", f"enrolment tokens with {self.admission} admission")
        for entry in self.allowed:
            if not _NODE_ID.fullmatch(entry) and _public_key(entry) != entry:
                raise ConfigError(
                    "bad_setting",
                    f"{entry[:80]!r} on the allow-list is neither a node id (node-...) nor a"
                    " base64 Ed25519 public key",
                )
        if self.admission == "token" and not self.enrolment_tokens:
            raise ConfigError("bad_setting", "token admission without any enrolment token")
        for token in self.enrolment_tokens:
            if not _MIN_TOKEN <= len(token) <= _MAX_TOKEN or not token.isprintable():
                raise ConfigError(
                    "bad_setting",
                    f"an enrolment token is {_MIN_TOKEN} to {_MAX_TOKEN} printable characters",
                )


def _public_key(text: str) -> str | None:
    """``text`` as agents send a public key (standard base64, padded), if it is a base64
    Ed25519 public key in either alphabet; None if it is not one."""
    try:
        raw = crypto.b64decode(text)
    except ValueError:
        return None
    return crypto.b64encode(raw) if len(raw) == 32 else None


def allow_entry(text: str) -> str:
    """An ``--allow`` argument as the allow-list holds it: a node id as it is, a public
    key as agents send it (so that one given URL-safe or unpadded still matches)."""
    return text if _NODE_ID.fullmatch(text) else (_public_key(text) or text)


def admit(
    settings: Settings, *, node_id: str, public_key: str, known: bool, token: str | None
) -> None:
    """Whether the admission mode lets this authenticated node in.

    Raises:
        AuthError: ``not_admitted`` (not on the allow-list), ``enrolment_required`` (a new
            node without a valid enrolment token).
    """
    if settings.admission == "allow_list":
        # The key as the list holds it: standard, padded, whatever alphabet the agent used.
        key = _public_key(public_key) or public_key
        if node_id not in settings.allowed and key not in settings.allowed:
            raise AuthError("not_admitted", f"{node_id} is not on this coordinator's list")
    elif settings.admission == "token" and not known:
        given = (token or "").encode()
        # compare_digest: the time taken says nothing about how much of a token matched.
        if not any(hmac.compare_digest(given, t.encode()) for t in settings.enrolment_tokens):
            raise AuthError("enrolment_required", "a new node needs a valid enrolment token")


class TokenBucket:
    """``rate`` events per second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> float:
        """Take one token; returns 0.0, or how many seconds to wait until one is there
        (the token is then taken already: wait, and go on)."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1.0
        if self._tokens >= 0.0:
            return 0.0
        return -self._tokens / self.rate

    def try_take(self, now: float) -> bool:
        """Take one token if there is one; False (and nothing taken) if not."""
        if self.take(now) == 0.0:
            return True
        self._tokens += 1.0
        return False

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled to its burst."""
        return self._tokens + (now - self._at) * self.rate >= self.burst


class Strikes:
    """Refusals in a row; a node under its limits again starts from zero."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def strike(self) -> bool:
        """Count one refusal; whether that makes it abuse (close the session)."""
        self.count += 1
        return self.count >= self.limit

    def clear(self) -> None:
        """The node is within its limits again."""
        self.count = 0


def read_tokens(path: Path) -> frozenset[str]:
    """The enrolment tokens in a file, one a line (blank lines and ``#`` comments skipped).

    A file, not the command line: arguments are visible to every local user. A regular
    file of at most 1 MiB: a FIFO, a device or a huge file is refused, not waited on or
    read whole.

    Raises:
        ConfigError: ``tokens_unreadable``.
    """
    try:
        text = read_regular(path, _MAX_TOKENS_FILE).decode()
    except OSError as exc:
        raise ConfigError("tokens_unreadable", f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("tokens_unreadable", f"{path} is not UTF-8 text") from None
    lines = (line.strip() for line in text.splitlines())
    return frozenset(line for line in lines if line and not line.startswith("#"))


def add_options(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` options of admission, quotas and retention."""
    parser.add_argument(
        "--admission", choices=get_args(AdmissionMode), default="open", help="who may connect"
    )
    parser.add_argument(
        "--allow", action="append", default=[], metavar="NODE_OR_KEY",
        help="with --admission allow_list: a node id or base64 public key (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--enrolment-tokens", type=Path, metavar="FILE",
        help="with --admission token: a file of tokens, one a line",
    )  # fmt: skip
    parser.add_argument(
        "--new-keys-per-s", type=float,
        help="handshakes per second from keys never seen (default 5: enrolling a fleet at"
        " once wants more)",
    )  # fmt: skip
    parser.add_argument(
        "--attest-max-age-minutes", type=float,
        help="minutes a node's verified profile stands for it before it is asked to attest"
        " again (default 60)",
    )  # fmt: skip
    parser.add_argument("--node-quota-mib", type=float, help="MiB of messages kept per node")
    parser.add_argument(
        "--unverified-quota-mib", type=float,
        help="MiB kept per node until its profile is verified",
    )  # fmt: skip
    parser.add_argument(
        "--store-max-mib", type=float, help="MiB of messages kept by all nodes together"
    )
    parser.add_argument("--telemetry-keep-days", type=float, help="days of telemetry kept")
    parser.add_argument("--telemetry-keep-rows", type=int, help="telemetry rows kept per node")
    parser.add_argument(
        "--telemetry-raw-minutes", type=float,
        help="minutes telemetry is kept raw, then as per-minute aggregates (default 60)",
    )  # fmt: skip
    parser.add_argument(
        "--artifacts-keep-days", type=float,
        help="days a job's stored outputs are kept after it ended (default 7)",
    )  # fmt: skip
    parser.add_argument(
        "--artifacts-max-gib", type=float,
        help="GiB the stored outputs may take; past it, those of the jobs that ended first go"
        " (default: no budget but --artifacts-keep-days and the per-node cap)",
    )  # fmt: skip


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings :func:`add_options` asked for, the defaults for the rest.

    Raises:
        ConfigError: ``bad_setting``, ``tokens_unreadable``.
    """
    default = Settings()
    tokens = read_tokens(args.enrolment_tokens) if args.enrolment_tokens else frozenset()
    quota_mib, keep_days = args.node_quota_mib, args.telemetry_keep_days
    artifact_days, attest_minutes = args.artifacts_keep_days, args.attest_max_age_minutes
    return Settings(
        attest_max_age_s=(
            default.attest_max_age_s if attest_minutes is None else _minutes(attest_minutes)
        ),
        admission=args.admission,
        allowed=frozenset(allow_entry(entry) for entry in args.allow),
        enrolment_tokens=tokens,
        new_keys_per_s=(
            default.new_keys_per_s if args.new_keys_per_s is None else args.new_keys_per_s
        ),
        node_quota_bytes=(
            default.node_quota_bytes if quota_mib is None else _whole(quota_mib * _MIB)
        ),
        unverified_quota_bytes=(
            default.unverified_quota_bytes
            if args.unverified_quota_mib is None
            else _whole(args.unverified_quota_mib * _MIB)
        ),
        store_max_bytes=(
            default.store_max_bytes
            if args.store_max_mib is None
            else _whole(args.store_max_mib * _MIB)
        ),
        telemetry_keep_s=default.telemetry_keep_s if keep_days is None else _seconds(keep_days),
        telemetry_keep_rows=(
            default.telemetry_keep_rows
            if args.telemetry_keep_rows is None
            else args.telemetry_keep_rows
        ),
        artifacts_keep_s=(
            default.artifacts_keep_s if artifact_days is None else _seconds(artifact_days)
        ),
        telemetry_raw_s=(
            default.telemetry_raw_s
            if args.telemetry_raw_minutes is None
            else _whole(args.telemetry_raw_minutes * 60)
        ),
        artifacts_max_bytes=(
            None if args.artifacts_max_gib is None else _whole(args.artifacts_max_gib * _GIB)
        ),
    )


def _whole(value: float) -> int:
    if not math.isfinite(value):
        raise ConfigError("bad_setting", f"not a finite size: {value!r}")
    return int(value)


def _minutes(minutes: float) -> float:
    seconds = minutes * 60
    if not math.isfinite(seconds):
        raise ConfigError("bad_setting", f"not a finite number of minutes: {minutes!r}")
    return seconds


def _seconds(days: float) -> float:
    seconds = days * 86400
    if not math.isfinite(seconds):
        raise ConfigError("bad_setting", f"not a finite number of days: {days!r}")
    return seconds

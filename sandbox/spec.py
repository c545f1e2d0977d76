"""The workload spec: what a job asks to run, decoded from TOML or JSON and validated.

A spec names an image, a command, its environment, GPUs and resource limits, a timeout,
whether it needs egress, inline input files and the output paths to collect. It has no
field that could ask for host access; a key that tries (``privileged``, ``cap_add``,
``volumes``, ``network_mode``, ...) is refused by name before anything else is read.

Sizes (every field whose name ends in ``_bytes``) are an integer number of bytes, or a
string: a number, an optional space and a unit. Units are case-sensitive: ``B``; ``kB``,
``MB``, ``GB``, ``TB`` (powers of 1000); ``KiB``, ``MiB``, ``GiB``, ``TiB`` (powers of
1024). A string without a unit is bytes. A fraction is allowed when the result is a whole
number of bytes (``"1.5GiB"``). Docker's one-letter units (``"512m"``) are refused: ``m``
means MiB to Docker and 10**6 to SI, and a spec must not be read two ways.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import os
import re
import tomllib
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import msgspec

from sandbox.errors import SpecError
from sandbox.files import read_regular
from sandbox.service_spec import HttpCheck, RestartPolicy, ServiceSpec
from sandbox.urls import url_problem

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "MAX_PATH_DEPTH",
    "MAX_SPEC_BYTES",
    "MIN_CPUS",
    "GpuRequest",
    "HttpCheck",
    "ImageRef",
    "InputFile",
    "Resources",
    "RestartPolicy",
    "ServiceSpec",
    "WorkloadSpec",
    "encode_spec",
    "format_size",
    "load_spec",
    "load_spec_file",
    "parse_size",
    "spec_digest",
]

MAX_SPEC_BYTES = 1 << 20
"""The largest spec accepted, encoded; inline inputs count towards it."""
MAX_PATH_BYTES = 1024
"""The longest input or output path, in bytes (UTF-8)."""
MAX_PATH_DEPTH = 32
"""The most components an input or output path may have."""
MAX_NAME_BYTES = 255
"""The longest component of an input or output path, in bytes (NAME_MAX)."""
MIN_CPUS = 0.01
"""The smallest CPU limit: Docker's. Below 1e-9 the limit would be 0 nanocpus, which
Docker reads as no limit at all."""

_MIB = 1 << 20
_SI = {f"{prefix}B": 1000 ** (i + 1) for i, prefix in enumerate("kMGT")}
_IEC = {f"{prefix}iB": 1024 ** (i + 1) for i, prefix in enumerate("KMGT")}
_UNITS = {"": 1, "B": 1, **_SI, **_IEC}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?) ?([A-Za-z]*)")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Keys that ask for host access, by what they would grant. A key is compared in lower case
# without "_" or "-", so that Docker's API spelling "CapAdd" is caught as well as "cap_add".
_FORBIDDEN = {
    "privileged mode": ("privileged",),
    "added capabilities": ("capadd", "capabilities"),
    "host devices": ("devices", "devicerequests", "devicecgrouprules"),
    "host mounts": ("volumes", "volumesfrom", "mounts", "binds"),
    "a choice of namespace": (
        *("networkmode", "pid", "pidmode", "ipc", "ipcmode", "uts", "utsmode"),
        *("userns", "usernsmode", "cgroupns", "cgroupparent"),
    ),
    "changes to the security profile": ("securityopt", "seccomp", "apparmor"),
    "a choice of runtime (the operator's policy sets it)": ("runtime",),
    "a choice of user or groups": ("user", "groupadd"),
    "changes to kernel settings or limits": ("sysctls", "ulimits", "oomkilldisable"),
}
_FORBIDDEN_KEYS = {key: what for what, keys in _FORBIDDEN.items() for key in keys}

# GPU visibility is set by the runner from the job's assignment, never by the job.
_GPU_ENV = frozenset(
    (
        *("NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_DISABLE_REQUIRE"),
        *("NVIDIA_MIG_CONFIG_DEVICES", "NVIDIA_MIG_MONITOR_DEVICES", "CUDA_VISIBLE_DEVICES"),
        *("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL"),
        *("ZE_AFFINITY_MASK", "ONEAPI_DEVICE_SELECTOR"),
    )
)

_UNKNOWN = re.compile(r"Object contains unknown field `(?P<name>[^`]*)`")
_MISSING = re.compile(r"Object missing required field `(?P<name>[^`]*)`")


def parse_size(text: str) -> int:
    """A size string (see the module docstring) as a number of bytes; ValueError if not one."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size: write a number and a unit, e.g. '512MiB'")
    number, unit = match.groups()
    if unit not in _UNITS:
        units = ", ".join(u for u in _UNITS if u)
        raise ValueError(f"{text!r} has an unknown unit {unit!r}; the units are {units}")
    value = Fraction(number) * _UNITS[unit]
    if value.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def format_size(size: int) -> str:
    """A number of bytes in the largest binary unit that holds it exactly, e.g. '512MiB'."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size}B"


class ImageRef(msgspec.Struct, frozen=True):
    """A parsed image reference, normalised as Docker does ("python" is "docker.io/library/python").

    ``repository`` is None for a bare local image id (``sha256:<hex>``), whose id is then in
    ``digest``.
    """

    repository: str | None
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        """Parse ``name[:tag]``, ``name[:tag]@sha256:<hex>`` or ``sha256:<hex>`` (or ValueError)."""
        if text.startswith("sha256:"):
            if not _DIGEST.fullmatch(text):
                raise ValueError(f"{text!r}: an image id is 'sha256:' and 64 lower-case hex digits")
            return cls(repository=None, tag=None, digest=text)
        name, at, digest = text.partition("@")
        if at and not _DIGEST.fullmatch(digest):
            raise ValueError(f"{text!r}: a digest is 'sha256:' and 64 lower-case hex digits")
        tag = None
        colon = name.rfind(":")
        if colon > name.rfind("/"):
            name, tag = name[:colon], name[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise ValueError(f"{text!r}: {tag!r} is not a valid tag")
        return cls(repository=_normalise(text, name), tag=tag, digest=digest or None)

    @property
    def is_pinned(self) -> bool:
        """Whether the reference names one image by digest or id, not by a movable tag."""
        return self.digest is not None

    @property
    def canonical(self) -> str:
        """The fully qualified reference, which the engine cannot mistake for an id prefix."""
        if self.repository is None:
            return str(self.digest)
        tag = f":{self.tag}" if self.tag else "" if self.digest else ":latest"
        return self.repository + tag + (f"@{self.digest}" if self.digest else "")


def _normalise(text: str, name: str) -> str:
    """Docker's normalised repository: a registry domain first, "library/" on Docker Hub."""
    # Docker refuses such a name too: the engine would read it as an image id.
    if _HEX64.fullmatch(name):
        raise ValueError(f"{text!r}: a bare 64-hex-digit id needs its 'sha256:' prefix")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _DOMAIN.fullmatch(first):
            raise ValueError(f"{text!r}: {first!r} is not a valid registry")
        domain, path = first, rest
    else:
        domain, path = "docker.io", name
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in path:
        path = f"library/{path}"
    if not _PATH.fullmatch(path) or len(name) > 255:
        raise ValueError(f"{text!r} is not a valid image name (lower case, at most 255 chars)")
    return f"{domain}/{path}"


class GpuRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How many GPUs a job needs, and which kind; the constraints apply to each GPU."""

    count: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    vendor: Literal["nvidia", "amd", "intel"] | None = None
    min_vram_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    min_compute_capability: Annotated[str, msgspec.Meta(pattern=r"^\d+\.\d+$")] | None = None
    """NVIDIA only: e.g. "8.0"."""
    gfx_targets: (
        Annotated[
            list[Annotated[str, msgspec.Meta(pattern=r"^gfx[0-9a-f]+$")]],
            msgspec.Meta(min_length=1),
        ]
        | None
    ) = None
    """AMD only: the LLVM targets the image was built for, e.g. ["gfx90a", "gfx942"]."""


class Resources(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The job's CPU, memory, process and disk limits."""

    cpus: Annotated[float, msgspec.Meta(ge=MIN_CPUS, le=1024)] = 1.0
    # Docker refuses a memory limit under 6 MiB.
    memory_bytes: Annotated[int, msgspec.Meta(ge=6 * _MIB)] = 512 * _MIB
    pids: Annotated[int, msgspec.Meta(ge=1)] = 256
    # Zero would mean "the engine's default" to Docker and "no limit" to tmpfs: refused.
    shm_bytes: Annotated[int, msgspec.Meta(ge=1)] = 64 * _MIB
    scratch_bytes: Annotated[int, msgspec.Meta(ge=1)] = 256 * _MIB


class InputFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A file under /input before the job starts; ``path`` is relative to it.

    Either inline (``content``, written into the job's directory) or fetched by the agent
    (``url`` with its ``sha256`` and ``size_bytes``, mounted read-only from its cache).
    """

    path: str
    content: str | None = None
    encoding: Literal["utf-8", "base64"] = "utf-8"
    mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o444
    url: str | None = None
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")] | None = None
    """64 lower-case hex digits: what the fetched file must hash to."""
    size_bytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 50)] | None = None
    """The fetched file's exact size; a server that sends more is refused."""

    @property
    def inline_bytes(self) -> int:
        """The size of the inline content once written (decoded); 0 for a fetched input."""
        if self.content is None:
            return 0
        if self.encoding == "base64":
            return len(self.content) // 4 * 3 - self.content[-2:].count("=")
        return len(self.content.encode())


class WorkloadSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One workload: what to run, with which GPUs and limits, and what to collect."""

    image: str
    command: list[str] = []
    """Replaces the image's entrypoint when given."""
    args: list[str] = []
    """Replaces the image's command when given."""
    env: dict[str, str] = {}
    workdir: str = "/scratch"
    gpus: GpuRequest = msgspec.field(default_factory=GpuRequest)
    resources: Resources = msgspec.field(default_factory=Resources)
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=365 * 86400)] = 3600.0
    grace_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 10.0
    """Time between SIGTERM and SIGKILL when the job is stopped."""
    network: Literal["none", "egress"] = "none"
    inputs: list[InputFile] = []
    outputs: list[str] = []
    """Paths relative to /output, collected after the job exits."""
    output_max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 64 * _MIB
    kind: Literal["batch", "service"] = "batch"
    """A batch job runs to its end; a service serves until its lease ends."""
    service: ServiceSpec | None = None
    """What a service is (its port, checks, restarts, lease); only with kind "service"."""

    @property
    def image_ref(self) -> ImageRef:
        """The parsed ``image``."""
        return ImageRef.parse(self.image)


def load_spec(data: bytes, fmt: Literal["toml", "json"]) -> WorkloadSpec:
    """Decode and validate a spec; raises SpecError naming the field and what is wrong."""
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError("spec_too_large", "", f"a spec may be at most {MAX_SPEC_BYTES} bytes")
    try:
        raw = _decode(data, fmt)
        _refuse_host_access(raw, "")
    except RecursionError as exc:
        raise SpecError("bad_spec", "", "nested too deeply") from exc
    _parse_sizes(raw)
    try:
        spec = msgspec.convert(raw, WorkloadSpec)
    except msgspec.ValidationError as exc:
        raise _spec_error(str(exc)) from exc
    _check(spec)
    return spec


def load_spec_file(path: str | os.PathLike[str]) -> WorkloadSpec:
    """Read a spec from a ``.toml`` or ``.json`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise SpecError("bad_spec", "", f"{path}: a spec file ends in .toml or .json")
    try:
        data = read_regular(path, MAX_SPEC_BYTES)
    except OSError as exc:
        code = "spec_too_large" if exc.errno == errno.EFBIG else "bad_spec"
        raise SpecError(code, "", f"cannot read {path}: {exc.strerror}") from exc
    return load_spec(data, "toml" if suffix == ".toml" else "json")


def encode_spec(spec: WorkloadSpec) -> bytes:
    """The canonical JSON of a spec: keys sorted, defaults spelled out, sizes in bytes. A
    batch job's has no ``kind`` nor ``service``: its digest is what it was before services."""
    if spec.kind == "batch":
        raw = msgspec.to_builtins(spec)
        del raw["kind"], raw["service"]
        return msgspec.json.encode(raw, order="sorted")
    return msgspec.json.encode(spec, order="sorted")


def spec_digest(spec: WorkloadSpec) -> str:
    """``sha256:<hex>`` of the canonical JSON: equal for equal specs however written."""
    return "sha256:" + hashlib.sha256(encode_spec(spec)).hexdigest()


def _decode(data: bytes, fmt: Literal["toml", "json"]) -> dict[str, Any]:
    raw: object
    try:
        raw = tomllib.loads(data.decode()) if fmt == "toml" else msgspec.json.decode(data)
    except UnicodeDecodeError as exc:
        raise SpecError("bad_spec", "", f"not UTF-8 text: {exc.reason}") from exc
    except (tomllib.TOMLDecodeError, msgspec.DecodeError) as exc:
        raise SpecError("bad_spec", "", f"not valid {fmt.upper()}: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError("bad_spec", "", "a spec is a table (an object) of fields")
    return raw


def _refuse_host_access(value: object, path: str) -> None:
    """Refuse any key, at any depth, that asks for host access; env's keys are names, not keys."""
    if isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_host_access(item, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            field = f"{path}.{key}" if path else str(key)
            normal = str(key).lower().replace("_", "").replace("-", "")
            what = _FORBIDDEN_KEYS.get(normal, "host access" if normal.startswith("host") else "")
            if what:
                raise SpecError("forbidden_field", field, f"the sandbox never grants {what}")
            if field != "env":
                _refuse_host_access(item, field)


def _parse_sizes(raw: dict[str, Any]) -> None:
    """Turn size strings into bytes, in place: the spec's own, its resources' and GPUs'."""
    tables = {"": raw, "resources.": raw.get("resources"), "gpus.": raw.get("gpus")}
    inputs = raw.get("inputs")
    if isinstance(inputs, list):
        tables.update((f"inputs[{i}].", item) for i, item in enumerate(inputs))
    for prefix, table in tables.items():
        if not isinstance(table, dict):
            continue
        for key, value in table.items():
            if key.endswith("_bytes") and isinstance(value, str):
                try:
                    table[key] = parse_size(value)
                except ValueError as exc:
                    raise SpecError("bad_value", prefix + key, str(exc)) from exc


def _spec_error(text: str) -> SpecError:
    """Turn msgspec's ``<message> - at `$.a[0].b``` into a SpecError on field ``a[0].b``."""
    message, at, path = text.rpartition(" - at `$")
    if not at:
        message, path = text, ""
    # msgspec writes a mapping's value as "[...]": the mapping's name is the field.
    path = path.rstrip("`").lstrip(".").replace("[...]", "")
    for pattern, code, problem in (
        (_UNKNOWN, "unknown_field", "no such field"),
        (_MISSING, "missing_field", "this field is required"),
    ):
        if named := pattern.fullmatch(message):
            return SpecError(code, f"{path}.{named['name']}" if path else named["name"], problem)
    return SpecError("bad_value", path, message)


def _check(spec: WorkloadSpec) -> None:
    """What the types cannot say: references, names, paths and the parts that must agree."""
    try:
        ImageRef.parse(spec.image)
    except ValueError as exc:
        raise SpecError("bad_value", "image", str(exc)) from exc
    # The engine passes these on as C strings: a NUL would cut them, or fail the start.
    strings = [
        *((f"command[{i}]", arg) for i, arg in enumerate(spec.command)),
        *((f"args[{i}]", arg) for i, arg in enumerate(spec.args)),
        *((f"env.{name}", value) for name, value in spec.env.items()),
    ]
    if nul := next((field for field, text in strings if "\0" in text), None):
        raise SpecError("bad_value", nul, "a NUL character cannot be passed to a process")
    for name in spec.env:
        if not _ENV_NAME.fullmatch(name):
            raise SpecError("bad_value", f"env.{name}", "not a valid variable name")
        if name.upper() in _GPU_ENV or name.upper().startswith("NVIDIA_REQUIRE_"):
            raise SpecError("forbidden_field", f"env.{name}", "GPU visibility is set by the agent")
    workdir = PurePosixPath(spec.workdir)
    if not workdir.is_absolute() or ".." in workdir.parts or "\0" in spec.workdir:
        raise SpecError(
            "bad_value", "workdir", f"{spec.workdir!r} is not an absolute path without '..'"
        )
    gpus = spec.gpus
    if gpus.min_compute_capability is not None and gpus.vendor not in (None, "nvidia"):
        raise SpecError("bad_value", "gpus.min_compute_capability", "only NVIDIA GPUs have one")
    if gpus.gfx_targets is not None and gpus.vendor not in (None, "amd"):
        raise SpecError("bad_value", "gpus.gfx_targets", "only AMD GPUs have gfx targets")
    inputs = [_relative(f"inputs[{i}].path", item.path) for i, item in enumerate(spec.inputs)]
    _each_once(inputs, "inputs[{}].path")
    files = set(inputs)
    for index, (item, path) in enumerate(zip(spec.inputs, inputs, strict=True)):
        field = f"inputs[{index}]"
        if clash := next((p for p in path.parents if p in files), None):
            raise SpecError(
                "bad_value", f"{field}.path", f"{item.path!r} lies inside input {str(clash)!r}"
            )
        _check_input_form(field, item)
        if item.content is not None and item.encoding == "base64":
            try:
                base64.b64decode(item.content, validate=True)
            except binascii.Error as exc:
                raise SpecError(
                    "bad_value", f"{field}.content", f"not base64 (one line, padded): {exc}"
                ) from exc
    _each_once([_relative(f"outputs[{i}]", p) for i, p in enumerate(spec.outputs)], "outputs[{}]")
    _check_kind(spec)


def _check_kind(spec: WorkloadSpec) -> None:
    """A service has its ``[service]`` table and nothing of a batch job's ending."""
    if spec.kind == "batch":
        if spec.service is not None:
            raise SpecError("bad_value", "service", 'only a spec of kind "service" has one')
        return
    if spec.service is None:
        raise SpecError("missing_field", "service", 'a spec of kind "service" needs [service]')
    if spec.network != "none":
        # Its network is its own, internal: the agent reaches it; it reaches nothing.
        raise SpecError("bad_value", "network", "a service gets a network with no route out")
    if spec.outputs:
        raise SpecError("bad_value", "outputs", "a service has no outputs to collect")


def _check_input_form(field: str, item: InputFile) -> None:
    """Exactly one of the two forms: inline ``content``, or ``url`` with its digest and size."""
    if item.url is None:
        if item.content is None:
            raise SpecError("missing_field", f"{field}.content", "give content or url")
        for name in ("sha256", "size_bytes"):
            if getattr(item, name) is not None:
                raise SpecError("bad_value", f"{field}.{name}", "only an input with a url has one")
        return
    if item.content is not None:
        raise SpecError("bad_value", field, "give either content or url, not both")
    for name, why in (
        ("sha256", "a fetched input needs its digest: it is what makes the bytes trusted"),
        ("size_bytes", "a fetched input needs its size: more bytes than it says are refused"),
    ):
        if getattr(item, name) is None:
            raise SpecError("missing_field", f"{field}.{name}", why)
    if item.encoding != "utf-8" or item.mode != 0o444:
        # The fetched file is shared read-only from the cache: it has one form, 0444 bytes.
        raise SpecError("bad_value", field, "a fetched input has no encoding nor mode")
    if problem := url_problem(item.url):
        raise SpecError("bad_value", f"{field}.url", problem)


def _each_once(paths: list[PurePosixPath], field: str) -> None:
    seen: set[PurePosixPath] = set()
    for index, path in enumerate(paths):
        if path in seen:
            raise SpecError("bad_value", field.format(index), f"{str(path)!r} is given twice")
        seen.add(path)


def _relative(field: str, text: str) -> PurePosixPath:
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts or not path.parts or "\0" in text:
        raise SpecError("bad_value", field, f"{text!r} is not a relative path without '..'")
    # The runner makes and opens these paths under the job's directory: bounded, so that
    # neither a path past PATH_MAX nor a name past NAME_MAX nor the depth can break it.
    if len(text.encode()) > MAX_PATH_BYTES:
        raise SpecError("path_too_long", field, f"longer than {MAX_PATH_BYTES} bytes")
    if len(path.parts) > MAX_PATH_DEPTH:
        raise SpecError("path_too_deep", field, f"more than {MAX_PATH_DEPTH} components")
    if long := next((p for p in path.parts if len(p.encode()) > MAX_NAME_BYTES), None):
        size = len(long.encode())
        raise SpecError("path_too_long", field, f"a {size}-byte name, over {MAX_NAME_BYTES}")
    return path

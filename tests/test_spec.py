"""The workload spec: decoding, validation, sizes, image references and the digest."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.errors import SpecError
from sandbox.spec import (
    MAX_SPEC_BYTES,
    ImageRef,
    InputFile,
    Resources,
    WorkloadSpec,
    encode_spec,
    format_size,
    load_spec,
    load_spec_file,
    parse_size,
    spec_digest,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "workload-spec.md"
DIGEST = "sha256:" + "ab" * 32
MIB = 1 << 20
GIB = 1 << 30


def _json(raw: dict[str, Any]) -> WorkloadSpec:
    return load_spec(json.dumps(raw).encode(), "json")


def _refused(raw: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as caught:
        _json(raw)
    return caught.value


def _doc_example(language: str) -> bytes:
    (block,) = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return str(block).encode()


# ------------------------------------------------------------------ decoding


def test_a_spec_of_only_an_image_takes_every_default() -> None:
    spec = load_spec(b'image = "python:3.12-slim"', "toml")
    assert spec == WorkloadSpec(image="python:3.12-slim")
    assert spec.workdir == "/scratch"
    assert spec.network == "none"
    assert spec.timeout_s == 3600
    assert spec.grace_s == 10
    assert spec.gpus.count == 0
    assert spec.resources == Resources(
        cpus=1.0, memory_bytes=512 * MIB, pids=256, shm_bytes=64 * MIB, scratch_bytes=256 * MIB
    )
    assert spec.output_max_bytes == 64 * MIB


def test_the_documented_toml_and_json_examples_decode_equal() -> None:
    from_toml = load_spec(_doc_example("toml"), "toml")
    from_json = load_spec(_doc_example("json"), "json")
    assert from_toml == from_json
    assert from_toml.gpus.min_vram_bytes == 16 * GIB
    assert from_toml.inputs[1] == InputFile(
        path="weights/init.bin", content="AAECAw==", encoding="base64", mode=0o440
    )
    assert spec_digest(from_toml) == spec_digest(from_json)


def test_spec_files_are_read_by_their_suffix(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_bytes(_doc_example("toml"))
    (tmp_path / "job.JSON").write_bytes(_doc_example("json"))
    assert load_spec_file(tmp_path / "job.toml") == load_spec_file(str(tmp_path / "job.JSON"))


def test_a_spec_file_with_another_suffix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text('image: "python"')
    with pytest.raises(SpecError, match=r"\.toml or \.json") as caught:
        load_spec_file(path)
    assert caught.value.code == "bad_spec"


def test_a_missing_spec_file_is_a_bad_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read") as caught:
        load_spec_file(tmp_path / "absent.toml")
    assert caught.value.code == "bad_spec"


@pytest.mark.parametrize(
    ("data", "fmt", "says"),
    [
        (b'image = "python', "toml", "not valid TOML"),
        (b'{"image": "python"', "json", "not valid JSON"),
        (b'["python"]', "json", "a table"),
        (b'image = "\xff"', "toml", "not UTF-8"),
        (b'{"image": "python", "x": ' + b"[" * 10**5 + b"]" * 10**5 + b"}", "json", "too deeply"),
        (b'image = "python"\nx = ' + b"[" * 10**5 + b"]" * 10**5, "toml", "too deeply"),
    ],
)
def test_what_is_not_a_spec_document_is_a_bad_spec(data: bytes, fmt: str, says: str) -> None:
    with pytest.raises(SpecError, match=says) as caught:
        load_spec(data, "toml" if fmt == "toml" else "json")
    assert caught.value.code == "bad_spec"


def test_many_inputs_and_outputs_are_checked_in_one_pass() -> None:
    inputs = [{"path": f"d{i}/f", "content": ""} for i in range(20_000)]
    outputs = [f"out/{i}" for i in range(5_000)]
    spec = _json({"image": "python", "inputs": inputs, "outputs": outputs})
    assert (len(spec.inputs), len(spec.outputs)) == (20_000, 5_000)


def test_a_spec_over_one_mib_is_refused_unread(tmp_path: Path) -> None:
    padding = "x" * MAX_SPEC_BYTES
    data = json.dumps({"image": "python", "env": {"PAD": padding}}).encode()
    with pytest.raises(SpecError) as caught:
        load_spec(data, "json")
    assert caught.value.code == "spec_too_large"
    path = tmp_path / "big.json"
    path.write_bytes(data)
    with pytest.raises(SpecError) as from_file:
        load_spec_file(path)
    assert from_file.value.code == "spec_too_large"


# ------------------------------------------------------------------ host access


@pytest.mark.parametrize(
    ("raw", "field", "grants"),
    [
        ({"privileged": True}, "privileged", "privileged mode"),
        ({"cap_add": ["SYS_ADMIN"]}, "cap_add", "capabilities"),
        ({"CapAdd": ["NET_ADMIN"]}, "CapAdd", "capabilities"),
        ({"cap-add": ["ALL"]}, "cap-add", "capabilities"),
        ({"volumes": ["/:/host"]}, "volumes", "host mounts"),
        ({"mounts": [{"source": "/etc"}]}, "mounts", "host mounts"),
        ({"binds": ["/var/run/docker.sock:/s"]}, "binds", "host mounts"),
        ({"devices": ["/dev/mem"]}, "devices", "host devices"),
        ({"network_mode": "host"}, "network_mode", "namespace"),
        ({"pid": "host"}, "pid", "namespace"),
        ({"ipc": "host"}, "ipc", "namespace"),
        ({"userns_mode": "host"}, "userns_mode", "namespace"),
        ({"security_opt": ["seccomp=unconfined"]}, "security_opt", "security profile"),
        ({"runtime": "runc"}, "runtime", "runtime"),
        ({"user": "0"}, "user", "user"),
        ({"host_network": True}, "host_network", "host access"),
        ({"resources": {"privileged": True}}, "resources.privileged", "privileged mode"),
        ({"gpus": {"devices": ["/dev/nvidia0"]}}, "gpus.devices", "host devices"),
        (
            {"inputs": [{"path": "a", "content": "", "mounts": ["/"]}]},
            "inputs[0].mounts",
            "host mounts",
        ),
    ],
)
def test_a_key_asking_for_host_access_is_forbidden_at_any_depth(
    raw: dict[str, Any], field: str, grants: str
) -> None:
    error = _refused({"image": "python", **raw})
    assert error.code == "forbidden_field"
    assert error.field == field
    assert "never grants" in error.detail
    assert grants in error.detail


def test_host_access_is_refused_before_the_rest_is_read() -> None:
    error = _refused({"image": "NOT AN IMAGE", "typo": 1, "privileged": True})
    assert error.code == "forbidden_field"


def test_environment_variable_names_are_data_not_keys() -> None:
    spec = _json({"image": "python", "env": {"privileged": "yes", "HOST": "x"}})
    assert spec.env == {"privileged": "yes", "HOST": "x"}


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
        "NVIDIA_REQUIRE_CUDA",
        "CUDA_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ZE_AFFINITY_MASK",
        "cuda_visible_devices",
    ],
)
def test_gpu_visibility_variables_are_forbidden_in_env(name: str) -> None:
    error = _refused({"image": "python", "env": {name: "all"}})
    assert (error.code, error.field) == ("forbidden_field", f"env.{name}")


# ------------------------------------------------------------------ field errors


def test_an_unknown_field_is_named_with_its_path() -> None:
    error = _refused({"image": "python", "resources": {"memory": "1GiB"}})
    assert (error.code, error.field) == ("unknown_field", "resources.memory")
    assert str(error) == "unknown_field: resources.memory: no such field"
    assert _refused({"image": "python", "imagee": "x"}).field == "imagee"


def test_a_missing_image_is_a_missing_field() -> None:
    error = _refused({"command": ["true"]})
    assert (error.code, error.field) == ("missing_field", "image")
    nested = _refused({"image": "python", "inputs": [{"path": "a"}]})
    assert (nested.code, nested.field) == ("missing_field", "inputs[0].content")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"image": "Python"}, "image"),
        ({"image": "python@sha256:1234"}, "image"),
        ({"image": "python:bad tag"}, "image"),
        ({"image": "a" * 64}, "image"),
        ({"image": 3}, "image"),
        ({"command": "python -m x"}, "command"),
        ({"args": [1]}, "args[0]"),
        ({"env": {"A": 1}}, "env"),
        ({"env": {"1A": "x"}}, "env.1A"),
        ({"env": {"A-B": "x"}}, "env.A-B"),
        ({"workdir": "scratch"}, "workdir"),
        ({"workdir": "/scratch/../etc"}, "workdir"),
        ({"gpus": {"count": -1}}, "gpus.count"),
        ({"gpus": {"count": 65}}, "gpus.count"),
        ({"gpus": {"vendor": "matrox"}}, "gpus.vendor"),
        ({"gpus": {"min_compute_capability": "8"}}, "gpus.min_compute_capability"),
        (
            {"gpus": {"vendor": "amd", "min_compute_capability": "8.0"}},
            "gpus.min_compute_capability",
        ),
        ({"gpus": {"gfx_targets": []}}, "gpus.gfx_targets"),
        ({"gpus": {"gfx_targets": ["sm_80"]}}, "gpus.gfx_targets[0]"),
        ({"gpus": {"vendor": "nvidia", "gfx_targets": ["gfx90a"]}}, "gpus.gfx_targets"),
        ({"gpus": {"min_vram_bytes": "8 gigs"}}, "gpus.min_vram_bytes"),
        ({"resources": {"cpus": 0}}, "resources.cpus"),
        ({"resources": {"cpus": 1e9}}, "resources.cpus"),
        ({"resources": {"memory_bytes": "4MiB"}}, "resources.memory_bytes"),
        ({"resources": {"memory_bytes": "2g"}}, "resources.memory_bytes"),
        ({"resources": {"memory_bytes": 1.5e9}}, "resources.memory_bytes"),
        ({"resources": {"pids": 0}}, "resources.pids"),
        ({"resources": {"shm_bytes": 0}}, "resources.shm_bytes"),
        ({"resources": {"scratch_bytes": 0}}, "resources.scratch_bytes"),
        ({"resources": 4}, "resources"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": 1e12}, "timeout_s"),
        ({"grace_s": -1}, "grace_s"),
        ({"network": "host"}, "network"),
        ({"inputs": [{"path": "/etc/passwd", "content": ""}]}, "inputs[0].path"),
        ({"inputs": [{"path": "a/../../b", "content": ""}]}, "inputs[0].path"),
        ({"inputs": [{"path": ".", "content": ""}]}, "inputs[0].path"),
        ({"inputs": [{"path": "a", "content": "", "encoding": "hex"}]}, "inputs[0].encoding"),
        ({"inputs": [{"path": "a", "content": "", "mode": 0o4755}]}, "inputs[0].mode"),
        ({"inputs": [{"path": "a", "content": "!!", "encoding": "base64"}]}, "inputs[0].content"),
        (
            {"inputs": [{"path": "a", "content": "AAEC\nAw==", "encoding": "base64"}]},
            "inputs[0].content",
        ),
        (
            {"inputs": [{"path": "a", "content": "x"}, {"path": "./a", "content": "y"}]},
            "inputs[1].path",
        ),
        (
            {"inputs": [{"path": "d/f", "content": "x"}, {"path": "d", "content": "y"}]},
            "inputs[0].path",
        ),
        ({"outputs": ["/output/x"]}, "outputs[0]"),
        ({"outputs": ["../x"]}, "outputs[0]"),
        ({"outputs": ["x", "x"]}, "outputs[1]"),
        ({"output_max_bytes": -1}, "output_max_bytes"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(raw: dict[str, Any], field: str) -> None:
    error = _refused({"image": "python", **raw})
    assert error.code == "bad_value"
    assert error.field == field
    assert error.detail.startswith(f"{field}: ")
    assert error.problem


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("1024", 1024),
        ("512B", 512),
        ("64kB", 64_000),
        ("100MB", 100_000_000),
        ("2GB", 2 * 10**9),
        ("1TB", 10**12),
        ("64KiB", 64 << 10),
        ("512MiB", 512 * MIB),
        ("512 MiB", 512 * MIB),
        ("1.5GiB", 3 * GIB // 2),
        ("2TiB", 2 << 40),
    ],
)
def test_a_size_string_is_a_number_and_an_si_or_binary_unit(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("512m", "unknown unit"),
        ("2g", "unknown unit"),
        ("64k", "unknown unit"),
        ("1KB", "unknown unit"),
        ("1mib", "unknown unit"),
        ("0.5B", "whole number"),
        ("-1MiB", "not a size"),
        ("MiB", "not a size"),
        ("1e3", "not a size"),
        ("", "not a size"),
    ],
)
def test_an_ambiguous_or_partial_size_is_refused(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_size(text)


@given(st.integers(min_value=0, max_value=1 << 62))
def test_a_formatted_size_parses_back_to_the_same_bytes(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from([("B", 1), ("kB", 1000), ("GB", 10**9), ("KiB", 1024), ("GiB", 1 << 30)]),
)
def test_a_whole_number_of_any_unit_is_that_many_units(count: int, unit: tuple[str, int]) -> None:
    assert parse_size(f"{count}{unit[0]}") == count * unit[1]


def test_sizes_format_in_the_largest_exact_binary_unit() -> None:
    assert [format_size(n) for n in (0, 1000, 1024, 512 * MIB, 3 * GIB // 2)] == [
        "0B",
        "1000B",
        "1KiB",
        "512MiB",
        "1536MiB",
    ]


# ------------------------------------------------------------------ image references


@pytest.mark.parametrize(
    ("text", "repository", "tag", "digest"),
    [
        ("python", "docker.io/library/python", None, None),
        ("python:3.12-slim", "docker.io/library/python", "3.12-slim", None),
        ("library/python", "docker.io/library/python", None, None),
        ("docker.io/python", "docker.io/library/python", None, None),
        ("index.docker.io/library/python:3", "docker.io/library/python", "3", None),
        ("acme/tool", "docker.io/acme/tool", None, None),
        ("ghcr.io/acme/x:tag", "ghcr.io/acme/x", "tag", None),
        ("localhost:5000/team/x", "localhost:5000/team/x", None, None),
        ("localhost/x:1", "localhost/x", "1", None),
        (f"python@{DIGEST}", "docker.io/library/python", None, DIGEST),
        (f"ghcr.io/acme/x:1.0@{DIGEST}", "ghcr.io/acme/x", "1.0", DIGEST),
        (DIGEST, None, None, DIGEST),
    ],
)
def test_image_references_are_normalised_as_docker_does(
    text: str, repository: str | None, tag: str | None, digest: str | None
) -> None:
    ref = ImageRef.parse(text)
    assert (ref.repository, ref.tag, ref.digest) == (repository, tag, digest)
    assert ref.is_pinned == (digest is not None)
    again = ImageRef.parse(ref.canonical)
    assert (again.repository, again.digest) == (repository, digest)


def test_the_canonical_reference_is_fully_qualified() -> None:
    assert ImageRef.parse("python").canonical == "docker.io/library/python:latest"
    assert ImageRef.parse(f"python@{DIGEST}").canonical == f"docker.io/library/python@{DIGEST}"
    assert ImageRef.parse(f"x:1@{DIGEST}").canonical == f"docker.io/library/x:1@{DIGEST}"
    assert ImageRef.parse(DIGEST).canonical == DIGEST


@pytest.mark.parametrize(
    "text",
    [
        "",
        "UPPER/case",
        "python:",
        "python@sha512:" + "ab" * 64,
        f"python@{DIGEST.upper()}",
        "sha256:abc",
        "a" * 64,
        "-bad.example/x",
        "x/" + "a" * 300,
    ],
)
def test_malformed_image_references_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text)[:20])):
        ImageRef.parse(text)


# ------------------------------------------------------------------ digest and encoding


def test_the_digest_is_stable_across_key_order_sizes_and_format() -> None:
    ordered = {
        "image": "python",
        "resources": {"memory_bytes": "1GiB", "cpus": 2},
        "env": {"A": "1", "B": "2"},
    }
    shuffled = {
        "env": {"B": "2", "A": "1"},
        "resources": {"cpus": 2.0, "memory_bytes": GIB},
        "image": "python",
    }
    toml = (
        b'image = "python"\n[env]\nB = "2"\nA = "1"\n'
        b"[resources]\nmemory_bytes = 1073741824\ncpus = 2\n"
    )
    digests = {spec_digest(_json(ordered)), spec_digest(_json(shuffled))}
    digests.add(spec_digest(load_spec(toml, "toml")))
    assert len(digests) == 1
    (digest,) = digests
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)


def test_spelling_out_a_default_does_not_change_the_digest() -> None:
    assert spec_digest(_json({"image": "python", "network": "none"})) == spec_digest(
        _json({"image": "python"})
    )


def test_any_change_changes_the_digest() -> None:
    base: dict[str, Any] = {"image": "python", "args": ["a"]}
    variants = [
        base,
        {**base, "args": ["b"]},
        {**base, "image": "python:3"},
        {**base, "resources": {"pids": 257}},
        {**base, "env": {"X": ""}},
    ]
    assert len({spec_digest(_json(raw)) for raw in variants}) == len(variants)


def test_the_encoded_spec_is_sorted_json_that_decodes_back_equal() -> None:
    spec = load_spec(_doc_example("toml"), "toml")
    encoded = encode_spec(spec)
    assert list(json.loads(encoded)) == sorted(json.loads(encoded))
    assert load_spec(encoded, "json") == spec


def test_a_spec_is_a_struct_that_refuses_unknown_fields_when_decoded_directly() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(b'{"image": "python", "privileged": true}', type=WorkloadSpec)


# ------------------------------------------------------------------ inputs


@given(st.binary(max_size=200))
def test_a_base64_input_counts_its_decoded_size(content: bytes) -> None:
    item = InputFile(path="f", content=base64.b64encode(content).decode(), encoding="base64")
    assert item.inline_bytes == len(content)


def test_a_text_input_counts_its_utf8_size() -> None:
    assert InputFile(path="f", content="héllo").inline_bytes == 6


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("kind", "code"), [("fifo", "bad_spec"), ("huge", "spec_too_large")])
def test_a_spec_file_is_read_only_if_regular_and_small(
    tmp_path: Path, kind: str, code: str
) -> None:
    path = tmp_path / "job.toml"
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer for ever
    else:
        with path.open("wb") as file:
            file.truncate(1 << 40)  # sparse: a terabyte that costs no disk
    with pytest.raises(SpecError) as refused:
        load_spec_file(path)
    assert refused.value.code == code

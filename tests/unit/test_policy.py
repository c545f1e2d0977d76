"""The admission policy: image patterns, every limit, and refusals that list every rule broken."""

from __future__ import annotations

import base64
import tomllib
from typing import Any

import msgspec
import pytest

from sandbox.errors import PolicyViolation, SandboxError, Violation
from sandbox.policy import Policy, admit, check, image_allowed
from sandbox.spec import ImageRef, InputFile, Resources, WorkloadSpec, load_spec

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32
GIB = 1 << 30
MIB = 1 << 20

OPEN = Policy(allowed_images=["python"])
NVIDIA = frozenset({"nvidia"})


def _spec(**fields: Any) -> WorkloadSpec:
    return msgspec.convert({"image": "python:3.12", **fields}, WorkloadSpec)


def _codes(spec: WorkloadSpec, policy: Policy = OPEN, **kwargs: Any) -> list[str]:
    return [violation.code for violation in check(spec, policy, **kwargs)]


# ------------------------------------------------------------------ images


@pytest.mark.parametrize(
    ("pattern", "image", "allowed"),
    [
        ("python", "python", True),
        ("python", "python:3.12-slim", True),
        ("python", f"python@{DIGEST}", True),
        ("python", "docker.io/library/python:3", True),
        ("docker.io/library/python", "python:3", True),
        ("library/python", "index.docker.io/library/python", True),
        ("python", "acme/python", False),
        ("python", "ghcr.io/library/python", False),
        ("python", "pythonista", False),
        ("ghcr.io/acme/x", "ghcr.io/acme/x:tag", True),
        ("ghcr.io/acme/x", f"ghcr.io/acme/x:1@{DIGEST}", True),
        ("ghcr.io/acme/x", "ghcr.io/acme/xy", False),
        ("ghcr.io/acme/*", "ghcr.io/acme/trainer:1", True),
        ("ghcr.io/acme/*", "ghcr.io/acme/team/tool", True),
        ("ghcr.io/acme/*", "ghcr.io/acmeco/tool", False),
        ("ghcr.io/acme/*", "docker.io/acme/tool", False),
        ("ghcr.io/acme/*", DIGEST, False),
        ("*", DIGEST, True),  # run-local's default allows a local image by its id
        ("*", "python:3", True),
        ("docker.io/library/*", "python", True),
        ("docker.io/library/*", "acme/python", False),
        ("localhost:5000/*", "localhost:5000/x:1", True),
        (DIGEST, DIGEST, True),
        (DIGEST, OTHER_DIGEST, False),
        (DIGEST, f"python@{DIGEST}", False),
    ],
)
def test_images_match_patterns_after_docker_normalisation(
    pattern: str, image: str, allowed: bool
) -> None:
    assert image_allowed(ImageRef.parse(image), [pattern]) is allowed


def test_an_image_is_allowed_when_any_pattern_matches() -> None:
    patterns = ["ghcr.io/acme/*", "python", DIGEST]
    for image in ("ghcr.io/acme/a", "python:3", DIGEST):
        assert image_allowed(ImageRef.parse(image), patterns)
    assert not image_allowed(ImageRef.parse("node"), patterns)


def test_the_default_policy_allows_no_image() -> None:
    assert _codes(_spec(), Policy()) == ["image_not_allowed"]


@pytest.mark.parametrize("pattern", ["python:3.12", f"python@{DIGEST}", "Not A Name", "sha256:"])
def test_a_policy_pattern_that_could_never_match_is_refused_when_built(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"pattern|not a valid|image id"):
        Policy(allowed_images=[pattern])
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"allowed_images": [pattern]}, Policy)


# ------------------------------------------------------------------ limits


@pytest.mark.parametrize(
    ("fields", "policy", "code"),
    [
        ({"gpus": {"count": 3}}, Policy(allowed_images=["python"], max_gpus=2), "too_many_gpus"),
        ({"resources": {"cpus": 4.5}}, OPEN, "cpus_over_limit"),
        ({"resources": {"memory_bytes": 8 * GIB + 1}}, OPEN, "memory_over_limit"),
        ({"resources": {"pids": 1025}}, OPEN, "pids_over_limit"),
        ({"resources": {"shm_bytes": 2 * GIB}}, OPEN, "shm_over_limit"),
        ({"resources": {"scratch_bytes": 11 * GIB}}, OPEN, "scratch_over_limit"),
        ({"timeout_s": 86400.5}, OPEN, "timeout_over_limit"),
        ({"grace_s": 61}, OPEN, "grace_over_limit"),
        ({"network": "egress"}, OPEN, "egress_not_allowed"),
        (
            {"inputs": [{"path": "a", "content": "x" * 600_000}]},
            OPEN,
            "inputs_over_limit",
        ),
        ({"output_max_bytes": 2 * GIB}, OPEN, "outputs_over_limit"),
    ],
)
def test_each_limit_is_its_own_violation(fields: dict[str, Any], policy: Policy, code: str) -> None:
    assert _codes(_spec(**fields), policy, offered_vendors=NVIDIA) == [code]


def test_a_spec_at_every_limit_is_admitted() -> None:
    policy = Policy(
        allowed_images=["python"],
        max_cpus=2,
        max_memory_bytes=GIB,
        max_pids=100,
        max_shm_bytes=MIB,
        max_scratch_bytes=GIB,
        max_timeout_s=60,
        max_grace_s=5,
        max_gpus=1,
        max_input_bytes=3,
        max_output_bytes=MIB,
        allow_egress=True,
    )
    spec = _spec(
        gpus={"count": 1},
        resources={
            "cpus": 2,
            "memory_bytes": GIB,
            "pids": 100,
            "shm_bytes": MIB,
            "scratch_bytes": GIB,
        },
        timeout_s=60,
        grace_s=5,
        network="egress",
        inputs=[{"path": "a", "content": "AAEC", "encoding": "base64"}],
        output_max_bytes=MIB,
    )
    assert check(spec, policy, offered_vendors=NVIDIA) == []
    admit(spec, policy, offered_vendors=NVIDIA)


def test_inputs_count_their_decoded_size() -> None:
    content = base64.b64encode(b"\0" * 1000).decode()  # 1336 characters for 1000 bytes
    spec = _spec(inputs=[{"path": "blob", "content": content, "encoding": "base64"}])
    assert spec.inputs == [InputFile(path="blob", content=content, encoding="base64")]
    assert _codes(spec, Policy(allowed_images=["python"], max_input_bytes=1000)) == []
    assert _codes(spec, Policy(allowed_images=["python"], max_input_bytes=999)) == [
        "inputs_over_limit"
    ]


def test_a_violation_message_shows_what_was_asked_and_the_limit() -> None:
    spec = _spec(resources={"memory_bytes": 2 * GIB}, timeout_s=90)
    policy = Policy(allowed_images=["python"], max_memory_bytes=GIB, max_timeout_s=60)
    assert check(spec, policy) == [
        Violation("timeout_over_limit", "timeout_s 90s is over the limit of 60s"),
        Violation("memory_over_limit", "resources.memory_bytes 2GiB is over the limit of 1GiB"),
    ]


# ------------------------------------------------------------------ GPUs


def test_a_gpu_job_under_runsc_is_refused_for_want_of_gpu_support() -> None:
    runsc = Policy(allowed_images=["python"], runtime="runsc")
    assert _codes(_spec(gpus={"count": 1}), runsc, offered_vendors=NVIDIA) == ["runtime_has_no_gpu"]
    assert _codes(_spec(), runsc) == []


def test_a_gpu_job_on_a_node_offering_no_gpus_is_refused() -> None:
    assert _codes(_spec(gpus={"count": 1})) == ["gpu_vendor_not_offered"]


def test_a_gpu_job_for_a_vendor_not_offered_is_refused() -> None:
    spec = _spec(gpus={"count": 1, "vendor": "amd"})
    violations = check(spec, OPEN, offered_vendors=frozenset({"nvidia", "intel"}))
    assert violations == [
        Violation("gpu_vendor_not_offered", "amd GPUs are not offered here, only intel, nvidia")
    ]
    assert _codes(spec, offered_vendors=frozenset({"amd"})) == []


def test_a_gpu_job_of_any_vendor_takes_what_is_offered() -> None:
    assert _codes(_spec(gpus={"count": 2}), offered_vendors=frozenset({"intel"})) == []


def test_asking_for_no_gpus_needs_none_offered() -> None:
    assert _codes(_spec(gpus={"count": 0, "vendor": "amd"})) == []


# ------------------------------------------------------------------ refusals


def test_a_refusal_lists_every_rule_broken() -> None:
    spec = _spec(
        image="ghcr.io/evil/miner",
        gpus={"count": 9, "vendor": "amd"},
        resources={
            "cpus": 64,
            "memory_bytes": 64 * GIB,
            "pids": 100_000,
            "shm_bytes": 8 * GIB,
            "scratch_bytes": 100 * GIB,
        },
        timeout_s=10**6,
        grace_s=600,
        network="egress",
        inputs=[{"path": "a", "content": "x" * (600 << 10)}],
        output_max_bytes=10 * GIB,
    )
    policy = Policy(allowed_images=["python"], runtime="runsc")
    with pytest.raises(PolicyViolation) as caught:
        admit(spec, policy, offered_vendors=NVIDIA)
    refusal = caught.value
    codes = [violation.code for violation in refusal.violations]
    assert codes == [
        "image_not_allowed",
        "too_many_gpus",
        "runtime_has_no_gpu",
        "gpu_vendor_not_offered",
        "cpus_over_limit",
        "pids_over_limit",
        "timeout_over_limit",
        "grace_over_limit",
        "egress_not_allowed",
        "memory_over_limit",
        "shm_over_limit",
        "scratch_over_limit",
        "inputs_over_limit",
        "outputs_over_limit",
    ]
    assert refusal.code == "policy_violation"
    assert isinstance(refusal, SandboxError)
    for code in codes:
        assert code in str(refusal)
        assert code in refusal.detail


def test_violations_travel_as_json() -> None:
    violations = check(_spec(network="egress"), Policy())
    encoded = msgspec.json.encode(violations)
    assert msgspec.json.decode(encoded, type=list[Violation]) == violations
    assert msgspec.json.decode(encoded)[0] == {
        "code": "image_not_allowed",
        "message": "image python:3.12 is not allowed here",
    }


# ------------------------------------------------------------------ the policy itself


def test_a_policy_decodes_from_a_toml_table() -> None:
    table = tomllib.loads(
        """
        allowed_images = ["python", "ghcr.io/acme/*"]
        max_cpus = 8
        max_memory_bytes = 34359738368
        max_gpus = 2
        allow_egress = true
        runtime = "runsc"
        """
    )
    policy = msgspec.convert(table, Policy)
    assert policy.max_cpus == 8.0
    assert policy.max_pids == Policy().max_pids
    assert policy.runtime == "runsc"
    assert policy.allow_egress


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ({"max_memory": 1}, "unknown field `max_memory`"),
        ({"runtime": "kata"}, "Invalid enum value 'kata'"),
        ({"max_gpus": -1}, ">= 0"),
        ({"max_cpus": 0}, "> 0"),
    ],
)
def test_a_bad_policy_table_is_refused(table: dict[str, Any], says: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=says):
        msgspec.convert(table, Policy)


def test_the_documented_defaults_hold() -> None:
    assert Policy() == Policy(
        allowed_images=[],
        max_cpus=4.0,
        max_memory_bytes=8 * GIB,
        max_pids=1024,
        max_shm_bytes=GIB,
        max_scratch_bytes=10 * GIB,
        max_timeout_s=86400,
        max_grace_s=60,
        max_gpus=8,
        max_input_bytes=512 << 10,
        max_output_bytes=GIB,
        allow_egress=False,
        runtime="runc",
    )


def test_the_default_spec_passes_the_default_limits() -> None:
    spec = load_spec(b'image = "python"', "toml")
    assert spec.resources == Resources()
    assert _codes(spec) == []

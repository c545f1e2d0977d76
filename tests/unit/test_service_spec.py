"""The spec of a service: its table, what it may not have, and batch digests unchanged."""

from __future__ import annotations

from typing import Any

import pytest
from support.runner import make_spec

from sandbox.errors import SpecError
from sandbox.spec import load_spec, spec_digest

SERVICE: dict[str, Any] = {"port": 8080, "models": ["tiny"], "lease_s": 60}


def test_a_service_spec_reads_back_with_its_defaults() -> None:
    spec = make_spec("busybox@sha256:" + "a" * 64, "true", kind="service", service=SERVICE)
    assert spec.service is not None
    assert (spec.service.port, spec.service.models, spec.service.lease_s) == (8080, ["tiny"], 60)
    assert spec.service.readiness.path == "/health"
    assert spec.service.restart.limit == 5


def test_a_batch_specs_digest_is_what_it_was_before_services() -> None:
    # Computed before kind and service existed: receipts already signed name it.
    raw = b'{"image":"python","inputs":[{"path":"a","content":"x"}],'
    raw += b'"gpus":{"count":1,"gfx_targets":["gfx90a"]}}'
    assert spec_digest(load_spec(raw, "json")) == (
        "sha256:f054b1d5a7033233552312a19d32ffa55bd758e52c44e85466a7376d90940abc"
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"kind": "service"}, "service"),
        ({"service": SERVICE}, "service"),
        ({"kind": "service", "service": SERVICE, "network": "egress"}, "network"),
        ({"kind": "service", "service": SERVICE, "outputs": ["x"]}, "outputs"),
        ({"kind": "service", "service": {**SERVICE, "port": 0}}, "service.port"),
        ({"kind": "service", "service": {**SERVICE, "models": []}}, "service.models"),
        # Past what a node's tunnel holds open at once (agent.protocol.tunnel.MAX_STREAMS).
        ({"kind": "service", "service": {**SERVICE, "max_streams": 257}}, "service.max_streams"),
        (
            {"kind": "service", "service": {**SERVICE, "readiness": {"path": "/a b"}}},
            "service.readiness.path",
        ),
    ],
)
def test_a_service_spec_that_does_not_hold_is_refused_naming_its_field(
    overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(SpecError) as refused:
        make_spec("busybox@sha256:" + "a" * 64, "true", **overrides)
    assert refused.value.field == field

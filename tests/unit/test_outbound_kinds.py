"""Every kind of message the coordinator sends a node is rebuilt from the store after a
restart: a renewal or a prefetch not yet acknowledged goes out again, in its place."""

from __future__ import annotations

from pathlib import Path

import msgspec

from agent.protocol.messages import (
    ImagePrefetchBody,
    JobCancelBody,
    ServiceRenewBody,
    message_type,
)
from coordinator.store import Store


def test_unacknowledged_renewals_and_prefetches_are_rebuilt_in_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    try:
        store.nodes.seen("node-a", "k", 1.0)
        bodies = [
            JobCancelBody(job_id="job-1"),
            ServiceRenewBody(job_id="job-1", lease_until=2000.0),
            ImagePrefetchBody(image="r.example/m@sha256:" + "5f" * 32),
        ]
        for seq, body in enumerate(bodies, 1):
            kind = {JobCancelBody: "job_cancel", ServiceRenewBody: "service_renew"}.get(
                type(body), "image_prefetch"
            )
            assert store.streams.add_outbound("node-a", kind, msgspec.to_builtins(body)) == seq
        pending = store.streams.sender("node-a").pending()
    finally:
        store.close()
    assert [message_type(m) for m in pending] == ["job_cancel", "service_renew", "image_prefetch"]
    assert [m.body for m in pending] == bodies

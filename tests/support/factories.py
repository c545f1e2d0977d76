"""Hand-built HAL objects for tests that exercise pure logic."""

from __future__ import annotations

import zlib
from typing import Any

from coordinator.gateway.tables import RequestRecord
from hal.types import (
    UNSUPPORTED,
    BackendReport,
    CpuInfo,
    GpuProfile,
    HostProfile,
    Profile,
    RuntimeInfo,
    Unavailable,
)


def gpu(**overrides: Any) -> GpuProfile:
    """A plausible discrete NVIDIA GPU, with any field overridden."""
    fields: dict[str, Any] = {
        "id": "GPU-0",
        "vendor": "nvidia",
        "backend": "nvml",
        "name": "NVIDIA RTX A5000",
        "kind": "discrete",
        "uuid": "GPU-0",
        "pci_bus_id": "0000:01:00.0",
        "driver_version": "590.44.01",
    }
    fields.update(overrides)
    return GpuProfile(**fields)


def runtime(**overrides: Any) -> RuntimeInfo:
    """A host with Docker reachable and the NVIDIA runtime registered."""
    fields: dict[str, Any] = {
        "docker_reachable": True,
        "docker_version": "28.2.2",
        "docker_runtimes": ["nvidia", "runc"],
        "docker_cdi": False,
        "nvidia_container_toolkit": "/usr/bin/nvidia-ctk",
        "cdi_specs": [],
    }
    fields.update(overrides)
    return RuntimeInfo(**fields)


def profile(
    gpus: list[GpuProfile],
    backends: list[BackendReport] | None = None,
    runtime_info: RuntimeInfo | None = None,
) -> Profile:
    """A whole-machine profile around the given GPUs."""
    host = HostProfile(
        hostname="test",
        os="Debian GNU/Linux 12",
        kernel="6.1.0",
        cpu=CpuInfo(
            model="cpu", architecture="x86_64", cores=2, threads=4, freq_max_hz=UNSUPPORTED
        ),
        memory_total_bytes=1 << 34,
        swap_total_bytes=0,
        disks=[],
        interfaces=[],
        runtime=runtime_info or runtime(),
    )
    reports = backends or [BackendReport(name="nvml", status="ok", devices=len(gpus))]
    return Profile(agent_version="0", taken_at=0.0, host=host, gpus=gpus, backends=reports)


DENIED = Unavailable("permission_denied", "/dev/dri/renderD128")


def request_record(n: int, *, node_id: str = "node-1", ttfb_s: float = 0.1) -> RequestRecord:
    """The gateway's record of request ``n`` (a stream when ``n`` is even)."""
    return RequestRecord(
        at=float(n),
        key_id="key-1",
        method="POST",
        path="/v1/completions",
        model="tiny",
        node_id=node_id,
        job_id="svc-1",
        status=200,
        code="",
        stream=n % 2 == 0,
        attempts=1,
        tokens_in=n,
        tokens_out=None,
        latency_s=0.5,
        ttfb_s=ttfb_s,
        ttft_s=None,
    )


def deflated_frame(frame: bytes, window_bits: int = 12) -> bytes:
    """``frame`` compressed as an agent's permessage-deflate sends it (RFC 7692, no context
    takeover): a raw DEFLATE stream, sync-flushed, without its last 4 bytes."""
    compressor = zlib.compressobj(wbits=-window_bits)
    data = compressor.compress(frame) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]

"""NVIDIA health events (Xid critical errors) through the real pynvml binding and the fake
libnvidia-ml.so.1, whose control file injects the events (see tests/fakenvml/build.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pynvml
import pytest
from conftest import SYSFS, TXT, XML, nvml_config, write_control
from factories import gpu
from fakenvml import build

from hal.backend import Backend
from hal.backends.nvidia import NvidiaBackend, normalise_bus_id
from hal.backends.nvml import init as nvml_init
from hal.backends.nvml_events import MAX_EVENTS_PER_DRAIN
from hal.machine import BACKENDS, BackendSpec, Hal
from hal.types import GpuProfile, GpuSample, HealthEvent

DUAL_A5000 = XML / "dual_a5000-v13.xml"
H100_MIG = TXT / "linux-x86_64__nvidia-h100-mig__590.48.01.txt"
H200_MIG = TXT / "linux-x86_64__nvidia-h200-mig__590.48.01.txt"
A5000_UUIDS = [gpu.uuid for gpu in build.parse_capture(DUAL_A5000).gpus]

XID = pynvml.nvmlEventTypeXidCriticalError
NO_INSTANCE = 0xFFFFFFFF


@pytest.fixture
def open_backend(
    nvidia_for: Callable[[Path], tuple[NvidiaBackend, list[GpuProfile]]],
) -> Callable[[Path], NvidiaBackend]:
    """Opens the NVIDIA backend on a capture's fake library; closes it afterwards."""
    return lambda capture: nvidia_for(capture)[0]


def _codes(events: list[HealthEvent]) -> list[tuple[str, int]]:
    return [(e.gpu_id, e.code) for e in events]


# --------------------------------------------------------------- the NVIDIA backend


def test_no_events_is_an_empty_list(open_backend: Callable[[Path], NvidiaBackend]) -> None:
    assert open_backend(DUAL_A5000).events() == []


def test_injected_xid_is_one_event_for_that_gpu(
    open_backend: Callable[[Path], NvidiaBackend], control: Path
) -> None:
    nvidia = open_backend(DUAL_A5000)
    before = time.time()
    write_control(control, "xid 1 79\n")
    (event,) = nvidia.events()
    after = time.time()
    assert (event.gpu_id, event.kind, event.code, event.detail) == (A5000_UUIDS[1], "xid", 79, "")
    assert before <= event.at <= after
    assert nvidia.events() == []  # each event is reported once


def test_several_events_are_drained_in_one_call_in_order(
    open_backend: Callable[[Path], NvidiaBackend], control: Path
) -> None:
    nvidia = open_backend(DUAL_A5000)
    write_control(control, "xid 0 48\nxid 1 79\nxid 0 94\n")
    assert _codes(nvidia.events()) == [
        (A5000_UUIDS[0], 48),
        (A5000_UUIDS[1], 79),
        (A5000_UUIDS[0], 94),
    ]


def test_draining_never_blocks_and_takes_one_wait_per_event_and_one_more(
    open_backend: Callable[[Path], NvidiaBackend], control: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvidia = open_backend(DUAL_A5000)
    timeouts: list[int] = []
    wait = pynvml.nvmlEventSetWait_v2

    def recorded_wait(event_set: Any, timeout_ms: int) -> Any:
        timeouts.append(timeout_ms)
        return wait(event_set, timeout_ms)

    monkeypatch.setattr(pynvml, "nvmlEventSetWait_v2", recorded_wait)
    write_control(control, "xid 0 48\nxid 1 79\n")
    assert len(nvidia.events()) == 2
    assert timeouts == [0, 0, 0]


def test_an_xid_storm_is_drained_over_several_ticks(
    open_backend: Callable[[Path], NvidiaBackend], control: Path
) -> None:
    nvidia = open_backend(DUAL_A5000)
    count = MAX_EVENTS_PER_DRAIN + 5
    write_control(control, "".join(f"xid 0 {13 + i % 2}\n" for i in range(count)))
    first = nvidia.events()
    second = nvidia.events()
    assert (len(first), len(second)) == (MAX_EVENTS_PER_DRAIN, 5)
    assert [e.code for e in first + second] == [13 + i % 2 for i in range(count)]


def test_gpu_without_event_support_is_skipped(
    open_backend: Callable[[Path], NvidiaBackend], control: Path
) -> None:
    write_control(control, "noevents 0\n")
    nvidia = open_backend(DUAL_A5000)
    write_control(control, "noevents 0\nxid 0 79\nxid 1 48\n")
    assert _codes(nvidia.events()) == [(A5000_UUIDS[1], 48)]
    assert [s.state for s in nvidia.sample(now=0.0)] == ["ok", "ok"]


def test_driver_without_event_sets_samples_and_reports_no_events(
    tmp_path: Path, control: Path
) -> None:
    capture = build.parse_capture(DUAL_A5000)
    library = build.build_library(capture, tmp_path / "lib", omit=["nvmlEventSetCreate"])
    nvidia = NvidiaBackend(nvml_config(library, tmp_path))
    nvidia.open()
    try:
        write_control(control, "xid 0 79\n")
        assert nvidia.events() == []
        assert [s.state for s in nvidia.sample(now=0.0)] == ["ok", "ok"]
    finally:
        nvidia.close()


def test_events_after_close_are_none_and_touch_no_nvml(
    library_for: Callable[[Path], Path],
    tmp_path: Path,
    control: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvidia = NvidiaBackend(nvml_config(library_for(DUAL_A5000), tmp_path))
    nvidia.open()
    write_control(control, "xid 0 79\n")
    nvidia.sample(now=0.0)  # the fake posts the event to the set: it is queued, not read
    nvidia.close()
    with caplog.at_level(logging.WARNING):
        assert nvidia.events() == []
    assert caplog.records == []  # no wait on a freed set after nvmlShutdown


def test_lost_gpu_ends_the_drain_without_losing_earlier_events(
    open_backend: Callable[[Path], NvidiaBackend],
    control: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvidia = open_backend(DUAL_A5000)
    write_control(control, "xid 1 79\nlost 1\n")
    with caplog.at_level(logging.WARNING):
        assert _codes(nvidia.events()) == [(A5000_UUIDS[1], 79)]
        assert nvidia.events() == []
    assert caplog.records == []  # a lost GPU is sample()'s to report, not a failure here
    assert [s.state for s in nvidia.sample(now=0.0)] == ["ok", "lost"]
    write_control(control, "lost 1\nxid 0 48\n")  # the other GPU's events still come
    assert _codes(nvidia.events()) == [(A5000_UUIDS[0], 48)]


def test_gpu_unreadable_at_open_is_watched_once_found_back(
    library_for: Callable[[Path], Path], tmp_path: Path, control: Path
) -> None:
    write_control(control, "lost 0\n")
    nvidia = NvidiaBackend(nvml_config(library_for(DUAL_A5000), tmp_path))
    nvidia.open()
    try:
        write_control(control, "")
        recovered, _ = nvidia.sample(now=1.0)
        assert recovered.state == "ok"
        write_control(control, "xid 0 79\n")
        assert _codes(nvidia.events()) == [(recovered.id, 79)]
    finally:
        nvidia.close()


def _mig_ids(capture: Path) -> dict[tuple[int, int], str]:
    """(GPU instance, compute instance) -> MIG uuid, on the capture's first GPU."""
    migs = build.parse_capture(capture).gpus[0].mig_devices
    return {(m.gpu_instance_id, m.compute_instance_id): m.uuid for m in migs}


def test_xid_in_a_mig_instance_is_reported_for_that_instance(
    open_backend: Callable[[Path], NvidiaBackend], control: Path
) -> None:
    nvidia = open_backend(H100_MIG)
    parent = build.parse_capture(H100_MIG).gpus[0].uuid
    migs = _mig_ids(H100_MIG)
    write_control(control, "xid 0 94 9 0\nxid 0 79\nxid 0 43 5 0\n")
    events = nvidia.events()
    assert _codes(events) == [(migs[(9, 0)], 94), (parent, 79), (parent, 43)]
    # An instance this agent does not know: the parent, and the ids for a human.
    assert events[2].detail == "MIG gpu instance 5, compute instance 0"


def test_xid_in_a_gpu_instance_concerns_each_of_its_compute_instances(
    open_backend: Callable[[Path], NvidiaBackend], control: Path
) -> None:
    nvidia = open_backend(H200_MIG)
    migs = _mig_ids(H200_MIG)
    write_control(control, f"xid 0 94 2 {NO_INSTANCE}\n")
    assert _codes(nvidia.events()) == [(migs[(2, 0)], 94), (migs[(2, 1)], 94)]


# ------------------------------------------------------------------------- Hal.events()


class _BrokenEvents(Backend):
    """A backend whose event reading has a bug."""

    name: ClassVar[str] = "broken"

    def open(self) -> list[GpuProfile]:
        return []

    def sample(self, now: float) -> list[GpuSample]:
        return []

    def events(self) -> list[HealthEvent]:
        raise RuntimeError("a bug")


class _Shadow(Backend):
    """A second view of the dual-A5000's GPU 1 (as sysfs would see it), with one event."""

    name: ClassVar[str] = "shadow"
    bus_id = normalise_bus_id(build.parse_capture(DUAL_A5000).gpus[1].pci_bus_id)

    def open(self) -> list[GpuProfile]:
        return [gpu(id=f"pci:{self.bus_id}", backend=self.name, pci_bus_id=self.bus_id)]

    def sample(self, now: float) -> list[GpuSample]:
        return []

    def events(self) -> list[HealthEvent]:
        return [HealthEvent(gpu_id=f"pci:{self.bus_id}", kind="xid", code=48, at=0.0)]


def test_hal_reports_events_of_a_merged_gpu_under_the_kept_id(
    library_for: Callable[[Path], Path],
    tmp_path: Path,
    control: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(BACKENDS, "shadow", BackendSpec(f"{__name__}:_Shadow"))
    hal = Hal(nvml_config(library_for(DUAL_A5000), tmp_path, backends=("nvml", "shadow")))
    try:
        assert len(hal.open().gpus) == 2
        write_control(control, "xid 1 79\n")
        assert _codes(hal.events()) == [(A5000_UUIDS[1], 79), (A5000_UUIDS[1], 48)]
    finally:
        hal.close()


def test_hal_gathers_every_backends_events(
    library_for: Callable[[Path], Path], tmp_path: Path, control: Path
) -> None:
    backends = ("nvml", "amdgpu", "intel")
    hal = Hal(nvml_config(library_for(DUAL_A5000), tmp_path, sysfs_root=SYSFS, backends=backends))
    try:
        discovery = hal.open()
        assert {g.vendor for g in discovery.gpus} == {"nvidia", "amd", "intel"}
        assert hal.events() == []
        write_control(control, "xid 1 79\n")
        assert _codes(hal.events()) == [(A5000_UUIDS[1], 79)]
    finally:
        hal.close()


def test_hal_logs_a_failing_backend_and_keeps_the_others_events(
    library_for: Callable[[Path], Path],
    tmp_path: Path,
    control: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setitem(BACKENDS, "broken", BackendSpec(f"{__name__}:_BrokenEvents"))
    hal = Hal(nvml_config(library_for(DUAL_A5000), tmp_path, backends=("broken", "nvml")))
    try:
        hal.open()
        write_control(control, "xid 0 48\n")
        with caplog.at_level(logging.ERROR, logger="hal.machine"):
            assert _codes(hal.events()) == [(A5000_UUIDS[0], 48)]
    finally:
        hal.close()
    (record,) = caplog.records
    assert "broken" in record.getMessage()
    assert record.exc_info is not None


# -------------------------------------------------------- the fake's event API itself


@pytest.fixture
def nvml(library_for: Callable[[Path], Path], control: Path) -> Iterator[list[Any]]:
    """NVML on the dual-A5000 fake, initialised in this process; its GPU handles."""
    nvml_init(str(library_for(DUAL_A5000)))
    yield [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    pynvml.nvmlShutdown()


def _wait(event_set: Any, timeout_ms: int = 0) -> tuple[int, int, int, int] | str:
    try:
        data = pynvml.nvmlEventSetWait_v2(event_set, timeout_ms)
    except pynvml.NVMLError as error:
        return type(error).__name__
    return (data.eventType, data.eventData, data.gpuInstanceId, data.computeInstanceId)


def test_fake_supports_xid_pstate_and_clock_events(nvml: list[Any]) -> None:
    supported = pynvml.nvmlDeviceGetSupportedEventTypes(nvml[0])
    wanted = XID | pynvml.nvmlEventTypePState | pynvml.nvmlEventTypeClock
    assert supported & wanted == wanted


def test_fake_delivers_only_events_posted_after_registration(
    nvml: list[Any], control: Path
) -> None:
    event_set = pynvml.nvmlEventSetCreate()
    try:
        pynvml.nvmlDeviceRegisterEvents(nvml[0], XID, event_set)
        write_control(control, "xid 0 79\nxid 1 48\n")  # GPU 1 is not registered
        assert _wait(event_set) == (XID, 79, NO_INSTANCE, NO_INSTANCE)
        assert _wait(event_set) == "NVMLError_Timeout"
        pynvml.nvmlDeviceRegisterEvents(nvml[1], XID, event_set)
        assert _wait(event_set) == "NVMLError_Timeout"  # 48 came before GPU 1 registered
        write_control(control, "xid 1 48 3 1\n")
        assert _wait(event_set, timeout_ms=1) == (XID, 48, 3, 1)
        assert _wait(event_set, timeout_ms=1) == "NVMLError_Timeout"
    finally:
        pynvml.nvmlEventSetFree(event_set)


def test_fake_devices_without_events_refuse_them(nvml: list[Any], control: Path) -> None:
    write_control(control, "noevents 1\n")
    event_set = pynvml.nvmlEventSetCreate()
    try:
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetSupportedEventTypes(nvml[1])
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceRegisterEvents(nvml[1], XID, event_set)
    finally:
        pynvml.nvmlEventSetFree(event_set)


def test_fake_wait_reports_a_lost_gpu_once_the_queue_is_empty(
    nvml: list[Any], control: Path
) -> None:
    event_set = pynvml.nvmlEventSetCreate()
    try:
        pynvml.nvmlDeviceRegisterEvents(nvml[0], XID, event_set)
        write_control(control, "xid 0 79\nlost 0\n")
        assert _wait(event_set) == (XID, 79, NO_INSTANCE, NO_INSTANCE)
        assert _wait(event_set) == "NVMLError_GpuIsLost"
    finally:
        pynvml.nvmlEventSetFree(event_set)


def test_fake_event_set_is_freed_once(nvml: list[Any]) -> None:
    event_set = pynvml.nvmlEventSetCreate()
    pynvml.nvmlEventSetFree(event_set)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlEventSetFree(event_set)
    assert _wait(event_set) == "NVMLError_InvalidArgument"

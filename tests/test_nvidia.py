"""The NVIDIA backend through the real pynvml binding and a fake libnvidia-ml.so.1.

Every recorded capture is a test case: what the HAL reports must be what nvidia-smi
recorded. Faults (a missing library, a driver mismatch, a hang, a crash, a function the
driver lacks, a GPU falling off the bus) are injected through the fake library.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
from conftest import CAPTURES, SYSFS, TXT, XML, nvml_config, write_control
from fakenvml import build
from sysfs_trees import add_pci_gpu, add_render_node

from hal.backends.nvidia import NvidiaBackend, normalise_bus_id
from hal.errors import BackendUnavailable
from hal.machine import Hal, discover
from hal.profile import PendingProfile
from hal.types import UNSUPPORTED, GpuProfile, GpuSample, Profile, Reading, Unavailable

DUAL_A5000 = XML / "dual_a5000-v13.xml"
H100_MIG = TXT / "linux-x86_64__nvidia-h100-mig__590.48.01.txt"
MHZ = 1_000_000


def _expected(value: Any, convert: Callable[[Any], Any] = lambda v: v) -> Reading[Any]:
    return UNSUPPORTED if value is None else convert(value)


@pytest.fixture
def backend_for(
    nvidia_for: Callable[[Path], tuple[NvidiaBackend, list[GpuProfile]]],
) -> Callable[[Path], NvidiaBackend]:
    """Opens the NVIDIA backend in this process on a capture's fake library."""
    return lambda capture: nvidia_for(capture)[0]


def _physical(gpus: list[GpuProfile]) -> list[GpuProfile]:
    return [g for g in gpus if g.kind != "mig"]


@pytest.mark.parametrize("capture_path", CAPTURES, ids=lambda p: p.name)
def test_profile_matches_the_capture(
    capture_path: Path, library_for: Callable[[Path], Path], tmp_path: Path
) -> None:
    capture = build.parse_capture(capture_path)
    found = discover(nvml_config(library_for(capture_path), tmp_path))
    (report,) = found.backends
    assert report.status == "ok", report
    assert report.versions["driver"] == str(_expected(capture.driver_version))
    gpus = _physical(found.gpus)
    assert len(gpus) == len(capture.gpus)
    for gpu, want in zip(gpus, capture.gpus, strict=True):
        assert gpu.name == want.name
        assert gpu.uuid == _expected(want.uuid)
        assert gpu.vram_total_bytes == _expected(want.memory_total_bytes)
        assert gpu.driver_version == _expected(capture.driver_version)
        assert gpu.cuda_version == _expected(capture.cuda_version)
        assert gpu.compute_capability == _expected(
            want.cuda_compute_capability, lambda cc: f"{cc[0]}.{cc[1]}"
        )
        assert gpu.power_limit_w == _expected(want.enforced_power_limit_mw, lambda mw: mw / 1000)
        if want.min_power_limit_mw is not None:
            assert gpu.power_limit_max_w == _expected(want.max_power_limit_mw, lambda mw: mw / 1000)
        assert gpu.clock_graphics_max_hz == _expected(want.max_clock_graphics_mhz, MHZ.__mul__)
        assert gpu.clock_memory_max_hz == _expected(want.max_clock_memory_mhz, MHZ.__mul__)
        assert gpu.pcie_gen_max == _expected(want.pcie_link_gen_max)
        assert gpu.pcie_width_max == _expected(want.pcie_link_width_max)
        assert gpu.ecc_enabled == _expected(want.ecc_mode_current)
        assert gpu.mig_enabled == _expected(want.mig_mode_current)
        if isinstance(gpu.pci_bus_id, str):
            assert gpu.pci_bus_id == normalise_bus_id(want.pci_bus_id)
    migs = [g for g in found.gpus if g.kind == "mig"]
    assert len(migs) == sum(len(g.mig_devices) for g in capture.gpus if g.mig_mode_current)


def test_recorded_values_spot_check_rtx_3090() -> None:
    """A few values read off the capture by eye, so the parser is not its own referee."""
    capture = build.parse_capture(XML / "rtx-3090-v12.xml")
    assert capture.driver_version == "525.147.05"
    assert capture.gpus[0].memory_total_bytes == 24576 * 1024 * 1024


def test_mig_instances_are_children_of_their_gpu(
    library_for: Callable[[Path], Path], tmp_path: Path
) -> None:
    found = discover(nvml_config(library_for(H100_MIG), tmp_path))
    (parent,) = _physical(found.gpus)
    migs = [g for g in found.gpus if g.kind == "mig"]
    assert parent.mig_enabled is True
    assert len(migs) == 4
    assert {m.parent_uuid for m in migs} == {parent.id}
    assert all(isinstance(m.uuid, str) and m.uuid.startswith("MIG-") for m in migs)
    assert all("MIG" in m.name for m in migs)
    assert len({m.id for m in migs}) == 4
    vram = [m.vram_total_bytes for m in migs]
    assert all(isinstance(v, int) and 0 < v < parent.vram_total_bytes for v in vram)  # type: ignore[operator]


def test_sample_matches_the_capture(backend_for: Callable[[Path], NvidiaBackend]) -> None:
    nvidia = backend_for(DUAL_A5000)
    capture = build.parse_capture(DUAL_A5000)
    samples = nvidia.sample(now=0.0)
    assert len(samples) == 2
    for sample, want in zip(samples, capture.gpus, strict=True):
        assert sample.state == "ok"
        assert sample.util_gpu_pct == want.utilization_gpu_pct
        assert sample.util_memory_pct == want.utilization_memory_pct
        assert sample.temperature_c == want.temperature_gpu_c
        assert sample.fan_pct == want.fan_speed_pct
        assert sample.clock_graphics_hz == _expected(want.clock_graphics_mhz, MHZ.__mul__)
        assert sample.clock_memory_hz == _expected(want.clock_memory_mhz, MHZ.__mul__)
        assert sample.power_w == _expected(
            want.power_instant_mw or want.power_usage_mw, lambda mw: mw / 1000
        )
        assert sample.ecc_corrected == _expected(want.ecc_corrected_volatile)
        assert sample.pcie_replay_count == _expected(want.pcie_replay_counter)
        assert isinstance(sample.processes, list)
        assert sorted(p.pid for p in sample.processes) == sorted(
            p.pid for p in want.processes or ()
        )


def test_energy_counter_grows_between_samples(backend_for: Callable[[Path], NvidiaBackend]) -> None:
    nvidia = backend_for(DUAL_A5000)
    first = nvidia.sample(now=0.0)[0].energy_j
    second = nvidia.sample(now=1.0)[0].energy_j
    assert isinstance(first, float)
    assert isinstance(second, float)
    assert second >= first >= build.ENERGY_BASE_MJ / 1000


def test_active_throttle_reasons_are_named(backend_for: Callable[[Path], NvidiaBackend]) -> None:
    capture_path = XML / "rtx-3080-v13.xml"
    mask = build.parse_capture(capture_path).gpus[0].clocks_event_reasons
    (sample,) = backend_for(capture_path).sample(now=0.0)
    assert isinstance(sample.throttle_reasons, list)
    assert len(sample.throttle_reasons) == bin(mask or 0).count("1")


def test_unsupported_readings_are_unsupported_not_zero(
    backend_for: Callable[[Path], NvidiaBackend],
) -> None:
    # The Quadro P400 capture reads "N/A" for every power value.
    (sample,) = backend_for(XML / "quadro-p400.xml").sample(now=0.0)
    assert sample.power_w is UNSUPPORTED
    assert sample.energy_j is UNSUPPORTED


def test_mig_instances_are_sampled_for_memory(backend_for: Callable[[Path], NvidiaBackend]) -> None:
    samples = backend_for(H100_MIG).sample(now=0.0)
    migs = samples[1:]
    assert len(migs) == 4
    assert all(isinstance(s.memory_used_bytes, int) for s in migs)
    assert all(s.util_gpu_pct is UNSUPPORTED for s in migs)


def test_lost_gpu_is_reported_lost_and_recovered_with_backoff(
    library_for: Callable[[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control = tmp_path / "control"
    monkeypatch.setenv("FAKENVML_CONTROL", str(control))
    nvidia = NvidiaBackend(nvml_config(library_for(DUAL_A5000), tmp_path))
    nvidia.open()
    try:
        assert [s.state for s in nvidia.sample(now=100.0)] == ["ok", "ok"]

        write_control(control, "lost 0\n")
        lost, other = nvidia.sample(now=100.0)
        assert (lost.state, other.state) == ("lost", "ok")
        assert isinstance(lost.temperature_c, Unavailable)
        assert lost.temperature_c.reason == "gpu_lost"

        assert nvidia.sample(now=101.0)[0].state == "lost"  # retried after 1 s: still gone
        write_control(control, "")
        assert nvidia.sample(now=102.0)[0].state == "lost"  # next retry waits 2 s more
        recovered = nvidia.sample(now=103.0)[0]
        assert recovered.state == "ok"
        assert isinstance(recovered.temperature_c, float)
    finally:
        nvidia.close()


@pytest.mark.parametrize(
    ("init_result", "code"),
    [
        ("DRIVER_NOT_LOADED", "driver_not_loaded"),
        ("LIB_RM_VERSION_MISMATCH", "driver_library_mismatch"),
        ("NO_PERMISSION", "permission_denied"),
        ("UNKNOWN", "library_error"),
    ],
)
def test_init_failure_is_reported_with_its_code(
    init_result: str,
    code: str,
    library_for: Callable[[Path], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKENVML_INIT_RESULT", init_result)
    found = discover(nvml_config(library_for(DUAL_A5000), tmp_path))
    assert found.gpus == []
    (report,) = found.backends
    assert (report.status, report.code) == ("unavailable", code)


def test_missing_library_is_library_missing(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable) as missing:
        NvidiaBackend(nvml_config(tmp_path / "nowhere" / "libnvidia-ml.so.1", tmp_path)).open()
    assert missing.value.code == "library_missing"


def test_hanging_driver_times_out_and_other_vendors_are_still_found(
    library_for: Callable[[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKENVML_INIT_HANG", "1")
    config = nvml_config(
        library_for(DUAL_A5000),
        tmp_path,
        sysfs_root=SYSFS,
        backends=("nvml", "amdgpu", "intel"),
        discovery_timeout_s=1.0,
    )
    found = discover(config)
    reports = {r.name: r for r in found.backends}
    assert (reports["nvml"].status, reports["nvml"].code) == ("failed", "timeout")
    assert reports["intel"].status == "ok"
    assert {g.vendor for g in found.gpus} == {"amd", "intel"}


def test_profile_given_up_before_its_result_stops_the_hanging_discovery(
    library_for: Callable[[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKENVML_INIT_HANG", "1")
    config = nvml_config(
        library_for(DUAL_A5000),
        tmp_path,
        discovery_timeout_s=600.0,
        docker_socket=tmp_path / "docker.sock",
    )
    before = {child.pid for child in psutil.Process().children()}
    with PendingProfile(config):
        discovering = {child.pid for child in psutil.Process().children()} - before
    assert len(discovering) == 1
    assert not discovering & {child.pid for child in psutil.Process().children()}


def test_crashing_driver_is_reported_and_the_caller_lives(
    library_for: Callable[[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKENVML_INIT_CRASH", "1")
    (report,) = discover(nvml_config(library_for(DUAL_A5000), tmp_path)).backends
    assert (report.status, report.code) == ("failed", "crashed")
    assert "SIGSEGV" in report.detail


def test_driver_without_batched_fields_is_sampled_call_by_call(tmp_path: Path) -> None:
    capture = build.parse_capture(DUAL_A5000)
    library = build.build_library(capture, tmp_path / "lib", omit=["nvmlDeviceGetFieldValues"])
    nvidia = NvidiaBackend(nvml_config(library, tmp_path))
    nvidia.open()
    try:
        sample = nvidia.sample(now=0.0)[0]
    finally:
        nvidia.close()
    assert sample.power_w == _expected(capture.gpus[0].power_usage_mw, lambda mw: mw / 1000)
    assert isinstance(sample.energy_j, float)
    assert sample.pcie_replay_count == _expected(capture.gpus[0].pcie_replay_counter)


def test_render_node_and_numa_node_come_from_sysfs(
    library_for: Callable[[Path], Path], tmp_path: Path
) -> None:
    capture = build.parse_capture(DUAL_A5000)
    bus_id = normalise_bus_id(capture.gpus[0].pci_bus_id)
    add_pci_gpu(
        tmp_path / "sys",
        card="card0",
        slot=bus_id,
        pci_id="10DE:2231",
        driver="nvidia",
        device_files={"numa_node": 1},
    )
    add_render_node(tmp_path / "dev", 128)
    found = discover(nvml_config(library_for(DUAL_A5000), tmp_path))
    first, second = found.gpus
    assert first.render_node == str(tmp_path / "dev" / "dri" / "renderD128")
    assert first.numa_node == 1
    assert second.render_node == UNSUPPORTED


def test_hal_samples_what_discovery_found(
    library_for: Callable[[Path], Path], tmp_path: Path
) -> None:
    hal = Hal(nvml_config(library_for(DUAL_A5000), tmp_path))
    try:
        discovery = hal.open()
        samples = hal.sample()
    finally:
        hal.close()
    assert [s.id for s in samples] == [g.id for g in discovery.gpus]
    assert all(isinstance(s, GpuSample) for s in samples)


def test_documented_command_profiles_a_capture_of_your_own(tmp_path: Path) -> None:
    """README: build a fake from a capture, then point gpu-agent at it."""
    script = Path(__file__).parent / "fakenvml" / "build.py"
    built = subprocess.run(
        [sys.executable, str(script), "--txt", str(H100_MIG), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    library = built.stdout.strip().splitlines()[-1]
    env = {**os.environ, "GPU_AGENT_NVML_LIB": library, "GPU_AGENT_SYSFS_ROOT": str(tmp_path)}
    shown = subprocess.run(
        [sys.executable, "-m", "agent.cli", "profile", "--json"],
        capture_output=True,
        env=env,
        check=True,
        timeout=120,
    )
    profile = msgspec.json.decode(shown.stdout, type=Profile)
    assert [g.kind for g in profile.gpus] == ["discrete", "mig", "mig", "mig", "mig"]
    assert profile.gpus[0].name == "NVIDIA H100 80GB HBM3"


def test_gpu_lost_during_discovery_is_reported_and_the_others_still_found(
    library_for: Callable[[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control = tmp_path / "control"
    write_control(control, "lost 0\n")
    monkeypatch.setenv("FAKENVML_CONTROL", str(control))
    found = discover(nvml_config(library_for(DUAL_A5000), tmp_path))
    (report,) = found.backends
    assert report.status == "ok"
    lost, healthy = found.gpus
    assert isinstance(lost.uuid, Unavailable)
    assert lost.uuid.reason == "gpu_lost"
    assert healthy.uuid == build.parse_capture(DUAL_A5000).gpus[1].uuid

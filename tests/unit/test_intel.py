"""The Intel (i915 and xe) sysfs backend, on the recorded tree and on trees built per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.sysfs_trees import (
    FIXTURE_SYSFS,
    PciGpu,
    add_hwmon,
    add_pci_gpu,
    add_render_node,
    write,
)

from hal.backend import HalConfig
from hal.backends.intel import IntelSysfsBackend, intel_kind
from hal.errors import BackendUnavailable
from hal.types import UNSUPPORTED, Reading, Unavailable

GIB = 1 << 30
MHZ = 10**6


def _backend(sysfs: Path, dev: Path) -> IntelSysfsBackend:
    proc = dev.parent / "proc"  # no process holds a DRM client here
    proc.mkdir(exist_ok=True)
    return IntelSysfsBackend(HalConfig(sysfs_root=sysfs, dev_root=dev, proc_root=proc))


def _arc_a770_on_xe(sysfs: Path) -> PciGpu:
    freq = "tile0/gt0/freq0"
    gpu = add_pci_gpu(
        sysfs,
        card="card0",
        slot="0000:03:00.0",
        pci_id="8086:56A0",
        driver="xe",
        device_files={
            "tile0/physical_vram_size_bytes": 16 * GIB,
            f"{freq}/rp0_freq": 2400,
            f"{freq}/max_freq": 2000,  # a user's cap, below what the hardware can do
            f"{freq}/act_freq": 2100,
            f"{freq}/throttle/status": 1,
            f"{freq}/throttle/reason_pl1": 0,
            f"{freq}/throttle/reason_thermal": 1,
            "max_link_speed": "16.0 GT/s PCIe",
            "max_link_width": 16,
            "numa_node": 0,
        },
    )
    add_hwmon(
        gpu.device,
        4,
        "xe",
        {
            "energy1_input": 1_000_000_000,  # microjoules
            "power1_max": 225_000_000,  # the A770's 225 W board power, in microwatts
            "temp2_input": 52000,
            "temp2_label": "pkg",
            "temp3_input": 60000,
            "temp3_label": "vram",
        },
    )
    return gpu


def _uhd620_on_i915(sysfs: Path) -> PciGpu:
    return add_pci_gpu(
        sysfs,
        card="card0",
        slot="0000:00:02.0",
        pci_id="8086:5917",
        driver="i915",
        card_files={
            "gt_RP0_freq_mhz": 1150,  # the i7-8550U's graphics maximum
            "gt_act_freq_mhz": 300,
            "gt_cur_freq_mhz": 350,
            "gt/gt0/throttle_reason_status": 1,
            "gt/gt0/throttle_reason_pl1": 1,
            "gt/gt0/throttle_reason_thermal": 0,
            "gt/gt0/throttle_reason_prochot": 0,
        },
    )


def test_recorded_uhd620_is_integrated_and_the_rest_unsupported(dev: Path) -> None:
    backend = _backend(FIXTURE_SYSFS, dev)
    profiles = backend.open()
    assert len(profiles) == 1  # card0 is bound to amdgpu
    uhd = profiles[0]
    assert uhd.id == "pci:0000:00:02.0"
    assert uhd.name == "Intel GPU 8086:5917"
    assert uhd.kind == "integrated"
    assert uhd.uuid == uhd.vram_total_bytes == uhd.render_node == UNSUPPORTED
    assert uhd.clock_graphics_max_hz == uhd.numa_node == uhd.pcie_gen_max == UNSUPPORTED
    (sample,) = backend.sample(now=1.0)
    assert sample.state == "ok"
    assert sample.clock_graphics_hz == sample.power_w == sample.energy_j == UNSUPPORTED
    assert sample.throttle_reasons == UNSUPPORTED


def test_xe_discrete_card_reports_local_memory_and_hardware_max_clock(
    sysfs: Path, dev: Path
) -> None:
    _arc_a770_on_xe(sysfs)
    node = add_render_node(dev, 128)
    (arc,) = _backend(sysfs, dev).open()
    assert arc.kind == "discrete"
    assert arc.vram_total_bytes == 16 * GIB
    assert arc.clock_graphics_max_hz == 2400 * MHZ  # rp0_freq, not the user's max_freq
    assert arc.power_limit_w == 225.0
    assert arc.render_node == str(node)
    assert (arc.pcie_gen_max, arc.pcie_width_max, arc.numa_node) == (4, 16, 0)


def test_power_is_the_energy_counter_delta_over_time_between_samples(
    sysfs: Path, dev: Path
) -> None:
    gpu = _arc_a770_on_xe(sysfs)
    backend = _backend(sysfs, dev)
    backend.open()
    (first,) = backend.sample(now=100.0)
    assert first.energy_j == 1000.0
    assert first.power_w == Unavailable("warming_up", "power needs a second energy reading")
    write(gpu.device / "hwmon" / "hwmon4" / "energy1_input", 1_300_000_000)
    (second,) = backend.sample(now=102.0)
    assert second.energy_j == 1300.0
    assert second.power_w == pytest.approx(150.0)  # 300 J over 2 s


def test_energy_counter_going_backwards_gives_no_power(sysfs: Path, dev: Path) -> None:
    gpu = _arc_a770_on_xe(sysfs)
    backend = _backend(sysfs, dev)
    backend.open()
    backend.sample(now=100.0)
    write(gpu.device / "hwmon" / "hwmon4" / "energy1_input", 5_000_000)  # the driver reloaded
    (sample,) = backend.sample(now=101.0)
    assert isinstance(sample.power_w, Unavailable)
    assert sample.power_w.reason == "counter_reset"


def test_xe_sample_reads_actual_clock_throttle_and_labelled_temperatures(
    sysfs: Path, dev: Path
) -> None:
    _arc_a770_on_xe(sysfs)
    backend = _backend(sysfs, dev)
    backend.open()
    (sample,) = backend.sample(now=1.0)
    assert sample.clock_graphics_hz == 2100 * MHZ
    assert sample.throttle_reasons == ["thermal"]
    assert sample.temperature_c == 52.0
    assert sample.temperature_memory_c == 60.0


def test_xe_with_only_the_package_counter_still_reports_energy(sysfs: Path, dev: Path) -> None:
    gpu = add_pci_gpu(sysfs, card="card0", slot="0000:03:00.0", pci_id="8086:56A0", driver="xe")
    add_hwmon(gpu.device, 2, "xe", {"energy2_input": 42_000_000, "energy2_label": "pkg"})
    backend = _backend(sysfs, dev)
    backend.open()
    (sample,) = backend.sample(now=1.0)
    assert sample.energy_j == 42.0


def test_i915_integrated_reads_card_level_clocks_and_throttle_reasons(
    sysfs: Path, dev: Path
) -> None:
    _uhd620_on_i915(sysfs)
    backend = _backend(sysfs, dev)
    (uhd,) = backend.open()
    assert uhd.kind == "integrated"
    assert uhd.vram_total_bytes == UNSUPPORTED
    assert uhd.clock_graphics_max_hz == 1150 * MHZ
    (sample,) = backend.sample(now=1.0)
    assert sample.clock_graphics_hz == 300 * MHZ  # actual, not the requested 350
    assert sample.throttle_reasons == ["pl1"]  # throttle_reason_status is not a reason
    assert sample.power_w == sample.energy_j == UNSUPPORTED  # i915 has hwmon on dGPUs only


def test_i915_discrete_with_backport_local_memory_and_hwmon(sysfs: Path, dev: Path) -> None:
    gpu = add_pci_gpu(
        sysfs,
        card="card1",
        slot="0000:03:00.0",
        pci_id="8086:56A0",
        driver="i915",
        card_files={"lmem_total_bytes": 16 * GIB, "gt_RP0_freq_mhz": 2400},
    )
    add_hwmon(gpu.device, 7, "i915", {"energy1_input": 5_000_000, "power1_max": 0})
    (arc,) = _backend(sysfs, dev).open()
    assert arc.kind == "discrete"
    assert arc.vram_total_bytes == 16 * GIB
    assert arc.clock_graphics_max_hz == 2400 * MHZ
    assert arc.power_limit_w == UNSUPPORTED  # power1_max 0: the PL1 limit is disabled


def test_card_removed_between_open_and_sample_is_lost(sysfs: Path, dev: Path) -> None:
    gpu = _arc_a770_on_xe(sysfs)
    backend = _backend(sysfs, dev)
    backend.open()
    shutil.rmtree(gpu.device)
    (sample,) = backend.sample(now=1.0)
    assert (sample.id, sample.state) == ("pci:0000:03:00.0", "lost")


def test_no_intel_card_says_whether_a_driver_is_loaded(sysfs: Path, dev: Path) -> None:
    with pytest.raises(BackendUnavailable) as no_driver:
        _backend(sysfs, dev).open()
    assert no_driver.value.code == "driver_not_loaded"
    (sysfs / "module" / "xe").mkdir(parents=True)
    with pytest.raises(BackendUnavailable) as no_card:
        _backend(sysfs, dev).open()
    assert no_card.value.code == "no_devices"


@pytest.mark.parametrize(
    ("bus", "local_memory", "has_hwmon", "kind"),
    [
        ("0000:00:02.0", UNSUPPORTED, False, "integrated"),
        ("0000:03:00.0", UNSUPPORTED, False, "discrete"),  # behind a PCIe port
        ("0000:00:05.0", 8 * GIB, False, "discrete"),  # passed through into a VM
        ("0000:00:05.0", UNSUPPORTED, True, "discrete"),
    ],
)
def test_kind_follows_local_memory_hwmon_and_slot(
    bus: str, local_memory: Reading[int], has_hwmon: bool, kind: str
) -> None:
    assert intel_kind(bus, local_memory, has_hwmon=has_hwmon) == kind


def test_kind_without_evidence_on_bus_zero_is_undetermined() -> None:
    kind = intel_kind("0000:00:05.0", UNSUPPORTED, has_hwmon=False)
    assert isinstance(kind, Unavailable)
    assert kind.reason == "undetermined"

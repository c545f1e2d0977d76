"""The amdgpu sysfs backend, on the recorded tree and on trees built per test.

Values in the built trees come from the rocm-smi captures in
tests/fixtures/rocm-smi-json/: the MI100 from mi100_rocm602.json (card0), the
RX 6700 XT from rx6700xt_rocm612.json.
"""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest
from support.sysfs_trees import (
    FIXTURE_SYSFS,
    PciGpu,
    add_hwmon,
    add_kfd_node,
    add_pci_gpu,
    add_render_node,
    write,
)

from hal.backend import HalConfig
from hal.backends.amdgpu import (
    AmdgpuSysfsBackend,
    amdgpu_kind,
    gfx_target_name,
    marketing_names,
    rocm_uuid,
    rocm_version,
)
from hal.errors import BackendUnavailable
from hal.types import UNSUPPORTED, Unavailable

GIB = 1 << 30
MIB = 1 << 20


def _backend(sysfs: Path, dev: Path) -> AmdgpuSysfsBackend:
    proc = dev.parent / "proc"  # no process holds a DRM client here
    proc.mkdir(exist_ok=True)
    return AmdgpuSysfsBackend(HalConfig(sysfs_root=sysfs, dev_root=dev, proc_root=proc))


def _mi100(sysfs: Path) -> PciGpu:
    gpu = add_pci_gpu(
        sysfs,
        card="card0",
        slot="0000:83:00.0",
        pci_id="1002:738C",
        driver="amdgpu",
        device_files={
            "unique_id": "79ccd55167a2124a",
            "board_info": "type : oam",
            "mem_info_vram_total": 34342961152,
            "mem_info_vram_used": 6750208,
            "mem_info_gtt_total": 135138402304,
            "mem_info_gtt_used": 11354112,
            "mem_info_vram_vendor": "samsung",
            "gpu_busy_percent": 0,
            "mem_busy_percent": 0,
            "pp_dpm_sclk": "0: 300Mhz *\n1: 495Mhz\n2: 1502Mhz",
            "pp_dpm_mclk": "0: 1200Mhz *",
            "max_link_speed": "16.0 GT/s PCIe",
            "max_link_width": 16,
            "numa_node": 1,
            "pcie_replay_count": 0,
            "ras/features": "feature mask: 0x3fbb",  # bit 0, the UMC (VRAM) block, is on
            "ras/umc_err_count": "ue: 0\nce: 2",
        },
    )
    add_hwmon(
        gpu.device,
        2,
        "amdgpu",
        {
            "temp1_input": 53000,
            "temp1_label": "edge",
            "temp2_input": 55000,
            "temp2_label": "junction",
            "temp3_input": 53000,
            "temp3_label": "mem",
            "power1_average": 36_000_000,
            "power1_cap": 290_000_000,  # "Max Graphics Package Power (W)": "290.0"
            "power1_cap_max": 300_000_000,  # the MI100's 300 W board power
        },
    )
    # KFD writes the PCI location as (bus << 8) | (device << 3) | function; 0x83 << 8.
    add_kfd_node(sysfs, 0, {"cpu_cores_count": 32, "gfx_target_version": 0})
    add_kfd_node(
        sysfs,
        1,
        {"gfx_target_version": 90008, "location_id": 0x8300, "domain": 0, "drm_render_minor": 128},
    )
    write(sysfs / "module" / "amdgpu" / "version", "6.3.6")  # the capture's driver version
    return gpu


def _rx6700xt(sysfs: Path, hwmon_number: int = 3) -> PciGpu:
    gpu = add_pci_gpu(
        sysfs,
        card="card1",
        slot="0000:07:00.0",
        pci_id="1002:73DF",
        driver="amdgpu",
        render_minor=129,
        device_files={
            "product_name": "",  # consumer boards have no FRU; the capture says "N/A"
            "mem_info_vram_total": 12868124672,
            "mem_info_vram_used": 1572745216,
            "mem_info_gtt_total": 16792432640,
            "mem_info_gtt_used": 242036736,
            "mem_info_vram_vendor": "samsung",
            "gpu_busy_percent": 0,
            "pp_dpm_sclk": "0: 500Mhz *\n1: 2581Mhz",  # 2581 MHz: the RX 6700 XT's boost
            "pp_dpm_mclk": "0: 96Mhz *\n1: 456Mhz\n2: 673Mhz\n3: 1000Mhz",
        },
    )
    add_hwmon(
        gpu.device,
        hwmon_number,
        "amdgpu",
        {
            "temp1_input": 45000,
            "temp1_label": "edge",
            "temp2_input": 47000,
            "temp2_label": "junction",
            "temp3_input": 46000,
            "temp3_label": "mem",
            "power1_average": 6_000_000,
            "power1_cap": 211_000_000,
            "freq1_input": 500_000_000,
            "freq2_input": 96_000_000,
            "pwm1": 51,
            "pwm1_max": 255,
        },
    )
    return gpu


def test_recorded_vega10_profile_comes_from_sysfs_alone(dev: Path) -> None:
    profiles = _backend(FIXTURE_SYSFS, dev).open()
    assert len(profiles) == 1  # card1 is bound to i915
    vega = profiles[0]
    assert vega.id == vega.uuid == "GPU-0123456789abcdef"
    assert vega.name == "AMD GPU 1002:687F"  # product_name is empty on this board
    assert vega.pci_bus_id == "0000:09:00.0"
    assert vega.kind == "discrete"  # it names its VRAM vendor
    assert vega.vram_total_bytes == vega.gtt_total_bytes == 8573157376
    assert vega.clock_graphics_max_hz == 1630 * 10**6
    assert vega.clock_memory_max_hz == 945 * 10**6
    assert (vega.pcie_gen_max, vega.pcie_width_max) == (3, 16)
    for absent in (vega.render_node, vega.power_limit_w, vega.gfx_target, vega.ecc_enabled):
        assert absent == UNSUPPORTED  # the recording has no drm/, hwmon, kfd or ras
    assert vega.numa_node == UNSUPPORTED  # the kernel's -1
    assert vega.driver_version == UNSUPPORTED  # in-tree amdgpu publishes no version


def test_recorded_vega10_sample_reads_what_the_tree_has(dev: Path) -> None:
    backend = _backend(FIXTURE_SYSFS, dev)
    backend.open()
    (sample,) = backend.sample(now=1.0)
    assert sample.state == "ok"
    assert sample.util_gpu_pct == 4.0
    assert sample.memory_used_bytes == 1490378752
    assert sample.gtt_used_bytes == 144560128
    assert sample.clock_graphics_hz == 852 * 10**6  # the level marked '*'
    assert sample.clock_memory_hz == 167 * 10**6
    assert sample.pcie_replay_count == 0
    assert sample.temperature_c == sample.power_w == sample.fan_pct == UNSUPPORTED
    assert sample.energy_j == UNSUPPORTED
    assert sample.processes == []


def test_instinct_reads_hwmon_kfd_target_ecc_and_driver_version(sysfs: Path, dev: Path) -> None:
    _mi100(sysfs)
    node = add_render_node(dev, 128)
    backend = _backend(sysfs, dev)
    (mi100,) = backend.open()
    assert mi100.id == "GPU-79ccd55167a2124a"
    assert mi100.render_node == str(node)
    assert mi100.kind == "discrete"
    assert mi100.gfx_target == "gfx908"
    assert (mi100.power_limit_w, mi100.power_limit_max_w) == (290.0, 300.0)
    assert mi100.clock_graphics_max_hz == 1502 * 10**6
    assert mi100.pcie_gen_max == 4
    assert mi100.ecc_enabled is True
    assert mi100.numa_node == 1
    assert mi100.driver_version == "6.3.6"
    assert backend.versions() == {"amdgpu": "6.3.6"}
    (sample,) = backend.sample(now=1.0)
    assert (sample.temperature_c, sample.temperature_hotspot_c) == (53.0, 55.0)
    assert sample.temperature_memory_c == 53.0
    assert sample.power_w == 36.0
    assert sample.energy_j == UNSUPPORTED  # amdgpu has no energy counter; none is invented
    assert (sample.ecc_corrected, sample.ecc_uncorrected) == (2, 0)


def test_apu_reports_carve_out_and_gtt_separately_and_is_integrated(sysfs: Path, dev: Path) -> None:
    add_pci_gpu(
        sysfs,
        card="card0",
        slot="0000:c4:00.0",
        pci_id="1002:15BF",
        driver="amdgpu",
        device_files={
            "mem_info_vram_total": 512 * MIB,  # the BIOS carve-out
            "mem_info_gtt_total": 16 * GIB,
            "mem_info_vram_used": 300 * MIB,
            "mem_info_gtt_used": 2 * GIB,
        },
    )
    (apu,) = _backend(sysfs, dev).open()
    assert apu.kind == "integrated"
    assert apu.vram_total_bytes == 512 * MIB
    assert apu.gtt_total_bytes == 16 * GIB
    assert apu.uuid == UNSUPPORTED
    assert apu.id == "pci:0000:c4:00.0"


def test_without_apu_evidence_the_kind_is_undetermined_not_guessed(sysfs: Path) -> None:
    gpu = add_pci_gpu(
        sysfs,
        card="card0",
        slot="0000:03:00.0",
        pci_id="1002:67DF",
        driver="amdgpu",
        device_files={"mem_info_vram_total": 8 * GIB, "mem_info_gtt_total": 16 * GIB},
    )
    kind = amdgpu_kind(gpu.device)
    assert isinstance(kind, Unavailable)
    assert kind.reason == "undetermined"


def test_hwmon_is_found_by_name_when_its_number_changes(sysfs: Path, dev: Path) -> None:
    gpu = _rx6700xt(sysfs, hwmon_number=3)
    backend = _backend(sysfs, dev)
    (profile,) = backend.open()
    assert profile.power_limit_w == 211.0
    # A driver reload renumbers the sensors: hwmon3 becomes hwmon1.
    (gpu.device / "hwmon" / "hwmon3").rename(gpu.device / "hwmon" / "hwmon1")
    (sample,) = backend.sample(now=1.0)
    assert sample.temperature_c == 45.0
    assert sample.temperature_hotspot_c == 47.0
    assert sample.power_w == 6.0
    assert sample.clock_graphics_hz == 500 * 10**6  # from freq1_input, in Hz already
    assert sample.clock_memory_hz == 96 * 10**6
    assert sample.fan_pct == pytest.approx(20.0)


def test_board_without_product_name_or_unique_id_is_named_by_pci_id(sysfs: Path, dev: Path) -> None:
    _rx6700xt(sysfs)
    (profile,) = _backend(sysfs, dev).open()
    assert profile.name == "AMD GPU 1002:73DF"
    assert profile.id == "pci:0000:07:00.0"
    assert profile.clock_graphics_max_hz == 2581 * 10**6
    assert profile.clock_memory_max_hz == 1000 * 10**6


def test_render_node_this_user_cannot_open_is_permission_denied(sysfs: Path, dev: Path) -> None:
    _rx6700xt(sysfs)
    node = add_render_node(dev, 129, mode=0o000)
    # Root could open it through CAP_DAC_OVERRIDE; the mode bits still deny it, and so
    # would the kernel for an unprivileged user or workload.
    (profile,) = _backend(sysfs, dev).open()
    assert profile.render_node == Unavailable("permission_denied", str(node))


def test_render_node_absent_from_dev_is_not_found(sysfs: Path, dev: Path) -> None:
    _rx6700xt(sysfs)
    (profile,) = _backend(sysfs, dev).open()
    assert profile.render_node == Unavailable("not_found", str(dev / "dri" / "renderD129"))


def test_card_removed_between_open_and_sample_is_lost(sysfs: Path, dev: Path) -> None:
    gpu = _mi100(sysfs)
    _rx6700xt(sysfs)
    backend = _backend(sysfs, dev)
    backend.open()
    shutil.rmtree(gpu.device)
    lost, kept = backend.sample(now=1.0)
    assert (lost.id, lost.state) == ("GPU-79ccd55167a2124a", "lost")
    assert (kept.id, kept.state) == ("pci:0000:07:00.0", "ok")


def test_no_amdgpu_card_says_whether_the_driver_is_loaded(sysfs: Path, dev: Path) -> None:
    with pytest.raises(BackendUnavailable) as no_driver:
        _backend(sysfs, dev).open()
    assert no_driver.value.code == "driver_not_loaded"
    (sysfs / "module" / "amdgpu").mkdir(parents=True)
    with pytest.raises(BackendUnavailable) as no_card:
        _backend(sysfs, dev).open()
    assert no_card.value.code == "no_devices"


@pytest.mark.parametrize(
    ("version", "target"),
    [
        (90000, "gfx900"),
        (90008, "gfx908"),
        (90010, "gfx90a"),
        (90402, "gfx942"),
        (100301, "gfx1031"),
        (110003, "gfx1103"),
    ],
)
def test_kfd_target_version_becomes_the_llvm_target(version: int, target: str) -> None:
    assert gfx_target_name(version) == target


def test_unique_id_becomes_rocm_uuid_and_zero_means_none() -> None:
    assert rocm_uuid("0x79CCD55167A2124A") == "GPU-79ccd55167a2124a"
    assert rocm_uuid("4edfb117a17a07d") == "GPU-04edfb117a17a07d"
    assert rocm_uuid("0000000000000000") == UNSUPPORTED
    assert isinstance(rocm_uuid("N/A"), Unavailable)


def test_marketing_names_skip_a_dev_root_the_library_cannot_see(
    dev: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse() -> int:
        raise AssertionError("pyamdgpuinfo must not be asked about a test tree")

    fake = types.ModuleType("pyamdgpuinfo")
    fake.detect_gpus = refuse  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyamdgpuinfo", fake)
    (dev / "dri").mkdir()
    assert marketing_names(dev) == {}


def test_rocm_release_is_read_where_rocm_is_installed(tmp_path: Path) -> None:
    rocm = tmp_path / "rocm"
    (rocm / ".info").mkdir(parents=True)
    (rocm / ".info" / "version").write_text("6.1.2-119\n")
    assert rocm_version(rocm) == "6.1.2-119"


def test_missing_rocm_is_unavailable_not_unsupported(tmp_path: Path) -> None:
    missing = rocm_version(tmp_path / "rocm")
    assert isinstance(missing, Unavailable)
    assert missing.reason == "not_installed"

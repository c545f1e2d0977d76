"""Setting a GPU's power limit: NVML through the real pynvml binding and the fake library,
amdgpu through a sysfs tree built per test, and the HAL routing a request to its backend.

These tests need nothing outside this process; the others are in
tests/integration/test_power_limit.py.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
from support.amdsmi import fake_amdsmi
from support.power_limit import cap_file, mi100, uhd620

from hal.backend import HalConfig
from hal.backends.amdgpu import AmdgpuSysfsBackend
from hal.backends.intel import IntelSysfsBackend
from hal.machine import Discovery, Hal
from hal.types import GpuProfile, PowerLimitResult

MI100_ID = "GPU-79ccd55167a2124a"


def _amdgpu(sysfs: Path, dev: Path) -> AmdgpuSysfsBackend:
    backend = AmdgpuSysfsBackend(HalConfig(sysfs_root=sysfs, dev_root=dev))
    backend.open()
    return backend


def _amd_profile(sysfs: Path, dev: Path) -> GpuProfile:
    return AmdgpuSysfsBackend(HalConfig(sysfs_root=sysfs, dev_root=dev)).open()[0]


def test_amd_cap_within_range_is_written_in_microwatts_and_read_back(
    sysfs: Path, dev: Path
) -> None:
    gpu = mi100(sysfs)

    result = _amdgpu(sysfs, dev).set_power_limit(MI100_ID, 250.5)

    assert result == PowerLimitResult(gpu_id=MI100_ID, status="set", limit_w=250.5)
    assert cap_file(gpu).read_text() == "250500000\n"
    assert _amd_profile(sysfs, dev).power_limit_w == 250.5


@pytest.mark.parametrize("watts", [300.5, -1.0, math.nan, math.inf])
def test_amd_cap_outside_the_range_is_out_of_range_and_not_written(
    sysfs: Path, dev: Path, watts: float
) -> None:
    gpu = mi100(sysfs)

    result = _amdgpu(sysfs, dev).set_power_limit(MI100_ID, watts)

    assert (result.status, result.limit_w) == ("out_of_range", None)
    assert cap_file(gpu).read_text() == "290000000\n"


def test_amd_cap_range_is_named_when_refused(sysfs: Path, dev: Path) -> None:
    mi100(sysfs, power1_cap_min=100_000_000)
    result = _amdgpu(sysfs, dev).set_power_limit(MI100_ID, 50.0)
    assert result.status == "out_of_range"
    assert "100-300 W" in result.detail


def test_card_without_a_power_cap_is_unsupported(sysfs: Path, dev: Path) -> None:
    gpu = mi100(sysfs)
    cap_file(gpu).unlink()
    result = _amdgpu(sysfs, dev).set_power_limit(MI100_ID, 250.0)
    assert (result.status, result.limit_w) == ("unsupported", None)


def test_amd_gpu_the_backend_did_not_open_is_unknown(sysfs: Path, dev: Path) -> None:
    mi100(sysfs)
    result = _amdgpu(sysfs, dev).set_power_limit("GPU-0000000000000000", 250.0)
    assert result.status == "unknown_gpu"


def test_amd_card_removed_after_open_fails(sysfs: Path, dev: Path) -> None:
    gpu = mi100(sysfs)
    backend = _amdgpu(sysfs, dev)
    shutil.rmtree(gpu.device)
    result = backend.set_power_limit(MI100_ID, 250.0)
    assert (result.status, result.limit_w) == ("failed", None)


def test_intel_power_limits_are_unsupported(sysfs: Path, dev: Path) -> None:
    uhd620(sysfs)
    intel = IntelSysfsBackend(HalConfig(sysfs_root=sysfs, dev_root=dev))
    gpu = intel.open()[0]

    result = intel.set_power_limit(gpu.id, 15.0)

    assert result == PowerLimitResult(
        gpu_id=gpu.id,
        status="unsupported",
        limit_w=None,
        detail="the intel backend cannot set power limits",
    )


def _set_through_amdsmi_and_amdgpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watts: float
) -> tuple[Discovery, PowerLimitResult]:
    """Set the MI100's cap through a HAL running amdsmi (test_amdsmi's stand-in) then amdgpu."""
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(["handle0"]))
    (tmp_path / "dev").mkdir()
    hal = Hal(
        HalConfig(
            sysfs_root=tmp_path / "sys", dev_root=tmp_path / "dev", backends=("amdsmi", "amdgpu")
        )
    )
    try:
        return hal.open(), hal.set_power_limit(MI100_ID, watts)
    finally:
        hal.close()


def test_hal_asks_amdgpu_when_amdsmi_cannot_set_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """amdsmi wins the merge of the MI100 but sets nothing; amdgpu's sysfs cap does it."""
    gpu = mi100(tmp_path / "sys")

    discovery, result = _set_through_amdsmi_and_amdgpu(tmp_path, monkeypatch, 250.0)

    assert [(g.id, g.backend) for g in discovery.gpus] == [(MI100_ID, "amdsmi")]
    assert result == PowerLimitResult(gpu_id=MI100_ID, status="set", limit_w=250.0)
    assert cap_file(gpu).read_text() == "250000000\n"
    assert discovery.gpus[0].power_limit_w == 250.0


def test_hal_says_why_each_backend_could_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap_file(mi100(tmp_path / "sys")).unlink()

    _, result = _set_through_amdsmi_and_amdgpu(tmp_path, monkeypatch, 250.0)

    assert result.status == "unsupported"
    amdsmi, amdgpu = result.detail.split("; ")
    assert amdsmi == "the amdsmi backend cannot set power limits"
    assert amdgpu.endswith("/hwmon2/power1_cap does not exist")

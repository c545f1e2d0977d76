"""Setting a GPU's power limit: NVML through the real pynvml binding and the fake library,
amdgpu through a sysfs tree built per test, and the HAL routing a request to its backend.

The fake NVML takes a limit within the captured constraints (the dual A5000: 100-230 W)
and refuses one outside with NVML_ERROR_INVALID_ARGUMENT; its control file injects
NO_PERMISSION (``nopermission <index>``) and NOT_SUPPORTED (``nopowercap <index>``).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pynvml
import pytest
from conftest import TXT, XML, nvml_config, write_control
from fakenvml import build
from sysfs_trees import PciGpu, add_hwmon, add_pci_gpu
from test_amdsmi import _fake_amdsmi

from hal.backend import HalConfig
from hal.backends.amdgpu import AmdgpuSysfsBackend
from hal.backends.intel import IntelSysfsBackend
from hal.backends.nvidia import NvidiaBackend
from hal.backends.nvml import init as nvml_init
from hal.machine import Discovery, Hal, discover
from hal.types import GpuProfile, PowerLimitResult

DUAL_A5000 = XML / "dual_a5000-v13.xml"
H100_MIG = TXT / "linux-x86_64__nvidia-h100-mig__590.48.01.txt"
MI100_ID = "GPU-79ccd55167a2124a"


Opened = tuple[NvidiaBackend, list[GpuProfile]]


def _management_limit_mw(index: int) -> int:
    """What the library itself holds, asked behind the backend's back."""
    return int(pynvml.nvmlDeviceGetPowerManagementLimit(pynvml.nvmlDeviceGetHandleByIndex(index)))


# ------------------------------------------------------------------------------------ NVIDIA


def test_limit_within_range_is_set_and_profiled_from_then_on(
    nvidia_for: Callable[[Path], Opened],
) -> None:
    nvidia, (first, _) = nvidia_for(DUAL_A5000)

    result = nvidia.set_power_limit(first.id, 150.0)

    assert result == PowerLimitResult(gpu_id=first.id, status="set", limit_w=150.0)
    assert _management_limit_mw(0) == 150_000
    _, profiles = nvidia_for(DUAL_A5000)  # another backend reads the profiles anew from NVML
    assert [p.power_limit_w for p in profiles] == [150.0, 230.0]


def test_limit_at_either_end_of_the_range_is_set(nvidia_for: Callable[[Path], Opened]) -> None:
    nvidia, (first, _) = nvidia_for(DUAL_A5000)
    assert nvidia.set_power_limit(first.id, 100.0).limit_w == 100.0
    assert nvidia.set_power_limit(first.id, 230.0).limit_w == 230.0


@pytest.mark.parametrize("watts", [99.9, 230.5, 0.0, -5.0, math.nan, math.inf])
def test_limit_outside_the_range_is_out_of_range_and_changes_nothing(
    nvidia_for: Callable[[Path], Opened], watts: float
) -> None:
    nvidia, (first, _) = nvidia_for(DUAL_A5000)

    result = nvidia.set_power_limit(first.id, watts)

    assert (result.status, result.limit_w) == ("out_of_range", None)
    assert "100-230 W" in result.detail
    assert _management_limit_mw(0) == 230_000


def test_without_permission_the_limit_is_permission_denied(
    nvidia_for: Callable[[Path], Opened], control: Path
) -> None:
    nvidia, (first, second) = nvidia_for(DUAL_A5000)
    write_control(control, "nopermission 0\n")

    result = nvidia.set_power_limit(first.id, 150.0)

    assert (result.status, result.limit_w) == ("permission_denied", None)
    assert "needs root" in result.detail
    assert _management_limit_mw(0) == 230_000
    assert nvidia.set_power_limit(second.id, 150.0).status == "set"  # only GPU 0 was denied


def test_gpu_that_cannot_take_a_limit_is_unsupported(
    nvidia_for: Callable[[Path], Opened], control: Path
) -> None:
    nvidia, (first, _) = nvidia_for(DUAL_A5000)
    write_control(control, "nopowercap 0\n")

    result = nvidia.set_power_limit(first.id, 150.0)

    assert (result.status, result.detail) == ("unsupported", "NVML: Not Supported")


def test_driver_without_the_setter_is_unsupported(tmp_path: Path) -> None:
    capture = build.parse_capture(DUAL_A5000)
    library = build.build_library(
        capture, tmp_path / "old", omit=["nvmlDeviceSetPowerManagementLimit"]
    )
    nvidia = NvidiaBackend(nvml_config(library, tmp_path))
    first = nvidia.open()[0]
    try:
        result = nvidia.set_power_limit(first.id, 150.0)
    finally:
        nvidia.close()
    assert (result.status, result.detail) == ("unsupported", "NVML: Function Not Found")


def test_lost_gpu_fails_and_is_sampled_lost_until_it_returns(
    nvidia_for: Callable[[Path], Opened], control: Path
) -> None:
    nvidia, (first, _) = nvidia_for(DUAL_A5000)
    write_control(control, "lost 0\n")

    result = nvidia.set_power_limit(first.id, 150.0)

    assert (result.status, result.detail) == ("failed", "NVML: GPU is lost")
    assert nvidia.sample(now=100.0)[0].state == "lost"
    write_control(control, "")
    assert nvidia.set_power_limit(first.id, 150.0).status == "failed"  # lost until sampled
    assert nvidia.sample(now=200.0)[0].state == "ok"
    assert nvidia.set_power_limit(first.id, 150.0).status == "set"


def test_mig_instance_is_unsupported_and_its_gpu_is_not(
    nvidia_for: Callable[[Path], Opened],
) -> None:
    nvidia, profiles = nvidia_for(H100_MIG)
    gpu = next(p for p in profiles if p.kind == "discrete")
    mig = next(p for p in profiles if p.kind == "mig")

    result = nvidia.set_power_limit(mig.id, 300.0)

    assert (result.status, result.limit_w) == ("unsupported", None)
    assert "MIG" in result.detail
    assert nvidia.set_power_limit(gpu.id, 300.0).limit_w == 300.0


def test_gpu_nvml_did_not_open_is_unknown(nvidia_for: Callable[[Path], Opened]) -> None:
    nvidia, _ = nvidia_for(DUAL_A5000)
    result = nvidia.set_power_limit("GPU-no-such-gpu", 150.0)
    assert (result.status, result.limit_w) == ("unknown_gpu", None)


def test_fake_forgets_a_limit_at_the_last_shutdown(library_for: Callable[[Path], Path]) -> None:
    """So that each test starts from the capture (the driver keeps a limit until reboot)."""
    nvml_init(str(library_for(DUAL_A5000)))
    try:
        pynvml.nvmlDeviceSetPowerManagementLimit(pynvml.nvmlDeviceGetHandleByIndex(0), 120_000)
        pynvml.nvmlInit()  # a second user, gone again: the limit stays
        pynvml.nvmlShutdown()
        assert _management_limit_mw(0) == 120_000
    finally:
        pynvml.nvmlShutdown()
    pynvml.nvmlInit()
    try:
        assert _management_limit_mw(0) == 230_000
    finally:
        pynvml.nvmlShutdown()


# ------------------------------------------------------------------------------------ amdgpu


def _mi100(sysfs: Path, **hwmon_files: str | int) -> PciGpu:
    """An MI100 with amdgpu's power cap files (rocm-smi: 290 W cap, 300 W board power)."""
    gpu = add_pci_gpu(
        sysfs,
        card="card0",
        slot="0000:83:00.0",
        pci_id="1002:738C",
        driver="amdgpu",
        device_files={"unique_id": "79ccd55167a2124a", "board_info": "type : oam"},
    )
    files: dict[str, str | int] = {
        "power1_average": 36_000_000,
        "power1_cap": 290_000_000,
        "power1_cap_min": 0,
        "power1_cap_max": 300_000_000,
    }
    files.update(hwmon_files)
    add_hwmon(gpu.device, 2, "amdgpu", files)
    return gpu


def _cap_file(gpu: PciGpu) -> Path:
    return gpu.device / "hwmon" / "hwmon2" / "power1_cap"


def _amdgpu(sysfs: Path, dev: Path) -> AmdgpuSysfsBackend:
    backend = AmdgpuSysfsBackend(HalConfig(sysfs_root=sysfs, dev_root=dev))
    backend.open()
    return backend


def _amd_profile(sysfs: Path, dev: Path) -> GpuProfile:
    return AmdgpuSysfsBackend(HalConfig(sysfs_root=sysfs, dev_root=dev)).open()[0]


def test_amd_cap_within_range_is_written_in_microwatts_and_read_back(
    sysfs: Path, dev: Path
) -> None:
    gpu = _mi100(sysfs)

    result = _amdgpu(sysfs, dev).set_power_limit(MI100_ID, 250.5)

    assert result == PowerLimitResult(gpu_id=MI100_ID, status="set", limit_w=250.5)
    assert _cap_file(gpu).read_text() == "250500000\n"
    assert _amd_profile(sysfs, dev).power_limit_w == 250.5


@pytest.mark.parametrize("watts", [300.5, -1.0, math.nan, math.inf])
def test_amd_cap_outside_the_range_is_out_of_range_and_not_written(
    sysfs: Path, dev: Path, watts: float
) -> None:
    gpu = _mi100(sysfs)

    result = _amdgpu(sysfs, dev).set_power_limit(MI100_ID, watts)

    assert (result.status, result.limit_w) == ("out_of_range", None)
    assert _cap_file(gpu).read_text() == "290000000\n"


def test_amd_cap_range_is_named_when_refused(sysfs: Path, dev: Path) -> None:
    _mi100(sysfs, power1_cap_min=100_000_000)
    result = _amdgpu(sysfs, dev).set_power_limit(MI100_ID, 50.0)
    assert result.status == "out_of_range"
    assert "100-300 W" in result.detail


def test_card_without_a_power_cap_is_unsupported(sysfs: Path, dev: Path) -> None:
    gpu = _mi100(sysfs)
    _cap_file(gpu).unlink()
    result = _amdgpu(sysfs, dev).set_power_limit(MI100_ID, 250.0)
    assert (result.status, result.limit_w) == ("unsupported", None)


_SET_CAP = """
import sys
from pathlib import Path

import msgspec

from hal.backend import HalConfig
from hal.backends.amdgpu import AmdgpuSysfsBackend

backend = AmdgpuSysfsBackend(HalConfig(sysfs_root=Path(sys.argv[1]), dev_root=Path(sys.argv[2])))
gpu = backend.open()[0]
sys.stdout.buffer.write(msgspec.json.encode(backend.set_power_limit(gpu.id, float(sys.argv[3]))))
"""


def _without_dac_override() -> list[str]:
    """A command prefix that runs a program without the right to write others' files.

    Tests run as root here, and root writes a read-only file through CAP_DAC_OVERRIDE; a
    child without that capability gets EACCES from the kernel, as the agent's service user
    does on ``power1_cap`` (0644, owned by root).
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and util-linux's setpriv is missing")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_amd_cap_the_agent_may_not_write_is_permission_denied(sysfs: Path, dev: Path) -> None:
    gpu = _mi100(sysfs)
    _cap_file(gpu).chmod(0o444)

    child = subprocess.run(
        [*_without_dac_override(), sys.executable, "-c", _SET_CAP, str(sysfs), str(dev), "250"],
        capture_output=True,
        check=True,
    )

    result = msgspec.json.decode(child.stdout, type=PowerLimitResult)
    assert (result.status, result.limit_w) == ("permission_denied", None)
    assert "Permission denied" in result.detail
    assert "needs root" in result.detail
    assert _cap_file(gpu).read_text() == "290000000\n"


def test_amd_gpu_the_backend_did_not_open_is_unknown(sysfs: Path, dev: Path) -> None:
    _mi100(sysfs)
    result = _amdgpu(sysfs, dev).set_power_limit("GPU-0000000000000000", 250.0)
    assert result.status == "unknown_gpu"


def test_amd_card_removed_after_open_fails(sysfs: Path, dev: Path) -> None:
    gpu = _mi100(sysfs)
    backend = _amdgpu(sysfs, dev)
    shutil.rmtree(gpu.device)
    result = backend.set_power_limit(MI100_ID, 250.0)
    assert (result.status, result.limit_w) == ("failed", None)


# ------------------------------------------------------------------------ Intel and the HAL


def _uhd620(sysfs: Path) -> PciGpu:
    return add_pci_gpu(sysfs, card="card1", slot="0000:00:02.0", pci_id="8086:5917", driver="i915")


def test_intel_power_limits_are_unsupported(sysfs: Path, dev: Path) -> None:
    _uhd620(sysfs)
    intel = IntelSysfsBackend(HalConfig(sysfs_root=sysfs, dev_root=dev))
    gpu = intel.open()[0]

    result = intel.set_power_limit(gpu.id, 15.0)

    assert result == PowerLimitResult(
        gpu_id=gpu.id,
        status="unsupported",
        limit_w=None,
        detail="the intel backend cannot set power limits",
    )


@pytest.fixture
def machine(library_for: Callable[[Path], Path], tmp_path: Path, control: Path) -> Iterator[Hal]:
    """A HAL over two NVIDIA GPUs (fake NVML), an AMD MI100 and an Intel UHD 620 (sysfs)."""
    _mi100(tmp_path / "sys")
    _uhd620(tmp_path / "sys")
    (tmp_path / "dev").mkdir()
    hal = Hal(nvml_config(library_for(DUAL_A5000), tmp_path, backends=("nvml", "amdgpu", "intel")))
    try:
        hal.open()
        yield hal
    finally:
        hal.close()


def _by_vendor(hal: Hal) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {}
    for gpu in hal.discovery.gpus:
        ids.setdefault(gpu.vendor, []).append(gpu.id)
    return ids


def test_hal_routes_each_gpu_to_its_backend(machine: Hal) -> None:
    ids = _by_vendor(machine)

    nvidia = machine.set_power_limit(ids["nvidia"][1], 200.0)
    amd = machine.set_power_limit(ids["amd"][0], 250.0)
    intel = machine.set_power_limit(ids["intel"][0], 15.0)

    assert (nvidia.status, nvidia.limit_w) == ("set", 200.0)
    assert (amd.status, amd.limit_w) == ("set", 250.0)
    assert (intel.status, intel.detail) == (
        "unsupported",
        "the intel backend cannot set power limits",
    )


def test_hal_keeps_the_discovered_profile_in_step(machine: Hal) -> None:
    first, second = _by_vendor(machine)["nvidia"]

    assert machine.set_power_limit(first, 180.0).status == "set"
    assert machine.set_power_limit(second, 999.0).status == "out_of_range"

    limits = {gpu.id: gpu.power_limit_w for gpu in machine.discovery.gpus}
    assert (limits[first], limits[second]) == (180.0, 230.0)
    # Discovering again (in child processes) reads the same from the driver.
    again = {gpu.id: gpu.power_limit_w for gpu in discover(machine.config).gpus}
    assert (again[first], again[second]) == (180.0, 230.0)


def test_hal_answers_unknown_gpu_for_an_id_it_did_not_discover(machine: Hal) -> None:
    result = machine.set_power_limit("GPU-no-such-gpu", 150.0)
    assert result == PowerLimitResult(
        gpu_id="GPU-no-such-gpu",
        status="unknown_gpu",
        limit_w=None,
        detail="no GPU 'GPU-no-such-gpu' was discovered",
    )


def _set_through_amdsmi_and_amdgpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watts: float
) -> tuple[Discovery, PowerLimitResult]:
    """Set the MI100's cap through a HAL running amdsmi (test_amdsmi's stand-in) then amdgpu."""
    monkeypatch.setitem(sys.modules, "amdsmi", _fake_amdsmi(["handle0"]))
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
    gpu = _mi100(tmp_path / "sys")

    discovery, result = _set_through_amdsmi_and_amdgpu(tmp_path, monkeypatch, 250.0)

    assert [(g.id, g.backend) for g in discovery.gpus] == [(MI100_ID, "amdsmi")]
    assert result == PowerLimitResult(gpu_id=MI100_ID, status="set", limit_w=250.0)
    assert _cap_file(gpu).read_text() == "250000000\n"
    assert discovery.gpus[0].power_limit_w == 250.0


def test_hal_says_why_each_backend_could_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cap_file(_mi100(tmp_path / "sys")).unlink()

    _, result = _set_through_amdsmi_and_amdgpu(tmp_path, monkeypatch, 250.0)

    assert result.status == "unsupported"
    amdsmi, amdgpu = result.detail.split("; ")
    assert amdsmi == "the amdsmi backend cannot set power limits"
    assert amdgpu.endswith("/hwmon2/power1_cap does not exist")

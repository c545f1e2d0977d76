"""The fake libnvidia-ml.so.1 (tests/support/fakenvml), exercised through the real pynvml binding.

pynvml runs in subprocesses (a fresh library state each time, and room for the hang and
crash faults), which print what they read as JSON.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fakenvml import build
from support.paths import CAPTURES, SUPPORT, TXT, XML

H100_MIG = TXT / "linux-x86_64__nvidia-h100-mig__590.48.01.txt"
DUAL_A5000 = XML / "dual_a5000-v13.xml"
A100_MIG = XML / "a100-sxm4-v12.xml"
QUADRO_P400 = XML / "quadro-p400.xml"
BUILD_SCRIPT = SUPPORT / "fakenvml" / "build.py"

NOT_SUPPORTED = "NVMLError_NotSupported"
NO_INSTANCE = 0xFFFFFFFF
MIB = 1024 * 1024

# The start of every subprocess: argv[1] is the library, argv[2] optional JSON input.
PRELUDE = r"""
import ctypes, json, os, sys, time
import pynvml as nv

nv.nvmlLib = ctypes.CDLL(sys.argv[1])
given = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None

def call(fn, *args):
    "The call's result, or the name of the NVMLError it raised."
    try:
        return fn(*args)
    except nv.NVMLError as error:
        return type(error).__name__

def fields(result, *names):
    "Some fields of a returned structure, bytes decoded; an error name as is."
    if isinstance(result, str):
        return result
    values = [getattr(result, name) for name in names]
    return [value.decode() if isinstance(value, bytes) else value for value in values]
"""

# Reads everything the fake serves; given = the GPUs' PCI bus ids.
SNAPSHOT = (
    PRELUDE
    + r"""
def processes(fn, handle):
    result = call(fn, handle)
    if isinstance(result, str):
        return result
    return [[p.pid, p.usedGpuMemory, p.gpuInstanceId, p.computeInstanceId] for p in result]

def field_values(handle):
    values = {}
    for field in nv.nvmlDeviceGetFieldValues(handle, [1, 3, 4, 82, 83, 94, 185, 186]):
        if field.nvmlReturn != nv.NVML_SUCCESS:
            value = type(nv.NVMLError(field.nvmlReturn)).__name__
        elif field.valueType == nv.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG:
            value = field.value.ullVal
        else:
            value = field.value.uiVal
        values[str(field.fieldId)] = value
    return values

def mig(handle):
    parent = call(nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle, handle)
    mig_uuid = call(nv.nvmlDeviceGetUUID, handle)
    return {
        "name": call(nv.nvmlDeviceGetName, handle),
        "uuid": mig_uuid,
        "is_mig": nv.nvmlDeviceIsMigDeviceHandle(handle).value,
        "gpu_instance_id": call(nv.nvmlDeviceGetGpuInstanceId, handle),
        "compute_instance_id": call(nv.nvmlDeviceGetComputeInstanceId, handle),
        "memory_v2": fields(
            call(nv.nvmlDeviceGetMemoryInfo, handle, nv.nvmlMemory_v2),
            "total", "reserved", "used", "free",
        ),
        "cuda_compute_capability": call(nv.nvmlDeviceGetCudaComputeCapability, handle),
        "compute_processes": processes(nv.nvmlDeviceGetComputeRunningProcesses, handle),
        "temperature_gpu_c": call(nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU),
        "parent_uuid": call(nv.nvmlDeviceGetUUID, parent),
        "by_uuid": call(nv.nvmlDeviceGetName, nv.nvmlDeviceGetHandleByUUID(mig_uuid)),
    }

def gpu(handle):
    mig_count = call(nv.nvmlDeviceGetMaxMigDeviceCount, handle)
    migs = []
    for index in range(mig_count):
        mig_handle = call(nv.nvmlDeviceGetMigDeviceHandleByIndex, handle, index)
        migs.append(mig_handle if isinstance(mig_handle, str) else mig(mig_handle))
    return {
        "name": call(nv.nvmlDeviceGetName, handle),
        "uuid": call(nv.nvmlDeviceGetUUID, handle),
        "serial": call(nv.nvmlDeviceGetSerial, handle),
        "vbios_version": call(nv.nvmlDeviceGetVbiosVersion, handle),
        "minor_number": call(nv.nvmlDeviceGetMinorNumber, handle),
        "pci": fields(
            call(nv.nvmlDeviceGetPciInfo, handle),
            "busId", "busIdLegacy", "domain", "bus", "device", "pciDeviceId", "pciSubSystemId",
        ),
        "memory": fields(call(nv.nvmlDeviceGetMemoryInfo, handle), "total", "free", "used"),
        "memory_v2": fields(
            call(nv.nvmlDeviceGetMemoryInfo, handle, nv.nvmlMemory_v2),
            "total", "reserved", "used", "free",
        ),
        "cuda_compute_capability": call(nv.nvmlDeviceGetCudaComputeCapability, handle),
        "power_usage_mw": call(nv.nvmlDeviceGetPowerUsage, handle),
        "power_limit_mw": call(nv.nvmlDeviceGetPowerManagementLimit, handle),
        "enforced_power_limit_mw": call(nv.nvmlDeviceGetEnforcedPowerLimit, handle),
        "default_power_limit_mw": call(nv.nvmlDeviceGetPowerManagementDefaultLimit, handle),
        "power_limit_constraints_mw": call(
            nv.nvmlDeviceGetPowerManagementLimitConstraints, handle
        ),
        "energy_mj": call(nv.nvmlDeviceGetTotalEnergyConsumption, handle),
        "clocks_mhz": [call(nv.nvmlDeviceGetClockInfo, handle, t) for t in range(4)],
        "max_clocks_mhz": [call(nv.nvmlDeviceGetMaxClockInfo, handle, t) for t in range(4)],
        "pcie_link_gen_max": call(nv.nvmlDeviceGetMaxPcieLinkGeneration, handle),
        "pcie_link_gen_gpu_max": call(nv.nvmlDeviceGetGpuMaxPcieLinkGeneration, handle),
        "pcie_link_gen_current": call(nv.nvmlDeviceGetCurrPcieLinkGeneration, handle),
        "pcie_link_width_max": call(nv.nvmlDeviceGetMaxPcieLinkWidth, handle),
        "pcie_link_width_current": call(nv.nvmlDeviceGetCurrPcieLinkWidth, handle),
        "pcie_replay_counter": call(nv.nvmlDeviceGetPcieReplayCounter, handle),
        "ecc_mode": call(nv.nvmlDeviceGetEccMode, handle),
        "ecc_errors": [
            [call(nv.nvmlDeviceGetTotalEccErrors, handle, kind, counter) for counter in (0, 1)]
            for kind in (0, 1)
        ],
        "mig_mode": call(nv.nvmlDeviceGetMigMode, handle),
        "numa_node_id": call(nv.nvmlDeviceGetNumaNodeId, handle),
        "performance_state": call(nv.nvmlDeviceGetPerformanceState, handle),
        "utilization_pct": fields(
            call(nv.nvmlDeviceGetUtilizationRates, handle), "gpu", "memory"
        ),
        "encoder_utilization": call(nv.nvmlDeviceGetEncoderUtilization, handle),
        "decoder_utilization": call(nv.nvmlDeviceGetDecoderUtilization, handle),
        "temperature_gpu_c": call(nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU),
        "fan_speed_pct": call(nv.nvmlDeviceGetFanSpeed, handle),
        "clocks_event_reasons": call(nv.nvmlDeviceGetCurrentClocksEventReasons, handle),
        "clocks_throttle_reasons": call(nv.nvmlDeviceGetCurrentClocksThrottleReasons, handle),
        "compute_processes": processes(nv.nvmlDeviceGetComputeRunningProcesses, handle),
        "graphics_processes": processes(nv.nvmlDeviceGetGraphicsRunningProcesses, handle),
        "field_values": field_values(handle),
        "max_mig_device_count": mig_count,
        "migs": migs,
    }

nv.nvmlInit()
count = nv.nvmlDeviceGetCount()
print(json.dumps({
    "count": count,
    "driver_version": call(nv.nvmlSystemGetDriverVersion),
    "nvml_version": call(nv.nvmlSystemGetNVMLVersion),
    "cuda_driver_version": call(nv.nvmlSystemGetCudaDriverVersion),
    "cuda_driver_version_v2": call(nv.nvmlSystemGetCudaDriverVersion_v2),
    "gpus": [gpu(nv.nvmlDeviceGetHandleByIndex(index)) for index in range(count)],
    "by_pci_bus_id": [
        call(nv.nvmlDeviceGetName, nv.nvmlDeviceGetHandleByPciBusId(bus_id)) for bus_id in given
    ],
}))
nv.nvmlShutdown()
"""
)


def pynvml_env(env: dict[str, str] | None) -> dict[str, str]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("FAKENVML")}
    return {**clean, **(env or {})}


def run_pynvml(
    library: Path, script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, str(library), *args],
        env=pynvml_env(env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def read_pynvml(library: Path, script: str, *args: str, env: dict[str, str] | None = None) -> Any:
    result = run_pynvml(library, PRELUDE + script, *args, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ------------------------------------------------------- every capture, through pynvml


def each(value: object) -> object:
    """What a single-value call serves."""
    return NOT_SUPPORTED if value is None else value


def whole(*values: object) -> object:
    """What a structure-filling call serves: all of its values, or nothing."""
    return NOT_SUPPORTED if any(value is None for value in values) else list(values)


def flag(value: bool | None) -> int | None:
    return None if value is None else int(value)


def sampled(utilization: int | None) -> object:
    return whole(utilization, build.UTILIZATION_SAMPLING_PERIOD_US)


def expected_processes(processes: tuple[build.Process, ...] | None, kind: str) -> object:
    if processes is None:
        return NOT_SUPPORTED
    return [
        [
            process.pid,
            process.used_memory_bytes,
            NO_INSTANCE if process.gpu_instance_id is None else process.gpu_instance_id,
            NO_INSTANCE if process.compute_instance_id is None else process.compute_instance_id,
        ]
        for process in processes
        if kind in process.type
    ]


def expected_mig(gpu: build.Gpu, mig: build.MigDevice) -> dict[str, object]:
    in_mig = tuple(
        process
        for process in gpu.processes or ()
        if (process.gpu_instance_id, process.compute_instance_id)
        == (mig.gpu_instance_id, mig.compute_instance_id)
    )
    return {
        "name": mig.name,
        "uuid": mig.uuid,
        "is_mig": 1,
        "gpu_instance_id": mig.gpu_instance_id,
        "compute_instance_id": mig.compute_instance_id,
        "memory_v2": whole(
            mig.memory_total_bytes,
            mig.memory_reserved_bytes,
            mig.memory_used_bytes,
            mig.memory_free_bytes,
        ),
        "cuda_compute_capability": whole(*(gpu.cuda_compute_capability or (None,))),
        "compute_processes": expected_processes(None if gpu.processes is None else in_mig, "C"),
        "temperature_gpu_c": NOT_SUPPORTED,
        "parent_uuid": gpu.uuid,
        "by_uuid": mig.name,
    }


def expected_gpu(gpu: build.Gpu) -> dict[str, object]:
    total, free = gpu.memory_total_bytes, gpu.memory_free_bytes
    legacy = f"{gpu.pci_domain:04X}:{gpu.pci_bus:02X}:{gpu.pci_device:02X}.0"
    migs: list[object] = []
    if gpu.mig_mode_current:
        migs = [expected_mig(gpu, mig) for mig in gpu.mig_devices]
        migs += ["NVMLError_NotFound"] * (build.MAX_MIG_DEVICES - len(migs))
    return {
        "name": gpu.name,
        "uuid": gpu.uuid,
        "serial": each(gpu.serial),
        "vbios_version": each(gpu.vbios_version),
        "minor_number": each(gpu.minor_number),
        "pci": whole(
            gpu.pci_bus_id,
            legacy,
            gpu.pci_domain,
            gpu.pci_bus,
            gpu.pci_device,
            gpu.pci_device_id,
            gpu.pci_subsystem_id,
        ),
        "memory": NOT_SUPPORTED if total is None or free is None else [total, free, total - free],
        "memory_v2": whole(
            total, gpu.memory_reserved_bytes, gpu.memory_used_bytes, gpu.memory_free_bytes
        ),
        "cuda_compute_capability": whole(*(gpu.cuda_compute_capability or (None,))),
        "power_usage_mw": each(gpu.power_usage_mw),
        "power_limit_mw": each(gpu.power_limit_mw),
        "enforced_power_limit_mw": each(gpu.enforced_power_limit_mw),
        "default_power_limit_mw": each(gpu.default_power_limit_mw),
        "power_limit_constraints_mw": whole(gpu.min_power_limit_mw, gpu.max_power_limit_mw),
        "clocks_mhz": [
            each(gpu.clock_graphics_mhz),
            each(gpu.clock_sm_mhz),
            each(gpu.clock_memory_mhz),
            each(gpu.clock_video_mhz),
        ],
        "max_clocks_mhz": [
            each(gpu.max_clock_graphics_mhz),
            each(gpu.max_clock_sm_mhz),
            each(gpu.max_clock_memory_mhz),
            each(gpu.max_clock_video_mhz),
        ],
        "pcie_link_gen_max": each(gpu.pcie_link_gen_max),
        "pcie_link_gen_gpu_max": each(gpu.pcie_link_gen_gpu_max),
        "pcie_link_gen_current": each(gpu.pcie_link_gen_current),
        "pcie_link_width_max": each(gpu.pcie_link_width_max),
        "pcie_link_width_current": each(gpu.pcie_link_width_current),
        "pcie_replay_counter": each(gpu.pcie_replay_counter),
        "ecc_mode": whole(flag(gpu.ecc_mode_current), flag(gpu.ecc_mode_pending)),
        "ecc_errors": [
            [each(gpu.ecc_corrected_volatile), each(gpu.ecc_corrected_aggregate)],
            [each(gpu.ecc_uncorrected_volatile), each(gpu.ecc_uncorrected_aggregate)],
        ],
        "mig_mode": whole(flag(gpu.mig_mode_current), flag(gpu.mig_mode_pending)),
        "numa_node_id": each(gpu.numa_node_id),
        "performance_state": each(gpu.performance_state),
        "utilization_pct": whole(gpu.utilization_gpu_pct, gpu.utilization_memory_pct),
        "encoder_utilization": sampled(gpu.utilization_encoder_pct),
        "decoder_utilization": sampled(gpu.utilization_decoder_pct),
        "temperature_gpu_c": each(gpu.temperature_gpu_c),
        "fan_speed_pct": each(gpu.fan_speed_pct),
        "clocks_event_reasons": each(gpu.clocks_event_reasons),
        "clocks_throttle_reasons": each(gpu.clocks_event_reasons),
        "compute_processes": expected_processes(gpu.processes, "C"),
        "graphics_processes": expected_processes(gpu.processes, "G"),
        "field_values": {
            "1": NOT_SUPPORTED,  # a field the fake does not know
            "3": each(gpu.ecc_corrected_volatile),
            "4": each(gpu.ecc_uncorrected_volatile),
            "82": each(gpu.temperature_memory_c),
            "94": each(gpu.pcie_replay_counter),
            "185": each(gpu.power_average_mw),
            "186": each(gpu.power_instant_mw),
        },
        "max_mig_device_count": build.MAX_MIG_DEVICES if gpu.mig_mode_current else 0,
        "migs": migs,
    }


def check_energy(gpu: build.Gpu, served: object) -> None:
    if gpu.power_usage_mw is None:
        assert served == NOT_SUPPORTED
    else:
        assert isinstance(served, int)
        assert served >= build.ENERGY_BASE_MJ


@pytest.mark.parametrize("capture_path", CAPTURES, ids=[path.name for path in CAPTURES])
def test_capture_is_served_through_pynvml(
    capture_path: Path, library_for: Callable[[Path], Path]
) -> None:
    capture = build.parse_capture(capture_path)
    bus_ids = [gpu.pci_bus_id for gpu in capture.gpus]
    result = run_pynvml(library_for(capture_path), SNAPSHOT, json.dumps(bus_ids))
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout)

    assert served["count"] == len(capture.gpus)
    assert served["driver_version"] == each(capture.driver_version)
    assert served["nvml_version"] == each(capture.nvml_version)
    assert served["cuda_driver_version"] == each(capture.cuda_driver_version)
    assert served["cuda_driver_version_v2"] == each(capture.cuda_driver_version)
    assert served["by_pci_bus_id"] == [gpu.name for gpu in capture.gpus]
    for gpu, served_gpu in zip(capture.gpus, served["gpus"], strict=True):
        check_energy(gpu, served_gpu.pop("energy_mj"))
        check_energy(gpu, served_gpu["field_values"].pop("83"))
        assert served_gpu == expected_gpu(gpu)


# ---------------------------------------------------------------- what the parser reads


@pytest.mark.gcc  # build.py, run as a command, calls gcc
def test_xml_capture_mig_instances_are_profiled_by_gpu_agent(tmp_path: Path) -> None:
    """The XML's MIG devices reach `gpu-agent profile --json` through the real binding."""
    built = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--xml", str(A100_MIG), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    env = {
        **os.environ,
        "GPU_AGENT_NVML_LIB": built.stdout.strip().splitlines()[-1],
        "GPU_AGENT_SYSFS_ROOT": str(tmp_path),
        "DOCKER_HOST": f"unix://{tmp_path / 'docker.sock'}",
    }
    shown = subprocess.run(
        [sys.executable, "-m", "agent.cli", "profile", "--json"],
        capture_output=True,
        env=env,
        check=True,
        timeout=120,
    )
    gpus = json.loads(shown.stdout)["gpus"]
    assert [g["kind"] for g in gpus] == ["discrete", "mig", "mig", "mig", "mig"]
    parent, migs = gpus[0], gpus[1:]
    assert (parent["name"], parent["mig_enabled"]) == ("NVIDIA A100-SXM4-80GB", True)
    assert {m["parent_uuid"] for m in migs} == {parent["uuid"]}
    assert [m["vram_total_bytes"] for m in migs] == [19968 * MIB] * 4
    assert len({m["uuid"] for m in migs}) == 4


# --------------------------------------------------------------- building and exports


def exported(library: Path) -> set[str]:
    listing = subprocess.run(
        ["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True
    )
    return {line.split()[-1] for line in listing.stdout.splitlines() if line.strip()}


def test_library_exports_exactly_the_nvml_symbols(library_for: Callable[[Path], Path]) -> None:
    assert exported(library_for(H100_MIG)) == set(build.EXPORTED_SYMBOLS)


def test_omitted_function_is_not_found(tmp_path: Path) -> None:
    omit = ["nvmlDeviceGetPowerUsage", "nvmlDeviceGetMemoryInfo_v2"]
    library = build.build_library(build.parse_capture(H100_MIG), tmp_path, omit=omit)
    assert exported(library) == set(build.EXPORTED_SYMBOLS) - set(omit)
    served = read_pynvml(
        library,
        """
nv.nvmlInit()
handle = nv.nvmlDeviceGetHandleByIndex(0)
print(json.dumps([
    call(nv.nvmlDeviceGetPowerUsage, handle),
    call(nv.nvmlDeviceGetMemoryInfo, handle, nv.nvmlMemory_v2),
    call(nv.nvmlDeviceGetName, handle),
]))
""",
    )
    assert served == [
        "NVMLError_FunctionNotFound",
        "NVMLError_FunctionNotFound",
        "NVIDIA H100 80GB HBM3",
    ]


def test_omitting_an_unknown_function_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nvmlDeviceGetBrand"):
        build.build_library(build.parse_capture(H100_MIG), tmp_path, omit=["nvmlDeviceGetBrand"])


@pytest.mark.gcc  # build.py, run as a command, calls gcc
def test_command_line_builds_and_prints_the_library(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BUILD_SCRIPT),
            "--xml",
            str(DUAL_A5000),
            "--out",
            str(tmp_path),
            "--omit",
            "nvmlDeviceGetFanSpeed",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    library = tmp_path / build.LIBRARY_NAME
    assert result.stdout.strip() == str(library)
    assert "nvmlDeviceGetFanSpeed" not in exported(library)


# ------------------------------------------------------------------------ fault injection

INIT = """
print("calling nvmlInit", flush=True)
print(json.dumps([call(nv.nvmlInit), call(nv.nvmlDeviceGetCount)]))
"""


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("DRIVER_NOT_LOADED", "NVMLError_DriverNotLoaded"),
        ("NVML_ERROR_NO_PERMISSION", "NVMLError_NoPermission"),
        ("18", "NVMLError_LibRmVersionMismatch"),
    ],
)
def test_init_result_is_injected(
    value: str, error: str, library_for: Callable[[Path], Path]
) -> None:
    result = run_pynvml(library_for(H100_MIG), PRELUDE + INIT, env={"FAKENVML_INIT_RESULT": value})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [error, "NVMLError_Uninitialized"]


def test_init_hangs(library_for: Callable[[Path], Path]) -> None:
    command = [sys.executable, "-c", PRELUDE + INIT, str(library_for(H100_MIG))]
    env = pynvml_env({"FAKENVML_INIT_HANG": "1"})
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        assert child.stdout.readline() == "calling nvmlInit\n"
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1)
        child.kill()


def test_init_crashes(library_for: Callable[[Path], Path]) -> None:
    result = run_pynvml(library_for(H100_MIG), PRELUDE + INIT, env={"FAKENVML_INIT_CRASH": "1"})
    assert result.returncode == -signal.SIGSEGV
    assert "calling nvmlInit" in result.stdout


LOSE_AND_RECOVER = """
control = os.environ["FAKENVML_CONTROL"]
nv.nvmlInit()
gpus = [nv.nvmlDeviceGetHandleByIndex(index) for index in range(nv.nvmlDeviceGetCount())]

def outcome(result):
    "An error name, or ok."
    return result if isinstance(result, str) else "ok"

def snapshot():
    return {
        "names": [call(nv.nvmlDeviceGetName, handle) for handle in gpus],
        "handle_0": outcome(call(nv.nvmlDeviceGetHandleByIndex, 0)),
        "memory_0": outcome(call(nv.nvmlDeviceGetMemoryInfo, gpus[0])),
    }

steps = [snapshot()]
with open(control, "w") as file:
    file.write("# a fault\\nlost 0\\n")
steps.append(snapshot())
os.unlink(control)
steps.append(snapshot())
print(json.dumps(steps))
"""


def test_lost_gpu_comes_back(tmp_path: Path, library_for: Callable[[Path], Path]) -> None:
    control = tmp_path / "control"
    steps = read_pynvml(
        library_for(DUAL_A5000), LOSE_AND_RECOVER, env={"FAKENVML_CONTROL": str(control)}
    )
    healthy = {"names": ["NVIDIA RTX A5000"] * 2, "handle_0": "ok", "memory_0": "ok"}
    lost = {
        "names": ["NVMLError_GpuIsLost", "NVIDIA RTX A5000"],
        "handle_0": "NVMLError_GpuIsLost",
        "memory_0": "NVMLError_GpuIsLost",
    }
    assert steps == [healthy, lost, healthy]


def test_lost_gpu_takes_its_mig_devices(
    tmp_path: Path, library_for: Callable[[Path], Path]
) -> None:
    control = tmp_path / "control"
    served = read_pynvml(
        library_for(H100_MIG),
        """
nv.nvmlInit()
mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(nv.nvmlDeviceGetHandleByIndex(0), 0)
with open(os.environ["FAKENVML_CONTROL"], "w") as file:
    file.write("lost 0\\n")
mig_uuid = "MIG-00000000-0000-0000-0000-000000000000"
lost = [call(nv.nvmlDeviceGetName, mig), call(nv.nvmlDeviceGetHandleByUUID, mig_uuid)]
with open(os.environ["FAKENVML_CONTROL"], "w") as file:
    file.write("")
print(json.dumps(lost + [call(nv.nvmlDeviceGetName, mig)]))
""",
        env={"FAKENVML_CONTROL": str(control)},
    )
    assert served == [
        "NVMLError_GpuIsLost",
        "NVMLError_GpuIsLost",
        "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
    ]


# ------------------------------------------------------------------------ other behaviour


def test_energy_grows_with_power_draw(library_for: Callable[[Path], Path]) -> None:
    power_mw = build.parse_txt(H100_MIG).gpus[0].power_usage_mw
    assert power_mw is not None
    first, second, shortest, longest = read_pynvml(
        library_for(H100_MIG),
        """
nv.nvmlInit()
handle = nv.nvmlDeviceGetHandleByIndex(0)
before_first = time.monotonic()
first = nv.nvmlDeviceGetTotalEnergyConsumption(handle)
after_first = time.monotonic()
time.sleep(0.2)
before_second = time.monotonic()
second = nv.nvmlDeviceGetTotalEnergyConsumption(handle)
after_second = time.monotonic()
print(json.dumps([first, second, before_second - after_first, after_second - before_first]))
""",
    )
    assert first >= build.ENERGY_BASE_MJ
    # mJ = mW x s; the fake counts whole milliseconds.
    slack_mj = power_mw * 0.002
    assert power_mw * shortest - slack_mj <= second - first <= power_mw * longest + slack_mj


def test_energy_is_not_supported_without_power_draw(library_for: Callable[[Path], Path]) -> None:
    served = read_pynvml(
        library_for(QUADRO_P400),
        """
nv.nvmlInit()
print(json.dumps(call(nv.nvmlDeviceGetTotalEnergyConsumption, nv.nvmlDeviceGetHandleByIndex(0))))
""",
    )
    assert served == NOT_SUPPORTED


# nvmlReturn_t values
SUCCESS, UNINITIALIZED, INVALID_ARGUMENT, NOT_FOUND, INSUFFICIENT_SIZE = 0, 1, 2, 6, 7
NOT_SUPPORTED_CODE, ARGUMENT_VERSION_MISMATCH = 3, 25


@pytest.fixture
def nvml(library_for: Callable[[Path], Path]) -> Iterator[ctypes.CDLL]:
    """The H100 MIG fake loaded into this process, not initialised; shut down afterwards."""
    library = ctypes.CDLL(str(library_for(H100_MIG)))
    library.nvmlErrorString.restype = ctypes.c_char_p
    yield library
    while library.nvmlShutdown() == SUCCESS:
        pass


def test_calls_before_init_are_uninitialized(nvml: ctypes.CDLL) -> None:
    count = ctypes.c_uint()
    handle = ctypes.c_void_p()
    assert nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == UNINITIALIZED
    assert nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) == UNINITIALIZED
    assert nvml.nvmlShutdown() == UNINITIALIZED
    assert nvml.nvmlErrorString(15) == b"GPU is lost"


def test_init_is_reference_counted(nvml: ctypes.CDLL) -> None:
    count = ctypes.c_uint()
    assert nvml.nvmlInit() == SUCCESS
    assert nvml.nvmlInit_v2() == SUCCESS
    assert nvml.nvmlShutdown() == SUCCESS
    assert nvml.nvmlDeviceGetCount(ctypes.byref(count)) == SUCCESS
    assert count.value == 1
    assert nvml.nvmlShutdown() == SUCCESS
    assert nvml.nvmlDeviceGetCount(ctypes.byref(count)) == UNINITIALIZED


def test_bad_arguments(nvml: ctypes.CDLL) -> None:
    assert nvml.nvmlInitWithFlags(0) == SUCCESS
    handle = ctypes.c_void_p()
    assert nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) == SUCCESS
    assert handle.value is not None
    value = ctypes.c_uint()
    assert nvml.nvmlDeviceGetHandleByIndex_v2(1, ctypes.byref(handle)) == INVALID_ARGUMENT
    assert nvml.nvmlDeviceGetFanSpeed(ctypes.c_void_p(handle.value + 1), ctypes.byref(value)) == (
        INVALID_ARGUMENT
    )
    assert nvml.nvmlDeviceGetFanSpeed(ctypes.c_void_p(8), ctypes.byref(value)) == INVALID_ARGUMENT
    assert nvml.nvmlDeviceGetFanSpeed(handle, None) == INVALID_ARGUMENT
    assert nvml.nvmlDeviceGetFanSpeed(handle, ctypes.byref(value)) == NOT_SUPPORTED_CODE
    assert nvml.nvmlDeviceGetTemperature(handle, 1, ctypes.byref(value)) == INVALID_ARGUMENT
    assert nvml.nvmlDeviceGetClockInfo(handle, 4, ctypes.byref(value)) == INVALID_ARGUMENT

    name = ctypes.create_string_buffer(8)
    assert nvml.nvmlDeviceGetName(handle, name, 8) == INSUFFICIENT_SIZE

    memory = (ctypes.c_uint * 10)()  # an nvmlMemory_v2_t with a wrong version
    assert nvml.nvmlDeviceGetMemoryInfo_v2(handle, memory) == ARGUMENT_VERSION_MISMATCH

    found = ctypes.c_void_p()
    assert nvml.nvmlDeviceGetHandleByUUID(b"GPU-nope", ctypes.byref(found)) == NOT_FOUND
    for bus_id in (b"00000000:00:09.0", b"0000:00:09.0", b"00:09.0", b"0:0:9.0"):
        assert nvml.nvmlDeviceGetHandleByPciBusId_v2(bus_id, ctypes.byref(found)) == SUCCESS
        assert found.value == handle.value
    assert nvml.nvmlDeviceGetHandleByPciBusId_v2(b"bogus", ctypes.byref(found)) == (
        INVALID_ARGUMENT
    )


def test_process_list_size_protocol(library_for: Callable[[Path], Path]) -> None:
    library = ctypes.CDLL(str(library_for(XML / "rtx-4000-sff-ada-v13.xml")))
    assert library.nvmlInit() == SUCCESS
    try:
        handle = ctypes.c_void_p()
        assert library.nvmlDeviceGetHandleByIndex(0, ctypes.byref(handle)) == SUCCESS
        count = ctypes.c_uint(0)
        fn = library.nvmlDeviceGetGraphicsRunningProcesses_v3
        assert fn(handle, ctypes.byref(count), None) == INSUFFICIENT_SIZE
        assert count.value == 3  # two G processes and one C+G
        infos = (ctypes.c_ubyte * (24 * count.value))()  # nvmlProcessInfo_t is 24 bytes
        assert fn(handle, ctypes.byref(count), infos) == SUCCESS
        assert count.value == 3
    finally:
        assert library.nvmlShutdown() == SUCCESS

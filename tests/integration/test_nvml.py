"""The NVML boundary (hal/backends/nvml.py): each NVML return code, served by the fake
libnvidia-ml.so.1 through the real pynvml binding, becomes the HAL error and the reading its
table says, and never a pynvml exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.fakenvml import build
from support.nvml import write_control
from support.paths import XML

from hal.backends import nvml
from hal.errors import BackendUnavailable, CallFailed, DeviceLost
from hal.types import UNSUPPORTED, Unavailable

DUAL_A5000 = XML / "dual_a5000-v13.xml"
QUADRO_P400 = XML / "quadro-p400.xml"  # "N/A" for every power value

Open = Callable[[Path], list[nvml.Handle]]


@pytest.fixture
def opened(control: Path) -> Iterator[Open]:
    """Initialises NVML on a fake library and gives its GPUs' handles; shuts it down after."""
    inits = 0

    def open_library(library: Path) -> list[nvml.Handle]:
        nonlocal inits
        nvml.init(str(library))
        inits += 1
        return [nvml.handle_by_index(index) for index in range(nvml.device_count())]

    yield open_library
    for _ in range(inits):
        nvml.shutdown()


def _failed(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(CallFailed) as failed:
        call()
    return failed.value.code, failed.value.detail


def test_a_value_is_the_value(opened: Open, library_for: Callable[[Path], Path]) -> None:
    first, _ = opened(library_for(DUAL_A5000))
    want = build.parse_capture(DUAL_A5000).gpus[0]
    assert first.uuid() == want.uuid
    assert nvml.reading(first.uuid) == want.uuid
    assert nvml.reading(first.power_limit_range_w) == (100.0, 230.0)  # mW in NVML


def test_not_supported_is_unsupported(opened: Open, library_for: Callable[[Path], Path]) -> None:
    (p400,) = opened(library_for(QUADRO_P400))
    assert _failed(p400.power_w) == ("unsupported", "Not Supported")
    assert nvml.reading(p400.power_w) is UNSUPPORTED


def test_a_function_the_driver_lacks_is_unsupported(opened: Open, tmp_path: Path) -> None:
    capture = build.parse_capture(DUAL_A5000)
    library = build.build_library(capture, tmp_path / "lib", omit=["nvmlDeviceGetFanSpeed"])
    first, _ = opened(library)
    assert _failed(first.fan_pct) == ("unsupported", "Function Not Found")
    assert nvml.reading(first.fan_pct) is UNSUPPORTED


def test_not_found_is_unsupported_as_a_reading(
    opened: Open, library_for: Callable[[Path], Path]
) -> None:
    opened(library_for(DUAL_A5000))
    unknown = "GPU-00000000-0000-0000-0000-000000000000"
    assert _failed(lambda: nvml.handle_by_uuid(unknown)) == ("not_found", "Not Found")
    assert nvml.reading(nvml.handle_by_uuid, unknown) is UNSUPPORTED


def test_no_permission_is_unavailable_permission_denied(
    opened: Open, library_for: Callable[[Path], Path], control: Path
) -> None:
    first, _ = opened(library_for(DUAL_A5000))
    write_control(control, "nopermission 0\n")
    detail = "Insufficient Permissions"
    assert _failed(lambda: first.set_power_limit_w(150)) == ("permission_denied", detail)
    assert nvml.reading(first.set_power_limit_w, 150) == Unavailable("permission_denied", detail)


def test_invalid_argument_is_its_own_code_and_unavailable_as_a_reading(
    opened: Open, library_for: Callable[[Path], Path]
) -> None:
    first, _ = opened(library_for(DUAL_A5000))
    assert _failed(lambda: first.set_power_limit_w(1000)) == (
        "invalid_argument",
        "Invalid Argument",
    )
    assert nvml.reading(first.set_power_limit_w, 1000) == Unavailable(
        "nvml_error", "Invalid Argument"
    )


def test_an_empty_event_set_is_a_timeout(opened: Open, library_for: Callable[[Path], Path]) -> None:
    opened(library_for(DUAL_A5000))
    events = nvml.EventSet()
    try:
        assert _failed(events.next_event) == ("timeout", "Timeout")
        assert nvml.reading(events.next_event) == Unavailable("nvml_error", "Timeout")
    finally:
        events.free()
    assert _failed(events.free)[0] == "invalid_argument"  # freed once


def test_any_other_code_is_nvml_error(library_for: Callable[[Path], Path]) -> None:
    nvml.init(str(library_for(DUAL_A5000)))
    first = nvml.handle_by_index(0)
    nvml.shutdown()
    assert _failed(first.uuid) == ("nvml_error", "Uninitialized")
    assert nvml.reading(first.uuid) == Unavailable("nvml_error", "Uninitialized")


def test_a_lost_gpu_raises_device_lost_even_as_a_reading(
    opened: Open, library_for: Callable[[Path], Path], control: Path
) -> None:
    first, second = opened(library_for(DUAL_A5000))
    write_control(control, "lost 0\n")
    for call in (first.uuid, lambda: nvml.reading(first.uuid), lambda: nvml.handle_by_index(0)):
        with pytest.raises(DeviceLost) as lost:
            call()
        assert (lost.value.code, lost.value.detail) == ("gpu_lost", "GPU is lost")
    assert isinstance(second.uuid(), str)


def test_each_batched_field_is_mapped_alone(
    opened: Open, library_for: Callable[[Path], Path], control: Path
) -> None:
    (p400,) = opened(library_for(QUADRO_P400))
    power, replays = p400.field_values(["power_w", "pcie_replay_count"])
    assert power is UNSUPPORTED
    assert replays == build.parse_capture(QUADRO_P400).gpus[0].pcie_replay_counter
    write_control(control, "lost 0\n")
    with pytest.raises(DeviceLost):
        p400.field_values(["power_w"])


@pytest.mark.parametrize(
    ("init_result", "code"),
    [
        ("DRIVER_NOT_LOADED", "driver_not_loaded"),
        ("LIB_RM_VERSION_MISMATCH", "driver_library_mismatch"),
        ("NO_PERMISSION", "permission_denied"),
        ("UNKNOWN", "library_error"),
    ],
)
def test_init_failures_disable_the_backend_with_a_code(
    init_result: str,
    code: str,
    library_for: Callable[[Path], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKENVML_INIT_RESULT", init_result)
    with pytest.raises(BackendUnavailable) as unavailable:
        nvml.init(str(library_for(DUAL_A5000)))
    assert unavailable.value.code == code
    assert unavailable.value.detail.startswith("NVML: ")
    with pytest.raises(BackendUnavailable) as uncounted:
        nvml.device_count()  # NVML was never initialised
    assert uncounted.value.code == "library_error"


def test_a_library_that_will_not_load_is_library_missing(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable) as missing:
        nvml.init(str(tmp_path / "libnvidia-ml.so.1"))
    assert missing.value.code == "library_missing"

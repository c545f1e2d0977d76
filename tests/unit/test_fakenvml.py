"""The fake libnvidia-ml.so.1 (tests/support/fakenvml), exercised through the real pynvml binding.

These tests need nothing outside this process; the others are in
tests/integration/test_fakenvml.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from support.fakenvml import build
from support.paths import FIXTURES, TXT, XML

H100_MIG = TXT / "linux-x86_64__nvidia-h100-mig__590.48.01.txt"


H200_MIG = TXT / "linux-x86_64__nvidia-h200-mig__590.48.01.txt"


A100_MIG = XML / "a100-sxm4-v12.xml"


MIB = 1024 * 1024


def first_gpu(name: str) -> build.Gpu:
    return build.parse_capture(XML / name if name.endswith(".xml") else TXT / name).gpus[0]


@pytest.mark.parametrize(
    ("capture", "attribute", "expected"),
    [
        # Old schema: single power_draw, power_limit / enforced_power_limit, bare hex ids.
        ("gtx-1660-ti.xml", "power_usage_mw", 8930),
        ("gtx-1660-ti.xml", "pci_subsystem_id", 0x3FC81458),
        ("gtx-1660-ti.xml", "memory_reserved_bytes", None),
        ("quadro-p400.xml", "power_usage_mw", None),
        # v12: gpu_power_readings with a single power_draw.
        ("rtx-3080-v12.xml", "power_usage_mw", 22780),
        ("rtx-3080-v12.xml", "default_power_limit_mw", 320_000),
        ("rtx-3090-v12.xml", "pci_device_id", None),  # "[REDACTED]"
        ("rtx-3090-v12.xml", "power_limit_mw", 200_000),
        # v13: average and instantaneous draw, clocks_event_reasons.
        ("3090-v13.xml", "power_usage_mw", 35060),
        ("3090-v13.xml", "power_instant_mw", 35150),
        ("3090-v13.xml", "clocks_event_reasons", 0x4),  # SW power cap
        ("dual_a5000-v13.xml", "memory_used_bytes", 22437 * 1024 * 1024),
        ("tesla-t4.xml", "ecc_corrected_volatile", 0),
        ("tesla-t4.xml", "pcie_link_width_current", 8),
        ("tesla_p4.xml", "clocks_event_reasons", None),  # the whole section is N/A
        ("gtx-1070-ti.xml", "processes", None),
        # -q text, 590 to 610 drivers, Linux and Windows.
        ("linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt", "power_usage_mw", 69850),
        ("linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt", "temperature_memory_c", 48),
        ("linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt", "pcie_replay_counter", 9),
        ("linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt", "cuda_compute_capability", (9, 0)),
        ("linux-x86_64__nvidia-h100-mig__590.48.01.txt", "utilization_gpu_pct", None),
        ("linux-x86_64__nvidia-l40s__595.80.txt", "power_instant_mw", 119880),
        ("linux-x86_64__nvidia-geforce-rtx-2080-super__610.57.04.txt", "power_limit_mw", 250_000),
        ("linux-x86_64__nvidia-geforce-rtx-2080-super__610.57.04.txt", "fan_speed_pct", 38),
        ("windows-x86_64__nvidia-geforce-rtx-2080-super__610.62.txt", "minor_number", None),
        ("windows-x86_64__nvidia-geforce-rtx-2080-super__610.62.txt", "performance_state", 8),
    ],
)
def test_parser_reads(capture: str, attribute: str, expected: object) -> None:
    assert getattr(first_gpu(capture), attribute) == expected


def test_parser_reads_processes() -> None:
    linux = first_gpu("linux-x86_64__nvidia-geforce-rtx-2080-super__595.71.05.txt").processes
    assert linux is not None
    assert [(p.pid, p.type, p.used_memory_bytes) for p in linux] == [
        (1696, "G", 176 * 1024 * 1024),
        (4584, "G", 3 * 1024 * 1024),
    ]
    windows = first_gpu("windows-x86_64__nvidia-geforce-rtx-2080-super__610.62.txt").processes
    assert windows is not None
    assert windows[0] == build.Process(
        2140, "C+G", r"C:\Windows\System32\dwm.exe", None, None, None
    )


def test_parser_reads_versions() -> None:
    windows = build.parse_txt(TXT / "windows-x86_64__nvidia-geforce-rtx-2080-super__610.62.txt")
    assert (windows.driver_version, windows.cuda_version) == ("610.62", "13.3")
    assert (windows.cuda_driver_version, windows.nvml_version) == (13030, "13.610.62")
    cut_down = build.parse_xml(XML / "gtx-1070-ti.xml")
    assert (cut_down.driver_version, cut_down.nvml_version) == (None, None)


def test_parser_reads_mig_devices() -> None:
    (gpu,) = build.parse_txt(H200_MIG).gpus
    assert [(m.index, m.gpu_instance_id, m.compute_instance_id) for m in gpu.mig_devices] == [
        (0, 2, 0),
        (1, 2, 1),
        (2, 3, 0),
        (3, 9, 0),
        (4, 10, 0),
    ]
    assert gpu.mig_devices[1].name == "NVIDIA H200 MIG 2c.3g.71gb"
    assert gpu.mig_devices[1].uuid == "MIG-00000001-0000-0000-0000-000000000001"
    assert gpu.mig_devices[1].memory_total_bytes == 71424 * 1024 * 1024


def test_xml_parser_reads_mig_devices() -> None:
    """<mig_devices> nests each <mig_device>, whose memory is its <fb_memory_usage>."""
    (gpu,) = build.parse_xml(A100_MIG).gpus
    assert gpu.mig_mode_current is True
    assert [(m.index, m.gpu_instance_id, m.compute_instance_id) for m in gpu.mig_devices] == [
        (0, 3, 0),
        (1, 4, 0),
        (2, 5, 0),
        (3, 6, 0),
    ]
    mig = gpu.mig_devices[0]
    assert mig.name == "NVIDIA A100-SXM4-80GB MIG"  # the XML has no profile name
    key = f"{gpu.uuid}/{mig.gpu_instance_id}/{mig.compute_instance_id}"
    assert mig.uuid == f"MIG-{uuid.uuid5(uuid.NAMESPACE_OID, key)}"
    memory = (mig.memory_total_bytes, mig.memory_used_bytes, mig.memory_free_bytes)
    assert memory == (19968 * MIB, 12 * MIB, 19955 * MIB)
    assert mig.memory_reserved_bytes == 0


def test_xml_without_mig_has_no_mig_devices() -> None:
    """Without MIG, <mig_devices> holds the text "None", not an element."""
    (gpu,) = build.parse_xml(XML / "rtx-3080-v13.xml").gpus
    assert "<mig_devices>" in (XML / "rtx-3080-v13.xml").read_text()
    assert gpu.mig_devices == ()


def test_mig_uuid_is_derived_without_a_list_section(tmp_path: Path) -> None:
    text = H100_MIG.read_text(encoding="utf-8")
    without_migs = "".join(
        line for line in text.splitlines(keepends=True) if "(UUID: MIG-" not in line
    )
    capture = tmp_path / H100_MIG.name
    capture.write_text(without_migs, encoding="utf-8")
    (gpu,) = build.parse_txt(capture).gpus
    mig = gpu.mig_devices[0]
    key = f"{gpu.uuid}/{mig.gpu_instance_id}/{mig.compute_instance_id}"
    assert mig.uuid == f"MIG-{uuid.uuid5(uuid.NAMESPACE_OID, key)}"
    assert mig.name == "NVIDIA H100 80GB HBM3 MIG"


def test_unknown_capture_suffix_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"not a \.xml or \.txt"):
        build.parse_capture(FIXTURES / "SOURCES.md")


# nvmlReturn_t values
SUCCESS, UNINITIALIZED, INVALID_ARGUMENT, NOT_FOUND, INSUFFICIENT_SIZE = 0, 1, 2, 6, 7


NOT_SUPPORTED_CODE, ARGUMENT_VERSION_MISMATCH = 3, 25

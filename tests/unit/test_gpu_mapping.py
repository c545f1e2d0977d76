"""GPU mapping: device facts from the recorded trees and captures, to container settings."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import msgspec
import pytest
from support.fakenvml import build
from support.paths import SYSFS, XML
from support.sysfs_trees import add_pci_gpu, add_render_node

from hal.backend import HalConfig
from hal.backends.amdgpu import AmdgpuSysfsBackend
from hal.backends.intel import IntelSysfsBackend
from hal.types import GpuProfile, value_or
from sandbox.engine_types import DeviceMapping
from sandbox.errors import RunError
from sandbox.gpu_mapping import ContainerGpus, DeviceFacts, HostGroups, host_groups, map_gpus

GROUPS = HostGroups(video_gid=44, render_gid=105)
KFD: DeviceMapping = {
    "PathOnHost": "/dev/kfd",
    "PathInContainer": "/dev/kfd",
    "CgroupPermissions": "rw",
}


def _facts(gpu: GpuProfile) -> DeviceFacts:
    """What the agent hands the sandbox: plain facts, with unknown readings as None."""
    return DeviceFacts(
        vendor=gpu.vendor,
        uuid=value_or(gpu.uuid, None),
        pci_bus_id=value_or(gpu.pci_bus_id, None),
        render_node=value_or(gpu.render_node, None),
    )


def _node(host: Path | str, minor: int) -> DeviceMapping:
    path = f"/dev/dri/renderD{minor}"
    return {"PathOnHost": str(host), "PathInContainer": path, "CgroupPermissions": "rw"}


@pytest.fixture
def recorded_with_render_nodes(tmp_path: Path, dev: Path) -> Path:
    """The recorded tree, with the render nodes its recording left out: card0 D128, card1 D129."""
    sysfs = tmp_path / "sys"
    shutil.copytree(SYSFS, sysfs, symlinks=True)
    for directory, _, _ in os.walk(sysfs):
        Path(directory).chmod(0o755)  # recorded read-only
    for card, minor in (("card0", 128), ("card1", 129)):
        (sysfs / "class" / "drm" / card / "device" / "drm" / f"renderD{minor}").mkdir(parents=True)
        add_render_node(dev, minor)
    return sysfs


# ------------------------------------------------------------------ AMD


def test_recorded_vega10_gets_kfd_its_render_node_and_the_host_gids(
    recorded_with_render_nodes: Path, dev: Path
) -> None:
    config = HalConfig(sysfs_root=recorded_with_render_nodes, dev_root=dev)
    (vega,) = AmdgpuSysfsBackend(config).open()
    facts = _facts(vega)
    assert facts == DeviceFacts(
        vendor="amd",
        uuid="GPU-0123456789abcdef",
        pci_bus_id="0000:09:00.0",
        render_node=str(dev / "dri" / "renderD128"),
    )
    mapped = map_gpus([facts], cdi=False, groups=GROUPS)
    assert mapped == ContainerGpus(
        devices=[KFD, _node(dev / "dri" / "renderD128", 128)],
        group_add=["44", "105"],
    )


def test_recorded_vega10_without_a_render_node_cannot_be_mapped(dev: Path) -> None:
    (vega,) = AmdgpuSysfsBackend(HalConfig(sysfs_root=SYSFS, dev_root=dev)).open()
    with pytest.raises(RunError) as caught:
        map_gpus([_facts(vega)], cdi=False, groups=GROUPS)
    assert caught.value.code == "gpu_unmappable"
    assert "GPU-0123456789abcdef has no render node" in caught.value.detail


def test_a_job_on_one_of_two_amd_cards_sees_only_that_cards_render_node(
    tmp_path: Path, dev: Path
) -> None:
    sysfs = tmp_path / "sys"
    for card, slot, minor in (("card0", "0000:03:00.0", 128), ("card1", "0000:07:00.0", 129)):
        add_pci_gpu(
            sysfs,
            card=card,
            slot=slot,
            pci_id="1002:73DF",
            driver="amdgpu",
            render_minor=minor,
            device_files={"unique_id": f"{minor:016x}"},
        )
        add_render_node(dev, minor)
    first, second = AmdgpuSysfsBackend(HalConfig(sysfs_root=sysfs, dev_root=dev)).open()
    mapped = map_gpus([_facts(second)], cdi=False, groups=GROUPS, kfd_path="/host/dev/kfd")
    paths = [device["PathOnHost"] for device in mapped.devices]
    assert paths == ["/host/dev/kfd", str(dev / "dri" / "renderD129")]
    assert [device["PathInContainer"] for device in mapped.devices] == [
        "/dev/kfd",
        "/dev/dri/renderD129",
    ]
    assert value_or(first.render_node, None) not in paths
    assert not any(path.endswith("/dri") for path in paths)  # never all of /dev/dri
    both = map_gpus([_facts(first), _facts(second)], cdi=False, groups=GROUPS)
    assert [device["PathInContainer"] for device in both.devices] == [
        "/dev/kfd",
        "/dev/dri/renderD128",
        "/dev/dri/renderD129",
    ]
    assert both.group_add == ["44", "105"]


def test_amd_gids_leave_out_the_groups_the_host_lacks() -> None:
    gpu = DeviceFacts(vendor="amd", uuid=None, pci_bus_id=None, render_node="/dev/dri/renderD128")
    mapped = map_gpus([gpu], cdi=False, groups=HostGroups(video_gid=44, render_gid=None))
    assert mapped.group_add == ["44"]
    assert (
        map_gpus([gpu], cdi=False, groups=HostGroups(video_gid=None, render_gid=None)).group_add
        == []
    )


# ------------------------------------------------------------------ Intel


def test_recorded_uhd620_gets_its_render_node_and_the_render_gid(
    recorded_with_render_nodes: Path, dev: Path
) -> None:
    config = HalConfig(sysfs_root=recorded_with_render_nodes, dev_root=dev)
    (uhd,) = IntelSysfsBackend(config).open()
    facts = _facts(uhd)
    assert facts == DeviceFacts(
        vendor="intel",
        uuid=None,
        pci_bus_id="0000:00:02.0",
        render_node=str(dev / "dri" / "renderD129"),
    )
    mapped = map_gpus([facts], cdi=True, groups=GROUPS)
    assert mapped == ContainerGpus(
        devices=[_node(dev / "dri" / "renderD129", 129)], group_add=["105"]
    )


def test_recorded_uhd620_without_a_render_node_cannot_be_mapped(dev: Path) -> None:
    (uhd,) = IntelSysfsBackend(HalConfig(sysfs_root=SYSFS, dev_root=dev)).open()
    with pytest.raises(RunError, match=r"intel GPU 0000:00:02\.0 has no render node") as caught:
        map_gpus([_facts(uhd)], cdi=False, groups=GROUPS)
    assert caught.value.code == "gpu_unmappable"


def test_intel_falls_back_to_the_video_gid_on_hosts_without_a_render_group() -> None:
    gpu = DeviceFacts(vendor="intel", uuid=None, pci_bus_id=None, render_node="/dev/dri/renderD128")
    mapped = map_gpus([gpu], cdi=False, groups=HostGroups(video_gid=44, render_gid=None))
    assert mapped.group_add == ["44"]


def test_a_render_node_path_that_is_not_a_render_node_cannot_be_mapped() -> None:
    gpu = DeviceFacts(vendor="intel", uuid=None, pci_bus_id="0000:00:02.0", render_node="/dev/dri")
    with pytest.raises(RunError, match="is not a render node") as caught:
        map_gpus([gpu], cdi=False, groups=GROUPS)
    assert caught.value.code == "gpu_unmappable"


# ------------------------------------------------------------------ NVIDIA


@pytest.fixture(scope="module")
def a5000s() -> list[DeviceFacts]:
    capture = build.parse_capture(XML / "dual_a5000-v13.xml")
    return [
        DeviceFacts(vendor="nvidia", uuid=gpu.uuid, pci_bus_id=gpu.pci_bus_id, render_node=None)
        for gpu in capture.gpus
    ]


def test_nvidia_gpus_are_one_device_request_by_uuid(a5000s: list[DeviceFacts]) -> None:
    mapped = map_gpus(a5000s, cdi=False, groups=GROUPS)
    assert mapped == ContainerGpus(
        device_requests=[
            {
                "Driver": "nvidia",
                "DeviceIDs": [
                    "GPU-12345678-aaaa-bbbb-cccc-0123456789ab",
                    "GPU-12345678-aaaa-bbbb-cccc-0123456789cd",
                ],
                "Capabilities": [["gpu"]],
            }
        ],
        env={"NVIDIA_DRIVER_CAPABILITIES": "compute,utility"},
    )


def test_nvidia_gpus_are_cdi_names_where_the_engine_has_cdi(a5000s: list[DeviceFacts]) -> None:
    mapped = map_gpus(a5000s[1:], cdi=True, groups=GROUPS)
    assert mapped.device_requests == [
        {"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=GPU-12345678-aaaa-bbbb-cccc-0123456789cd"]}
    ]
    assert mapped.devices == []
    assert mapped.group_add == []


def test_a_job_on_one_of_two_nvidia_gpus_names_only_that_uuid(a5000s: list[DeviceFacts]) -> None:
    (request,) = map_gpus(a5000s[:1], cdi=False, groups=GROUPS).device_requests
    assert request["DeviceIDs"] == [a5000s[0].uuid]
    assert "Count" not in request  # Docker refuses a count beside device ids


def test_an_nvidia_gpu_without_a_uuid_cannot_be_mapped(a5000s: list[DeviceFacts]) -> None:
    gpu = DeviceFacts(vendor="nvidia", uuid=None, pci_bus_id="00000000:81:00.0", render_node=None)
    with pytest.raises(RunError, match=r"00000000:81:00\.0 has no UUID") as caught:
        map_gpus([a5000s[0], gpu], cdi=False, groups=GROUPS)
    assert caught.value.code == "gpu_unmappable"


# ------------------------------------------------------------------ together


def test_no_gpus_map_to_no_settings() -> None:
    assert map_gpus([], cdi=False, groups=GROUPS) == ContainerGpus()
    assert ContainerGpus() == ContainerGpus(device_requests=[], devices=[], group_add=[], env={})


def test_vendors_mix_in_one_job(a5000s: list[DeviceFacts]) -> None:
    amd = DeviceFacts(vendor="amd", uuid=None, pci_bus_id=None, render_node="/dev/dri/renderD130")
    mapped = map_gpus([a5000s[0], amd], cdi=False, groups=GROUPS)
    assert [request["Driver"] for request in mapped.device_requests] == ["nvidia"]
    assert mapped.devices == [KFD, _node("/dev/dri/renderD130", 130)]


def test_the_settings_encode_as_the_engine_api_expects(a5000s: list[DeviceFacts]) -> None:
    amd = DeviceFacts(vendor="amd", uuid=None, pci_bus_id=None, render_node="/dev/dri/renderD128")
    body = msgspec.json.decode(
        msgspec.json.encode(map_gpus([a5000s[0], amd], cdi=False, groups=GROUPS))
    )
    assert set(body) == {"device_requests", "devices", "group_add", "env"}
    assert all(isinstance(gid, str) for gid in body["group_add"])
    assert set(body["devices"][0]) == {"PathOnHost", "PathInContainer", "CgroupPermissions"}


# ------------------------------------------------------------------ host groups


def test_host_groups_are_read_by_name(tmp_path: Path) -> None:
    group = tmp_path / "group"
    group.write_text("root:x:0:\nvideo:x:44:alice\nrender:x:105:\nvideoish:x:7:\n")
    assert host_groups(group) == HostGroups(video_gid=44, render_gid=105)


def test_a_host_without_a_render_group_has_none(tmp_path: Path) -> None:
    group = tmp_path / "group"
    group.write_text("video:x:44:\n# a comment line\nbroken\n")
    assert host_groups(group) == HostGroups(video_gid=44, render_gid=None)


def test_a_missing_group_file_knows_no_groups(tmp_path: Path) -> None:
    assert host_groups(tmp_path / "absent") == HostGroups(video_gid=None, render_gid=None)

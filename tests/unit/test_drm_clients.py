"""DRM clients of AMD and Intel GPUs, found in a /proc tree the tests build."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.sysfs_trees import add_pci_gpu

from hal.backend import HalConfig
from hal.backends.amdgpu import AmdgpuSysfsBackend
from hal.backends.intel import IntelSysfsBackend
from hal.drm_clients import DrmClientScan, parse_fdinfo
from hal.types import UNSUPPORTED, GpuProcess, Unavailable

AMD = "0000:03:00.0"
INTEL = "0000:00:02.0"
KIB = 1 << 10
MIB = 1 << 20

# amdgpu before drm_print_memory_stats (Linux 5.14-6.10): resident memory as drm-memory-.
AMDGPU_OLD = """pos:\t0
flags:\t02100002
mnt_id:\t24
ino:\t1110
drm-driver:\tamdgpu
drm-pdev:\t{pdev}
drm-client-id:\t{client}
pasid:\t32771
drm-memory-vram:\t{vram} KiB
drm-memory-gtt:\t2048 KiB
drm-memory-cpu:\t0 KiB
amd-memory-visible-vram:\t0 KiB
drm-engine-gfx:\t{gfx} ns
drm-engine-compute:\t{compute} ns
"""

# amdgpu from Linux 6.11: the common keys, and drm-memory- kept as an alias of resident.
AMDGPU_NEW = """drm-driver:\tamdgpu
drm-client-id:\t9
drm-pdev:\t0000:03:00.0
drm-total-vram:\t64 MiB
drm-shared-vram:\t0
drm-resident-vram:\t16 MiB
drm-total-gtt:\t4 MiB
drm-memory-vram:\t16384 KiB
drm-engine-gfx:\t0 ns
drm-engine-compute:\t555 ns
"""

I915_INTEGRATED = """drm-driver:\ti915
drm-pdev:\t{pdev}
drm-client-id:\t{client}
drm-total-system0:\t41936 KiB
drm-resident-system0:\t41936 KiB
drm-total-stolen-system0:\t0
drm-engine-render:\t{render} ns
drm-engine-copy:\t0 ns
drm-engine-video:\t0 ns
drm-engine-capacity-video:\t2
"""

I915_DISCRETE = """drm-driver:\ti915
drm-pdev:\t0000:03:00.0
drm-client-id:\t5
drm-total-system0:\t312 KiB
drm-total-local0:\t512 MiB
drm-resident-local0:\t256 MiB
drm-total-stolen-local0:\t8 MiB
drm-engine-render:\t0 ns
drm-engine-compute:\t123 ns
"""

XE = """drm-driver:\txe
drm-pdev:\t0000:03:00.0
drm-client-id:\t7
drm-total-system:\t0
drm-total-gtt:\t4 MiB
drm-total-vram0:\t1073741824
drm-resident-vram0:\t1073741824
drm-cycles-rcs:\t500
drm-total-cycles-rcs:\t1000
drm-cycles-ccs:\t0
"""

NOT_DRM = "pos:\t0\nflags:\t02\nmnt_id:\t22\nino:\t7\n"
OLD_KERNEL = "pos:\t0\nflags:\t02100002\nmnt_id:\t24\nino:\t1110\n"


def amd(client: int, *, vram_kib: int = 1024, gfx: int = 0, compute: int = 0) -> str:
    """An amdgpu client's fdinfo, as Linux 6.1 prints it."""
    return AMDGPU_OLD.format(pdev=AMD, client=client, vram=vram_kib, gfx=gfx, compute=compute)


def intel(client: int, *, render: int = 0) -> str:
    """An integrated i915 client's fdinfo."""
    return I915_INTEGRATED.format(pdev=INTEL, client=client, render=render)


def add_process(proc: Path, pid: int, fds: dict[int, tuple[str, str]]) -> Path:
    """Stand a process in a /proc tree: each fd a link to its target, with its fdinfo."""
    base = proc / str(pid)
    (base / "fd").mkdir(parents=True)
    (base / "fdinfo").mkdir()
    for fd, (target, info) in fds.items():
        (base / "fd" / str(fd)).symlink_to(target)
        (base / "fdinfo" / str(fd)).write_text(info, encoding="utf-8")
    return base


def close_fd(proc: Path, pid: int, fd: int) -> None:
    """What the kernel shows once a process has closed a descriptor."""
    (proc / str(pid) / "fd" / str(fd)).unlink()
    (proc / str(pid) / "fdinfo" / str(fd)).unlink()


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    path = tmp_path / "proc"
    path.mkdir()
    (path / "self").symlink_to("1")  # not a pid: skipped
    (path / "meminfo").write_text("MemTotal: 1 kB\n", encoding="utf-8")
    return path


# -- parsing -------------------------------------------------------------------------------


def test_amdgpu_before_6_11_reports_resident_vram_and_graphics_use() -> None:
    client = parse_fdinfo(amd(42, vram_kib=2048, gfx=1234))
    assert client is not None
    assert (client.driver, client.pdev, client.client_id) == ("amdgpu", AMD, "42")
    assert client.local_memory_bytes == 2048 * KIB
    assert client.graphics


def test_total_memory_is_preferred_to_resident_and_the_old_alias() -> None:
    client = parse_fdinfo(AMDGPU_NEW)
    assert client is not None
    assert client.local_memory_bytes == 64 * MIB
    assert not client.graphics  # compute engine only


def test_i915_local_memory_leaves_out_stolen_and_system_memory() -> None:
    client = parse_fdinfo(I915_DISCRETE)
    assert client is not None
    assert client.local_memory_bytes == 512 * MIB
    assert not client.graphics


def test_xe_counts_vram_in_bytes_and_render_cycles_as_graphics() -> None:
    client = parse_fdinfo(XE)
    assert client is not None
    assert client.local_memory_bytes == 1 << 30
    assert client.graphics


def test_integrated_gpu_client_has_no_local_memory() -> None:
    client = parse_fdinfo(intel(3, render=99))
    assert client is not None
    assert client.local_memory_bytes is None
    assert client.graphics
    assert client.pdev == INTEL


def test_pdev_is_lower_cased_to_match_the_profile() -> None:
    client = parse_fdinfo(
        AMDGPU_OLD.format(pdev="0000:0A:00.0", client=1, vram=0, gfx=0, compute=0)
    )
    assert client is not None
    assert client.pdev == "0000:0a:00.0"


def test_fdinfo_without_drm_keys_is_a_client_of_no_driver() -> None:
    client = parse_fdinfo(OLD_KERNEL)
    assert client is not None
    assert client.driver == ""
    assert client.pdev is None


# -- scanning ------------------------------------------------------------------------------


def test_clients_are_grouped_by_gpu_and_counted_once_per_client_id(proc: Path) -> None:
    add_process(
        proc,
        100,
        {
            3: ("/dev/dri/renderD128", amd(7, vram_kib=4096, gfx=10)),
            4: ("socket:[4242]", NOT_DRM),
            5: ("/dev/dri/card0", intel(2)),
        },
    )
    # The child inherited client 7 (same id): it is the parent's, not counted again.
    add_process(proc, 101, {3: ("/dev/dri/renderD128", amd(7, vram_kib=4096, gfx=10))})
    # Two clients of one process on one GPU add up.
    add_process(
        proc,
        250,
        {
            6: ("/dev/dri/renderD128", amd(8, vram_kib=1024, compute=5)),
            7: ("/dev/dri/renderD128", amd(9, vram_kib=2048)),
        },
    )
    add_process(proc, 300, {0: ("/dev/null", NOT_DRM), 1: ("pipe:[77]", NOT_DRM)})

    found = DrmClientScan(proc).clients(now=1.0)

    assert found.by_device[AMD] == [
        GpuProcess(pid=100, used_memory_bytes=4096 * KIB, kind="graphics"),
        GpuProcess(pid=250, used_memory_bytes=3072 * KIB, kind="compute"),
    ]
    assert found.by_device[INTEL] == [
        GpuProcess(pid=100, used_memory_bytes=UNSUPPORTED, kind="compute")
    ]
    assert found.drivers == {"amdgpu", "i915"}
    assert found.processes(AMD.upper(), ("amdgpu",)) == found.by_device[AMD]
    assert found.processes("0000:09:00.0", ("amdgpu",)) == []
    assert found.processes(None, ("amdgpu",)) == UNSUPPORTED


def test_the_agent_itself_is_not_a_client(proc: Path) -> None:
    add_process(proc, os.getpid(), {3: ("/dev/dri/renderD128", amd(1))})
    assert DrmClientScan(proc).clients(now=1.0).by_device == {}


def test_a_closed_client_is_gone_at_the_next_tick(proc: Path) -> None:
    add_process(proc, 100, {3: ("/dev/dri/renderD128", amd(7)), 4: ("/dev/null", NOT_DRM)})
    scan = DrmClientScan(proc)
    assert [p.pid for p in scan.clients(now=1.0).by_device[AMD]] == [100]
    close_fd(proc, 100, 3)
    assert scan.clients(now=2.0).by_device == {}


def test_a_new_process_is_found_at_the_next_tick(proc: Path) -> None:
    scan = DrmClientScan(proc)
    assert scan.clients(now=1.0).by_device == {}
    add_process(proc, 400, {3: ("/dev/dri/renderD128", amd(11))})
    assert [p.pid for p in scan.clients(now=2.0).by_device[AMD]] == [400]


def test_a_young_process_that_opens_the_gpu_is_found_at_the_next_tick(proc: Path) -> None:
    scan = DrmClientScan(proc, rescan_s=60.0)
    scan.clients(now=1.0)
    base = add_process(proc, 400, {0: ("/dev/null", NOT_DRM)})
    assert scan.clients(now=2.0).by_device == {}
    (base / "fd" / "9").symlink_to("/dev/dri/renderD128")
    (base / "fdinfo" / "9").write_text(amd(12), encoding="utf-8")
    assert [p.pid for p in scan.clients(now=3.0).by_device[AMD]] == [400]


def test_a_running_process_that_opens_the_gpu_later_is_found_by_the_rescan(proc: Path) -> None:
    base = add_process(proc, 100, {0: ("/dev/null", NOT_DRM)})
    scan = DrmClientScan(proc, rescan_s=5.0)
    assert scan.clients(now=0.0).by_device == {}
    (base / "fd" / "9").symlink_to("/dev/dri/renderD128")
    (base / "fdinfo" / "9").write_text(amd(12), encoding="utf-8")
    assert [p.pid for p in scan.clients(now=5.0).by_device[AMD]] == [100]


def test_the_same_tick_is_answered_once(proc: Path) -> None:
    add_process(proc, 100, {3: ("/dev/dri/renderD128", amd(7))})
    scan = DrmClientScan(proc)
    first = scan.clients(now=3.0)
    close_fd(proc, 100, 3)
    assert scan.clients(now=3.0) is first  # the second backend of the same tick
    assert scan.clients(now=4.0).by_device == {}


def test_a_process_that_exits_during_the_scan_is_skipped(proc: Path) -> None:
    (proc / "500").mkdir()  # its fd directory is already gone
    add_process(proc, 501, {3: ("/dev/dri/renderD128", amd(1))})
    assert [p.pid for p in DrmClientScan(proc).clients(now=1.0).by_device[AMD]] == [501]


def test_a_kernel_without_client_stats_is_unavailable_not_empty(proc: Path) -> None:
    add_process(proc, 100, {3: ("/dev/dri/renderD128", OLD_KERNEL)})
    found = DrmClientScan(proc).clients(now=1.0)
    assert found.silent == 1
    reading = found.processes(AMD, ("amdgpu",))
    assert isinstance(reading, Unavailable)
    assert reading.reason == "no_client_stats"


def test_a_missing_proc_is_unavailable(tmp_path: Path) -> None:
    reading = DrmClientScan(tmp_path / "nowhere").clients(now=1.0).processes(AMD, ("amdgpu",))
    assert isinstance(reading, Unavailable)
    assert reading.reason == "proc_unreadable"


# -- the backends --------------------------------------------------------------------------


def _config(tmp_path: Path, proc: Path) -> HalConfig:
    dev = tmp_path / "dev"
    dev.mkdir(exist_ok=True)
    return HalConfig(sysfs_root=tmp_path / "sys", dev_root=dev, proc_root=proc)


def test_amdgpu_and_intel_samples_list_the_processes_on_their_own_gpu(
    tmp_path: Path, proc: Path
) -> None:
    sysfs = tmp_path / "sys"
    add_pci_gpu(sysfs, card="card0", slot=INTEL, pci_id="8086:5917", driver="i915")
    add_pci_gpu(
        sysfs,
        card="card1",
        slot=AMD,
        pci_id="1002:687F",
        driver="amdgpu",
        render_minor=129,
        device_files={"board_info": "type : oam"},
    )
    add_process(proc, 100, {3: ("/dev/dri/renderD129", amd(7, vram_kib=8, gfx=1))})
    add_process(proc, 200, {4: ("/dev/dri/renderD128", intel(1, render=1))})
    config = _config(tmp_path, proc)
    amdgpu, i915 = AmdgpuSysfsBackend(config), IntelSysfsBackend(config)
    amdgpu.open()
    i915.open()

    (amd_sample,) = amdgpu.sample(now=1.0)
    (intel_sample,) = i915.sample(now=1.0)

    assert amd_sample.processes == [GpuProcess(pid=100, used_memory_bytes=8 * KIB, kind="graphics")]
    assert intel_sample.processes == [
        GpuProcess(pid=200, used_memory_bytes=UNSUPPORTED, kind="graphics")
    ]


def test_proc_root_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_AGENT_PROC_ROOT", "/recorded/proc")
    assert HalConfig.from_env().proc_root == Path("/recorded/proc")
    monkeypatch.delenv("GPU_AGENT_PROC_ROOT")
    assert HalConfig.from_env().proc_root == Path("/proc")

"""The doctor's rules, on facts built by hand."""

from __future__ import annotations

from support.factories import DENIED, gpu, profile, runtime

from agent.doctor import Facts, Finding, diagnose
from hal.pci import PciDisplayDevice
from hal.types import BackendReport, Unavailable


def _codes(findings: list[Finding], severity: str = "blocker") -> set[str]:
    return {f.code for f in findings if f.severity == severity}


def test_healthy_nvidia_host_has_no_blockers() -> None:
    facts = Facts(profile=profile([gpu()]), pci=[], node_access={"/dev/nvidiactl": True})
    findings = diagnose(facts)
    assert _codes(findings) == set()
    assert {"nvml_ok", "docker_ok", "nvidia_container_ok"} <= _codes(findings, "ok")


def test_machine_without_gpus_or_docker_is_blocked_on_both() -> None:
    report = BackendReport(name="nvml", status="unavailable", code="library_missing")
    down = runtime(docker_reachable=False, docker_version=Unavailable("docker_unreachable"))
    facts = Facts(profile=profile([], [report], down), pci=[], node_access={})
    assert _codes(diagnose(facts)) == {"no_gpus", "docker_unreachable"}


def test_missing_nvml_is_only_a_blocker_when_an_nvidia_card_is_on_the_bus() -> None:
    report = BackendReport(name="nvml", status="unavailable", code="library_missing")
    card = PciDisplayDevice(bus_id="0000:01:00.0", vendor="nvidia", driver=None)
    without = diagnose(Facts(profile=profile([gpu()], [report]), pci=[], node_access={}))
    assert "nvml_library_missing" in _codes(without, "info")
    with_card = diagnose(Facts(profile=profile([], [report]), pci=[card], node_access={}))
    assert "nvml_library_missing" in _codes(with_card)
    fix = next(f.fix for f in with_card if f.code == "nvml_library_missing")
    assert "nvidia-driver" in fix


def test_amd_card_served_by_sysfs_does_not_need_rocm() -> None:
    reports = [
        BackendReport(name="amdsmi", status="unavailable", code="library_missing"),
        BackendReport(name="amdgpu", status="ok", devices=1),
    ]
    card = PciDisplayDevice(bus_id="0000:09:00.0", vendor="amd", driver="amdgpu")
    amd = gpu(vendor="amd", backend="amdgpu", render_node="/dev/dri/renderD128")
    facts = Facts(
        profile=profile([amd], reports),
        pci=[card],
        node_access={"/dev/kfd": True, "/dev/dri/renderD128": True},
    )
    findings = diagnose(facts)
    assert _codes(findings) == set()
    assert "amdsmi_library_missing" in _codes(findings, "info")


def test_driver_library_mismatch_says_to_reboot() -> None:
    report = BackendReport(
        name="nvml", status="unavailable", code="driver_library_mismatch", detail="NVML: mismatch"
    )
    findings = diagnose(Facts(profile=profile([], [report]), pci=[], node_access={}))
    mismatch = next(f for f in findings if f.code == "nvml_driver_library_mismatch")
    assert mismatch.severity == "blocker"
    assert "reboot" in mismatch.fix


def test_hung_discovery_is_a_blocker() -> None:
    report = BackendReport(name="nvml", status="failed", code="timeout")
    findings = diagnose(Facts(profile=profile([gpu()], [report]), pci=[], node_access={}))
    assert "nvml_timeout" in _codes(findings)


def test_unreadable_device_nodes_are_blockers_with_the_group_fix() -> None:
    amd = gpu(vendor="amd", backend="amdgpu", render_node=DENIED)
    facts = Facts(
        profile=profile([amd]), pci=[], node_access={"/dev/kfd": True, "/dev/nvidiactl": False}
    )
    findings = [f for f in diagnose(facts) if f.code == "device_node_denied"]
    assert len(findings) == 2
    assert all("usermod" in f.fix for f in findings)


def test_amd_gpu_without_kfd_cannot_run_compute() -> None:
    amd = gpu(vendor="amd", backend="amdgpu", render_node="/dev/dri/renderD128")
    facts = Facts(profile=profile([amd]), pci=[], node_access={"/dev/dri/renderD128": True})
    assert "kfd_missing" in _codes(diagnose(facts))


def test_docker_permission_denied_points_at_the_docker_group() -> None:
    denied = Unavailable("permission_denied", "cannot open /var/run/docker.sock")
    facts = Facts(
        profile=profile([gpu()], runtime_info=runtime(docker_reachable=denied)),
        pci=[],
        node_access={},
    )
    finding = next(f for f in diagnose(facts) if f.code == "docker_permission_denied")
    assert "docker` group" in finding.fix


def test_nvidia_gpu_without_toolkit_or_cdi_is_blocked() -> None:
    bare = runtime(docker_runtimes=["runc"], nvidia_container_toolkit=Unavailable("not_installed"))
    facts = Facts(profile=profile([gpu()], runtime_info=bare), pci=[], node_access={})
    assert "nvidia_container_toolkit_missing" in _codes(diagnose(facts))


def test_cdi_spec_the_engine_does_not_use_is_no_way_in() -> None:
    off = runtime(docker_runtimes=["runc"], docker_cdi=False, cdi_specs=["/etc/cdi/nvidia.yaml"])
    facts = Facts(profile=profile([gpu()], runtime_info=off), pci=[], node_access={})
    assert "nvidia_container_toolkit_missing" in _codes(diagnose(facts))


def test_cdi_spec_for_another_driver_is_a_warning() -> None:
    cdi = runtime(docker_runtimes=["runc"], docker_cdi=True, cdi_specs=["/etc/cdi/nvidia.yaml"])
    facts = Facts(
        profile=profile([gpu()], runtime_info=cdi),
        pci=[],
        node_access={},
        stale_cdi_specs=["/etc/cdi/nvidia.yaml"],
    )
    findings = diagnose(facts)
    assert "cdi_spec_stale" in _codes(findings, "warning")
    assert _codes(findings) == set()


def test_blockers_come_first() -> None:
    report = BackendReport(name="nvml", status="unavailable", code="driver_not_loaded")
    findings = diagnose(Facts(profile=profile([], [report]), pci=[], node_access={}))
    severities = [f.severity for f in findings]
    assert severities == sorted(severities, key=["blocker", "warning", "info", "ok"].index)

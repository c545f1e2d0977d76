"""What stands between this machine and serving GPU jobs, each finding with a fix.

:func:`gather` reads the machine; :func:`diagnose` is a pure function of what was read,
so every rule is tested on facts built by hand.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import msgspec

from hal.backend import HalConfig
from hal.pci import PciDisplayDevice, display_devices
from hal.profile import take_profile
from hal.types import BackendReport, Profile, Unavailable

__all__ = ["Facts", "Finding", "diagnose", "gather"]

Severity = Literal["blocker", "warning", "info", "ok"]

_NVIDIA_NODES = ("nvidiactl", "nvidia-uvm")


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """One check's outcome; ``code`` is stable, ``fix`` says what to do about it."""

    code: str
    severity: Severity
    message: str
    fix: str = ""


class Facts(msgspec.Struct, kw_only=True):
    """Everything the diagnosis looks at."""

    profile: Profile
    pci: list[PciDisplayDevice]
    node_access: dict[str, bool]
    """Device node path -> readable and writable by this user (absent nodes left out)."""
    stale_cdi_specs: list[str] = []
    """NVIDIA CDI specs that do not name the loaded driver's version."""


def gather(config: HalConfig) -> Facts:
    """Read what the diagnosis needs from this machine."""
    profile = take_profile(config)
    nodes = [config.dev_root / name for name in (*_NVIDIA_NODES, "kfd")]
    nodes += sorted(config.dev_root.glob("nvidia[0-9]*"))
    nodes += [Path(g.render_node) for g in profile.gpus if isinstance(g.render_node, str)]
    access = {str(n): os.access(n, os.R_OK | os.W_OK) for n in nodes if n.exists()}
    driver = next((g.driver_version for g in profile.gpus if g.vendor == "nvidia"), None)
    stale = [
        spec
        for spec in profile.host.runtime.cdi_specs
        if isinstance(driver, str) and not _spec_names(spec, driver)
    ]
    return Facts(
        profile=profile,
        pci=display_devices(config.sysfs_root),
        node_access=access,
        stale_cdi_specs=stale,
    )


def diagnose(facts: Facts) -> list[Finding]:
    """Every finding about this machine, blockers first."""
    findings = [
        *_backend_findings(facts),
        *_gpu_findings(facts),
        *_node_findings(facts),
        *_runtime_findings(facts),
    ]
    order: dict[Severity, int] = {"blocker": 0, "warning": 1, "info": 2, "ok": 3}
    return sorted(findings, key=lambda f: order[f.severity])


# Codes that mean the vendor stack is installed but broken: a blocker wherever they appear.
_BROKEN = {
    "driver_library_mismatch": (
        "the user-space library and the kernel driver are from different driver versions",
        "reboot to load the newly installed kernel module (or reinstall one driver version)",
    ),
    "permission_denied": (
        "this user may not open the GPU",
        "add the service user to the `video` and `render` groups, then log in again",
    ),
    "function_missing": (
        "the driver is older than the library expects",
        "update the GPU driver",
    ),
    "timeout": (
        "the vendor library hung during discovery",
        "check `dmesg` for GPU errors (Xid, hangs); a reboot usually clears a wedged driver",
    ),
    "crashed": (
        "the vendor library crashed during discovery",
        "reinstall the driver; the library may be from another driver branch",
    ),
}

# What to do when a vendor's GPU is on the PCI bus but no backend of that vendor serves it.
_INSTALL_FIXES = {
    "nvidia": "install the NVIDIA driver (Debian: `sudo apt install nvidia-driver`), or load it "
    "(`sudo modprobe nvidia`); `dmesg` says why it did not load",
    "amd": "load the amdgpu kernel driver (`sudo modprobe amdgpu`); `dmesg` says why it did not",
    "intel": "load the i915 or xe kernel driver (`sudo modprobe i915`)",
}

_VENDOR_OF_BACKEND = {"nvml": "nvidia", "amdsmi": "amd", "amdgpu": "amd", "intel": "intel"}


def _backend_findings(facts: Facts) -> list[Finding]:
    findings = []
    served = {_VENDOR_OF_BACKEND[r.name] for r in facts.profile.backends if r.status == "ok"}
    stranded = {d.vendor for d in facts.pci} - served
    for report in facts.profile.backends:
        vendor = _VENDOR_OF_BACKEND.get(report.name, report.name)
        code = f"{report.name}_{report.code}"
        if report.status == "ok":
            message = f"{report.name}: {report.devices} device(s) {_versions(report)}"
            findings.append(Finding(code=f"{report.name}_ok", severity="ok", message=message))
        elif report.code in _BROKEN:
            what, fix = _BROKEN[report.code]
            message = f"{report.name}: {what} ({report.detail})"
            findings.append(Finding(code=code, severity="blocker", message=message, fix=fix))
        elif vendor in stranded:
            message = (
                f"an {vendor} GPU is on the PCI bus but {report.name} cannot use it "
                f"({report.detail})"
            )
            fix = _INSTALL_FIXES[vendor]
            findings.append(Finding(code=code, severity="blocker", message=message, fix=fix))
        else:
            message = f"{report.name}: not in use ({report.detail})"
            findings.append(Finding(code=code, severity="info", message=message))
    return findings


def _versions(report: BackendReport) -> str:
    return " ".join(f"{k} {v}" for k, v in sorted(report.versions.items())).strip()


def _gpu_findings(facts: Facts) -> list[Finding]:
    if facts.profile.gpus:
        return []
    return [
        Finding(
            code="no_gpus",
            severity="blocker",
            message="no usable GPU was found on this machine",
            fix="install the GPU's driver; `gpu-agent profile --json` shows each backend's reason",
        )
    ]


def _node_findings(facts: Facts) -> list[Finding]:
    findings = []
    for gpu in facts.profile.gpus:
        node = gpu.render_node
        if isinstance(node, Unavailable) and node.reason == "permission_denied":
            findings.append(_node_blocked(node.detail or gpu.name))
    for node, ok in sorted(facts.node_access.items()):
        if not ok:
            findings.append(_node_blocked(node))
    has_amd = any(g.vendor == "amd" for g in facts.profile.gpus)
    if has_amd and not any(path.endswith("/kfd") for path in facts.node_access):
        findings.append(
            Finding(
                code="kfd_missing",
                severity="blocker",
                message="/dev/kfd is missing: ROCm compute jobs cannot run on the AMD GPUs",
                fix="load amdgpu with compute support (check `dmesg | grep kfd`)",
            )
        )
    return findings


def _node_blocked(node: str) -> Finding:
    return Finding(
        code="device_node_denied",
        severity="blocker",
        message=f"{node} is not readable and writable by this user",
        fix="add the service user to the group owning it (`ls -l` shows it; usually `render` "
        "or `video`): `sudo usermod -aG render,video $USER`",
    )


def _runtime_findings(facts: Facts) -> list[Finding]:
    runtime = facts.profile.host.runtime
    reachable = runtime.docker_reachable
    if reachable is not True:
        detail = reachable.detail if isinstance(reachable, Unavailable) else "no engine answered"
        denied = isinstance(reachable, Unavailable) and reachable.reason == "permission_denied"
        return [
            Finding(
                code="docker_permission_denied" if denied else "docker_unreachable",
                severity="blocker",
                message=f"the Docker engine is not reachable: {detail}",
                fix="add the service user to the `docker` group"
                if denied
                else "install and start Docker (`sudo apt install docker.io && "
                "sudo systemctl enable --now docker`)",
            )
        ]
    version = runtime.docker_version
    findings = [Finding(code="docker_ok", severity="ok", message=f"Docker {version}")]
    if any(g.vendor == "nvidia" for g in facts.profile.gpus):
        findings.append(_nvidia_runtime_finding(facts))
    return findings


def _nvidia_runtime_finding(facts: Facts) -> Finding:
    runtime = facts.profile.host.runtime
    runtimes = runtime.docker_runtimes if isinstance(runtime.docker_runtimes, list) else []
    cdi_usable = runtime.docker_cdi is True and bool(runtime.cdi_specs)
    if not cdi_usable and "nvidia" not in runtimes:
        return Finding(
            code="nvidia_container_toolkit_missing",
            severity="blocker",
            message="Docker cannot hand NVIDIA GPUs to containers: no nvidia runtime, and no "
            "CDI spec the engine uses (CDI is off in Docker before 28 unless switched on)",
            fix="install the NVIDIA Container Toolkit, then `sudo nvidia-ctk runtime configure "
            "--runtime=docker && sudo systemctl restart docker`",
        )
    if facts.stale_cdi_specs:
        return Finding(
            code="cdi_spec_stale",
            severity="warning",
            message=f"CDI spec {facts.stale_cdi_specs[0]} does not name the loaded driver",
            fix="regenerate it: `sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`",
        )
    return Finding(
        code="nvidia_container_ok",
        severity="ok",
        message="Docker can hand NVIDIA GPUs to containers",
    )


def _spec_names(spec: str, driver: str) -> bool:
    try:
        return driver in Path(spec).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False

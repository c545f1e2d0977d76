"""Human-readable text for profiles and doctor findings."""

from __future__ import annotations

from collections.abc import Sequence

from agent.doctor import Finding
from hal.types import GpuProfile, Profile, Reading, Unavailable, Unsupported

__all__ = ["format_bytes", "format_reading", "render_findings", "render_profile"]


def format_bytes(n: int) -> str:
    """``25769803776`` as ``24.0 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_reading(reading: Reading[object], unit: str = "") -> str:
    """A reading as table text: its value, ``n/a`` if unsupported, ``?reason`` otherwise."""
    if isinstance(reading, Unsupported):
        return "n/a"
    if isinstance(reading, Unavailable):
        return f"?{reading.reason}"
    return f"{reading}{unit}"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _vram(gpu: GpuProfile) -> str:
    vram = gpu.vram_total_bytes
    text = format_bytes(vram) if isinstance(vram, int) else format_reading(vram)
    if isinstance(gpu.gtt_total_bytes, int) and gpu.kind == "integrated":
        text += f" (+{format_bytes(gpu.gtt_total_bytes)} GTT)"
    return text


def _gpu_row(gpu: GpuProfile) -> list[str]:
    target = gpu.compute_capability if gpu.vendor == "nvidia" else gpu.gfx_target
    power = gpu.power_limit_w
    pcie = (
        f"gen{gpu.pcie_gen_max} x{gpu.pcie_width_max}"
        if isinstance(gpu.pcie_gen_max, int) and isinstance(gpu.pcie_width_max, int)
        else "n/a"
    )
    name = f"  - {gpu.name}" if gpu.kind == "mig" else gpu.name
    return [
        gpu.vendor,
        name,
        format_reading(gpu.kind),
        format_reading(gpu.pci_bus_id),
        _vram(gpu),
        format_reading(gpu.driver_version),
        format_reading(target),
        f"{power:.0f} W" if isinstance(power, float) else format_reading(power),
        pcie if gpu.kind != "mig" else "",
        format_reading(gpu.uuid),
    ]


def render_profile(profile: Profile) -> str:
    """The profile as a few aligned tables."""
    host = profile.host
    cpu = host.cpu
    freq = f"{cpu.freq_max_hz / 1e9:.1f} GHz max" if isinstance(cpu.freq_max_hz, int) else ""
    runtime = host.runtime
    docker = (
        f"Docker {runtime.docker_version}"
        if runtime.docker_reachable is True
        else f"Docker unreachable ({format_reading(runtime.docker_version)})"
    )
    toolkit = runtime.nvidia_container_toolkit
    lines = [
        f"Host     {host.hostname} · {host.os} · kernel {host.kernel}",
        f"CPU      {format_reading(cpu.model)} · {format_reading(cpu.cores)} cores / "
        f"{cpu.threads} threads {freq}".rstrip(),
        f"Memory   {format_bytes(host.memory_total_bytes)} · swap "
        f"{format_bytes(host.swap_total_bytes)}",
    ]
    lines += [
        f"Disk     {d.mountpoint} {d.fstype} {format_bytes(d.total_bytes)} "
        f"({format_bytes(d.free_bytes)} free)"
        for d in host.disks
    ]
    lines += [
        f"Net      {i.name} {'up' if i.up else 'down'} {' '.join(i.addresses)}".rstrip()
        for i in host.interfaces
    ]
    lines.append(
        f"Runtime  {docker} · NVIDIA toolkit: "
        f"{toolkit if isinstance(toolkit, str) else 'not installed'} · "
        f"CDI specs: {', '.join(runtime.cdi_specs) or 'none'}"
    )
    lines.append("")
    if profile.gpus:
        header = ["VENDOR", "NAME", "KIND", "PCI", "VRAM", "DRIVER", "CC/GFX", "POWER", "PCIE"]
        lines += _table([[*header, "UUID"], *(_gpu_row(g) for g in profile.gpus)])
    else:
        lines.append("No GPU found: each backend says why below, `gpu-agent doctor` what to do.")
    lines.append("")
    lines += _table(
        [
            ["BACKEND", "STATUS", "DEVICES", "DETAIL"],
            *(
                [
                    b.name,
                    b.status if b.code is None else f"{b.status} ({b.code})",
                    str(b.devices),
                    " ".join(f"{k} {v}" for k, v in sorted(b.versions.items())) or b.detail,
                ]
                for b in profile.backends
            ),
        ]
    )
    return "\n".join(lines)


def render_findings(findings: Sequence[Finding]) -> str:
    """Doctor findings, one per line, each fix indented below it."""
    lines = []
    for finding in findings:
        lines.append(f"[{finding.severity.upper():7}] {finding.code}: {finding.message}")
        if finding.fix:
            lines.append(f"          fix: {finding.fix}")
    return "\n".join(lines)

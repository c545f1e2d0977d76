"""Merging what several backends found about the same GPU."""

from __future__ import annotations

from factories import gpu

from hal.backend import HalConfig
from hal.machine import Hal, discover, merge_profiles, merge_samples
from hal.types import UNSUPPORTED, GpuSample, Unavailable


def test_same_bus_id_from_two_backends_is_one_gpu_filled_from_both() -> None:
    first = gpu(
        id="amd-1",
        vendor="amd",
        backend="amdsmi",
        pci_bus_id="0000:09:00.0",
        gfx_target="gfx906",
        vram_total_bytes=UNSUPPORTED,
    )
    second = gpu(
        id="pci:0000:09:00.0",
        vendor="amd",
        backend="amdgpu",
        pci_bus_id="0000:09:00.0",
        gfx_target="gfx900",
        vram_total_bytes=8 << 30,
    )
    merged, aliases = merge_profiles([first, second])
    assert len(merged) == 1
    assert merged[0].id == "amd-1"
    assert merged[0].gfx_target == "gfx906"  # the first backend wins where both know
    assert merged[0].vram_total_bytes == 8 << 30  # and is filled where it does not
    assert aliases == {"pci:0000:09:00.0": "amd-1"}


def test_mig_instances_share_the_bus_id_but_stay_separate() -> None:
    parent = gpu(id="GPU-a", mig_enabled=True)
    migs = [gpu(id=f"MIG-{i}", kind="mig", parent_uuid="GPU-a") for i in range(3)]
    merged, aliases = merge_profiles([parent, *migs])
    assert [g.id for g in merged] == ["GPU-a", "MIG-0", "MIG-1", "MIG-2"]
    assert aliases == {}


def test_gpus_without_a_bus_id_are_never_merged() -> None:
    unknown = Unavailable("permission_denied")
    merged, _ = merge_profiles([gpu(id="a", pci_bus_id=unknown), gpu(id="b", pci_bus_id=unknown)])
    assert [g.id for g in merged] == ["a", "b"]


def test_samples_of_merged_devices_fold_into_the_kept_one() -> None:
    kept = GpuSample(id="amd-1", util_gpu_pct=40.0)
    alias = GpuSample(id="pci:0000:09:00.0", util_gpu_pct=99.0, power_w=120.5)
    other = GpuSample(id="GPU-x", util_gpu_pct=1.0)
    samples = merge_samples([kept, alias, other], {"pci:0000:09:00.0": "amd-1"})
    assert [s.id for s in samples] == ["amd-1", "GPU-x"]
    assert samples[0].util_gpu_pct == 40.0
    assert samples[0].power_w == 120.5


def test_discovery_with_no_backends_finds_nothing_and_says_so() -> None:
    found = discover(HalConfig(backends=()))
    assert found.gpus == []
    assert found.backends == []


def test_unknown_backend_names_are_ignored() -> None:
    hal = Hal(HalConfig(backends=("no-such-backend",)))
    assert hal.open().backends == []
    assert hal.sample() == []
    hal.close()

"""The amdsmi backend: the real import failing, and value conversion over a stand-in module.

ROCm is not installed here, so the library itself never runs. The stand-in answers the
way ``amdsmi_interface.py`` does (dicts, "N/A" for what a device lacks, AmdSmiException
with ``err_code``), with the MI100 of tests/fixtures/rocm-smi-json/mi100_rocm602.json
(card0).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from support.amdsmi import fake_amdsmi
from support.sysfs_trees import add_pci_gpu, add_render_node

from hal.backend import HalConfig
from hal.backends.amdsmi import AmdSmiBackend, import_amdsmi
from hal.errors import BackendUnavailable
from hal.types import UNSUPPORTED, Unavailable

MIB = 1 << 20


def _backend(tmp_path: Path, handles: list[str] | None = None) -> AmdSmiBackend:
    config = HalConfig(sysfs_root=tmp_path / "sys", dev_root=tmp_path / "dev")
    lib = fake_amdsmi(["handle0"] if handles is None else handles)
    return AmdSmiBackend(config, load=lambda: lib)


def _mi100_sysfs(tmp_path: Path) -> Path:
    gpu = add_pci_gpu(
        tmp_path / "sys",
        card="card0",
        slot="0000:83:00.0",
        pci_id="1002:738C",
        driver="amdgpu",
        device_files={"board_info": "type : oam", "numa_node": 1},
    )
    add_render_node(tmp_path / "dev", 128)
    return gpu.device


@pytest.mark.skipif(
    importlib.util.find_spec("amdsmi") is not None, reason="amdsmi is installed here"
)
def test_missing_amdsmi_package_is_library_missing() -> None:
    with pytest.raises(BackendUnavailable) as missing:
        AmdSmiBackend(HalConfig()).open()
    assert missing.value.code == "library_missing"


def test_amdsmi_whose_shared_library_will_not_load_is_library_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "amdsmi"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        'raise OSError("libamd_smi.so: cannot open shared object file")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    with pytest.raises(BackendUnavailable) as missing:
        import_amdsmi()
    assert missing.value.code == "library_missing"
    assert "libamd_smi.so" in missing.value.detail


def test_profile_converts_library_units_and_reads_the_rest_from_sysfs(tmp_path: Path) -> None:
    _mi100_sysfs(tmp_path)
    backend = _backend(tmp_path)
    (mi100,) = backend.open()
    assert mi100.id == mi100.uuid == "GPU-79ccd55167a2124a"  # what amdgpu's sysfs gives too
    assert mi100.name == "Arcturus GL-XL [Instinct MI100]"
    assert mi100.pci_bus_id == "0000:83:00.0"
    assert mi100.vram_total_bytes == 32752 * MIB
    assert (mi100.power_limit_w, mi100.power_limit_max_w) == (290.0, 300.0)
    assert mi100.clock_graphics_max_hz == 1502 * 10**6
    assert (mi100.pcie_gen_max, mi100.pcie_width_max) == (4, 16)
    assert mi100.gfx_target == "gfx908"
    assert mi100.driver_version == "6.3.6"
    assert mi100.kind == "discrete"
    assert mi100.numa_node == 1
    assert mi100.render_node == str(tmp_path / "dev" / "dri" / "renderD128")
    assert backend.versions() == {"amdsmi": "24.7.1"}
    backend.close()


def test_sample_converts_units_and_turns_library_errors_into_readings(tmp_path: Path) -> None:
    _mi100_sysfs(tmp_path)
    backend = _backend(tmp_path)
    backend.open()
    (sample,) = backend.sample(now=1.0)
    assert sample.state == "ok"
    assert sample.util_gpu_pct == 0.0
    assert sample.memory_used_bytes == 6 * MIB
    assert (sample.temperature_c, sample.temperature_hotspot_c) == (53.0, 55.0)
    assert sample.power_w == 36.0  # current_socket_power is "N/A": the average answers
    assert sample.energy_j == pytest.approx(15.3)  # 1e6 ticks of 15.3 µJ
    assert sample.clock_graphics_hz == 300 * 10**6
    assert sample.pcie_replay_count == UNSUPPORTED  # the library said "not supported"
    assert sample.ecc_corrected == Unavailable(
        "library_error", "amdsmi_get_gpu_total_ecc_count: status 10"
    )
    backend.close()


def test_gpu_whose_sysfs_directory_vanished_is_lost(tmp_path: Path) -> None:
    device = _mi100_sysfs(tmp_path)
    backend = _backend(tmp_path)
    backend.open()
    shutil.rmtree(device)
    (sample,) = backend.sample(now=1.0)
    assert (sample.id, sample.state) == ("GPU-79ccd55167a2124a", "lost")


def test_library_without_gpus_is_no_devices(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable) as none:
        _backend(tmp_path, handles=[]).open()
    assert none.value.code == "no_devices"

"""The two packages, gpu-agent and gpu-agent-tray: what the build script refuses, what is
in which package (a wheelhouse that serves Python 3.11, 3.12 and 3.13 alike), their
copyright, changelog and manual pages, and lintian. They are built once per module by
``scripts/build_deb.py``, as ``make deb`` builds them (half a minute with pip's cache
warm). tests/integration/test_deb_venv.py installs them: make-venv for each Python, and dpkg -i.
"""

from __future__ import annotations

import fnmatch
import gzip
import importlib
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import canonicalize_name, parse_wheel_filename
from support.deb import ARCH, PYTHONS, VERSION, Debs
from support.packaging import EXEC_START, MAKE_VENV, PACKAGING, ROOT, TRAY_EXEC_START

from agent import cli
from hal import __version__
from packaging import tags

WHEELS = "/usr/lib/gpu-agent/wheels/"
TRAY_WHEELS = "/usr/lib/gpu-agent-tray/wheels/"
# The releases the packages are for: Debian 12, Ubuntu 24.04, Debian 13.

# Building both packages (Qt's wheel is 80 MiB) takes a minute on a busy machine, lintian
# on them as long: more than the default per-test limit, in whichever test first asks.
pytestmark = pytest.mark.timeout(900)


# The build script's refusals and findings, without a build


@pytest.fixture
def build_deb(monkeypatch: pytest.MonkeyPatch) -> Any:
    """scripts/build_deb.py as a module."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("scripts.build_deb")


def test_a_tray_lock_that_pins_the_service_deps_otherwise_is_refused(
    build_deb: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tray = tmp_path / "tray.txt"
    locked = (ROOT / "requirements-tray.txt").read_text()
    tray.write_text(re.sub(r"^msgspec==\S+", "msgspec==0.19.0", locked, flags=re.M))
    monkeypatch.setattr(build_deb, "TRAY_LOCK", tray)
    with pytest.raises(SystemExit, match=r"differ on \['msgspec'\]"):
        build_deb.build(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_architecture_without_manylinux_wheels_is_refused(
    build_deb: Any, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit, match=r"no manylinux wheels for mips64el \(only for amd64"):
        build_deb.build(tmp_path / "out", "mips64el")
    assert not (tmp_path / "out").exists()


def test_wheels_may_need_no_newer_glibc_than_debian_12s(build_deb: Any) -> None:
    platforms = build_deb.platforms("arm64")
    assert platforms[0] == "manylinux_2_36_aarch64"  # Debian 12: glibc 2.36
    assert "manylinux_2_17_aarch64" in platforms
    assert not any(re.match(r"manylinux_2_(3[7-9]|[4-9]\d)_", tag) for tag in platforms)


def _wheel_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_libc_is_required_at_the_newest_glibc_symbol_version_used(
    build_deb: Any, tmp_path: Path
) -> None:
    elf = b"\x7fELF\x02\x01\x01\0"
    a = _wheel_with(tmp_path / "a.whl", {"a/x.so": elf + b"\0GLIBC_2.17\0GLIBC_2.2.5\0"})
    b = _wheel_with(
        tmp_path / "b.whl",
        {"b/y.so": elf + b"\0GLIBC_2.34\0", "b/notes.txt": b"GLIBC_2.99\0"},  # not ELF: not linked
    )
    assert build_deb.glibc_needed([a, b]) == "2.34"
    assert build_deb.glibc_needed([_wheel_with(tmp_path / "c.whl", {"c.py": b""})]) is None


# The packages


def _dpkg_deb(*args: str) -> str:
    return subprocess.run(
        ["dpkg-deb", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def _fields(deb: Path) -> dict[str, str]:
    shown = _dpkg_deb("-f", str(deb), "Package", "Version", "Depends", "Recommends")
    return dict(line.split(": ", 1) for line in shown.splitlines())


def _paths(deb: Path) -> set[str]:
    """The package's files and links (not directories), as /-rooted paths."""
    return {
        line.split(None, 5)[5].split(" -> ")[0].removeprefix(".")
        for line in _dpkg_deb("-c", str(deb)).splitlines()
        if not line.startswith("d")
    }


def _pins(*locks: str) -> dict[str, str]:
    """The lock files' pins: normalised name -> version."""
    pins: dict[str, str] = {}
    for lock in locks:
        found = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", (ROOT / lock).read_text(), re.M)
        pins.update({canonicalize_name(name): version for name, version in found})
    return pins


def test_the_packages_say_what_they_are_and_need(debs: Debs) -> None:
    libc = re.compile(r"libc6 \(>= 2\.\d+\)")
    service = _fields(debs.service)
    assert (service["Package"], service["Version"]) == ("gpu-agent", VERSION)
    *python, glibc = service["Depends"].split(", ")
    # Any python3 the wheelhouse serves, whichever release's; nothing newer.
    assert python == ["python3 (>= 3.11)", "python3 (<< 3.14)"]
    assert libc.fullmatch(glibc)
    assert service["Recommends"] == "docker.io | docker-ce"
    tray = _fields(debs.tray)
    assert (tray["Package"], tray["Version"]) == ("gpu-agent-tray", VERSION)
    same, glibc = tray["Depends"].split(", ")
    assert same == f"gpu-agent (= {VERSION})"
    assert libc.fullmatch(glibc)
    assert "libxcb-cursor0" in tray["Recommends"]


def test_no_package_depends_on_one_python_minor_version(debs: Debs) -> None:
    # Not python3.11 (Debian 12 only), nor python3-venv: the pip wheel shipped installs.
    for deb in (debs.service, debs.tray):
        depends = _fields(deb)["Depends"]
        assert not re.search(r"python3\.\d+|python3-venv", depends), depends


_TRAY_FILES = (
    "/usr/bin/gpu-agent-tray",
    "/usr/lib/systemd/user/gpu-agent-tray.service",
    "/usr/share/applications/gpu-agent-tray.desktop",
    "/etc/xdg/autostart/gpu-agent-tray.desktop",
    "/usr/share/icons/hicolor/scalable/apps/gpu-agent-tray.svg",
    "/usr/lib/gpu-agent-tray/requirements.txt",
)


def test_a_headless_server_gets_no_qt_and_the_tray_gets_only_its_own(debs: Debs) -> None:
    service, tray = _paths(debs.service), _paths(debs.tray)
    assert service.isdisjoint(tray)  # dpkg refuses two packages that share a file
    assert not any(re.search(r"(?i)PySide6|shiboken6|gpu-agent-tray", path) for path in service)
    assert {"/usr/bin/gpu-agent", MAKE_VENV, "/usr/lib/gpu-agent/requirements.txt"} <= service
    assert set(_TRAY_FILES) <= tray
    tray_wheels = {path for path in tray if path.startswith("/usr/lib/")} - set(_TRAY_FILES)
    assert {parse_wheel_filename(Path(path).name)[0] for path in tray_wheels} == {
        "pyside6-essentials",
        "shiboken6",
    }
    assert not any(path.startswith("/opt/") for path in service | tray)  # made by make-venv
    assert os.readlink(debs.root / "usr/bin/gpu-agent") == EXEC_START
    assert os.readlink(debs.root / "usr/bin/gpu-agent-tray") == TRAY_EXEC_START


def _compatible(python: tuple[int, int]) -> set[tags.Tag]:
    """The tags a CPython ``python`` takes on this architecture's manylinux up to Debian
    12's glibc 2.36 (the oldest of the releases)."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}[ARCH]
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(36, 4, -1)]
    platforms += [f"{name}_{machine}" for name in ("manylinux2014", "manylinux2010", "manylinux1")]
    return {
        *tags.cpython_tags(python, platforms=platforms),
        *tags.compatible_tags(python, f"cp{python[0]}{python[1]}", platforms),
    }


@pytest.mark.parametrize("python", PYTHONS, ids=lambda v: f"cp{v[0]}{v[1]}")
def test_the_wheelhouse_serves_every_locked_distribution_on_each_python(
    debs: Debs, python: tuple[int, int]
) -> None:
    wheels = [
        parse_wheel_filename(path.name)
        for house in (WHEELS, TRAY_WHEELS)
        for path in (debs.root / house.lstrip("/")).glob("*.whl")
    ]
    compatible = _compatible(python)
    served = {(name, str(version)) for name, version, _, found in wheels if found & compatible}
    wanted = {
        *_pins("requirements.txt", "requirements-tray.txt").items(),
        ("pip", _pins("requirements-build.txt")["pip"]),  # the installer, run from its wheel
        ("gpu-provider-agent", __version__),
    }
    assert wanted - served == set()
    # And nothing else.
    assert {name for name, *_ in wheels} == {name for name, _ in wanted}


def test_the_packages_install_the_units_the_sysusers_file_and_the_config(debs: Debs) -> None:
    for shipped, source in (
        ("usr/lib/systemd/system/gpu-agent.service", "gpu-agent.service"),
        ("usr/lib/sysusers.d/gpu-agent.conf", "gpu-agent.sysusers"),
        ("etc/gpu-agent/agent.toml", "agent.toml"),
        ("usr/lib/systemd/user/gpu-agent-tray.service", "gpu-agent-tray.service"),
        ("usr/share/applications/gpu-agent-tray.desktop", "gpu-agent-tray.desktop"),
        ("etc/xdg/autostart/gpu-agent-tray.desktop", "gpu-agent-tray.desktop"),
        ("usr/share/icons/hicolor/scalable/apps/gpu-agent-tray.svg", "gpu-agent-tray.svg"),
        ("usr/share/lintian/overrides/gpu-agent", "gpu-agent.lintian-overrides"),
        ("usr/share/lintian/overrides/gpu-agent-tray", "gpu-agent-tray.lintian-overrides"),
        ("usr/lib/gpu-agent/make-venv", "../scripts/make_venv.py"),
        ("usr/lib/gpu-agent/requirements.txt", "../requirements.txt"),
        ("usr/lib/gpu-agent-tray/requirements.txt", "../requirements-tray.txt"),
    ):
        assert (debs.root / shipped).read_bytes() == (PACKAGING / source).read_bytes()
    assert (debs.root / "usr/share/doc/gpu-agent/configuration.md").is_file()


def _control(deb: Path, tmp_path: Path) -> Path:
    control = tmp_path / deb.name
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    return control


def test_the_configs_are_conffiles_and_the_maintainer_scripts_are_there(
    debs: Debs, tmp_path: Path
) -> None:
    service, tray = _control(debs.service, tmp_path), _control(debs.tray, tmp_path)
    assert (service / "conffiles").read_text().split() == ["/etc/gpu-agent/agent.toml"]
    # An admin may delete the autostart entry: kept so.
    assert (tray / "conffiles").read_text().split() == ["/etc/xdg/autostart/gpu-agent-tray.desktop"]
    for script in ("postinst", "prerm", "postrm"):
        assert os.access(service / script, os.X_OK)
    for script in ("postinst", "postrm"):
        assert os.access(tray / script, os.X_OK)
    assert "systemd-sysusers" in (service / "postinst").read_text()
    # Both configure by making the venvs.
    assert MAKE_VENV in (service / "postinst").read_text()
    assert MAKE_VENV in (tray / "postinst").read_text()


def _dep5(text: str) -> list[dict[str, str]]:
    """A DEP-5 file's paragraphs: field -> value (continuation lines joined by newlines)."""
    paragraphs = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        name = ""
        for line in block.splitlines():
            if line.startswith(" "):
                fields[name] += "\n" + line[1:]
            else:
                name, value = line.split(":", 1)
                fields[name] = value.strip()
        paragraphs.append(fields)
    return paragraphs


@pytest.mark.parametrize("package", ["gpu-agent", "gpu-agent-tray"])
def test_each_package_names_the_licence_of_everything_it_bundles(debs: Debs, package: str) -> None:
    header, project, *bundled = _dep5(
        (debs.root / f"usr/share/doc/{package}/copyright").read_text()
    )
    assert header["Format"] == "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
    assert (project["Files"], project["License"].split("\n")[0]) == ("*", "Apache-2.0")
    # Every wheel the package ships is named, by its distribution's paragraph; the
    # project's own by the first (Files: *).
    listing = _paths(debs.service if package == "gpu-agent" else debs.tray)
    wheels = {path.lstrip("/") for path in listing if path.endswith(".whl")}
    assert wheels
    for wheel in wheels:
        name = parse_wheel_filename(Path(wheel).name)[0]
        matched = [p["Comment"] for p in bundled if fnmatch.fnmatch(wheel, p["Files"])] or [
            "gpu-provider-agent"
        ]
        assert [canonicalize_name(m.split()[0]) for m in matched] == [name], wheel
    for paragraph in bundled:
        licence, *text = paragraph["License"].split("\n")
        assert licence not in ("", "unknown"), paragraph["Comment"]
        assert text, paragraph["Comment"]
        assert paragraph["Copyright"]
    licences = {p["Comment"].split()[0]: p["License"].split("\n")[0] for p in bundled}
    if package == "gpu-agent":
        assert licences["cryptography"] == "Apache-2.0 or BSD-3-Clause"
        assert licences["nvidia-ml-py"] == "BSD"  # from its classifier; text from pynvml.py
        assert "pip" in licences  # the installer is shipped too
    else:
        assert set(licences) == {"PySide6_Essentials", "shiboken6"}


@pytest.mark.parametrize("package", ["gpu-agent", "gpu-agent-tray"])
def test_each_package_has_a_debian_changelog_compressed_as_gzip_9n(
    debs: Debs, package: str
) -> None:
    data = (debs.root / f"usr/share/doc/{package}/changelog.Debian.gz").read_bytes()
    # gzip -9n: no file name (FLG 0), no time stamp, maximum compression (XFL 2).
    assert (data[:4], data[4:8], data[8]) == (b"\x1f\x8b\x08\x00", b"\0\0\0\0", 2)
    lines = gzip.decompress(data).decode().splitlines()
    assert lines[0] == f"{package} ({VERSION}) unstable; urgency=medium"
    assert re.fullmatch(r" -- gpu-agent maintainers <.+>  \w{3}, \d\d \w{3} \d{4} .+", lines[-1])


def test_lintian_finds_nothing_but_what_is_explained(debs: Debs) -> None:
    # Not among CI's tools (.ci/run): checked where it is installed (apt-get install lintian).
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (apt-get install lintian)")
    shown = subprocess.run(
        ["lintian", "--tag-display-limit", "0", str(debs.service), str(debs.tray)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    tags = {
        " ".join(line.split()[:3])
        for line in shown.stdout.splitlines()
        if re.match(r"[EWIP]: ", line)
    }
    # Every tag left is overridden, with its reason, in packaging/*.lintian-overrides.
    assert tags == set(), shown.stdout
    assert "no-copyright-file" not in shown.stdout  # what the override files do not hide


def test_the_manual_page_names_every_command(debs: Debs) -> None:
    manual = gzip.decompress((debs.root / "usr/share/man/man1/gpu-agent.1.gz").read_bytes())
    listed = re.findall(r"^\.TP\n\.B (\S+)$", manual.decode(), re.MULTILINE)
    commands = next(action.choices for action in cli._parser()._actions if action.dest == "command")
    assert isinstance(commands, dict)
    assert [*listed[: len(commands)]] == list(commands)
    assert (debs.root / "usr/share/man/man1/gpu-agent-tray.1.gz").is_file()


def test_nothing_in_the_packages_names_where_they_were_built(debs: Debs) -> None:
    (wheel,) = (debs.root / WHEELS.lstrip("/")).glob("gpu_provider_agent-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        inside = [archive.read(name) for name in archive.namelist()]
    files = [path.read_bytes() for path in debs.root.rglob("*") if path.is_file()]
    assert [data for data in inside + files if b"gpu-agent-deb-" in data] == []
    # The project's wheel holds the package's sources, not a build directory's leftovers.
    with zipfile.ZipFile(wheel) as archive:
        assert not [name for name in archive.namelist() if "__pycache__" in name]


def test_only_make_venv_is_executable(debs: Debs) -> None:
    executable = {
        "/" + path.relative_to(debs.root).as_posix()
        for path in debs.root.rglob("*")
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o111
    }
    assert executable == {MAKE_VENV}

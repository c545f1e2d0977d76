"""The packages' DEP-5 copyright files, generated from the bundled distributions' metadata
(scripts/deb_copyright.py), on small trees of unpacked wheel metadata made here;
tests/integration/test_deb.py checks the real ones in the built packages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts import deb_copyright  # noqa: E402

WHEELS = "usr/lib/gpu-agent/wheels"
APACHE = (ROOT / "LICENSE").read_text()
MIT = "MIT License\n\nCopyright (c) 2019 Jane Doe\n\nPermission is hereby granted...\n"


def _dist(
    site: Path, name: str, metadata: str, files: dict[str, str], licences: dict[str, str]
) -> None:
    """Unpack a distribution ``name`` 1.0 as from its wheel: its files, RECORD, METADATA."""
    info = site / f"{name}-1.0.dist-info"
    (info / "licenses").mkdir(parents=True)
    for path, text in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_text(text)
    for path, text in licences.items():
        (info / "licenses" / path).write_text(text)
    listed = [*files, *(f"{info.name}/licenses/{p}" for p in licences), f"{info.name}/METADATA"]
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in listed))
    license_files = "".join(f"License-File: {path}\n" for path in licences)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.4\nName: {name}\nVersion: 1.0\n{metadata}{license_files}\n"
    )


def _wheels(dist: deb_copyright.Dist) -> str:
    return f"{WHEELS}/{dist.name}-{dist.version}-*.whl"


def _render(site: Path) -> list[str]:
    return deb_copyright.render(site, ROOT / "LICENSE", _wheels, 2026).split("\n\n")


def test_each_distribution_gets_its_files_licence_and_text(tmp_path: Path) -> None:
    _dist(tmp_path, "tiny", "License-Expression: MIT\n", {"tiny/__init__.py": ""}, {"LICENSE": MIT})
    header, project, tiny = _render(tmp_path)
    assert header.startswith(f"Format: {deb_copyright.FORMAT}\n")
    assert project.startswith("Files: *\nCopyright: 2026 gpu-agent contributors\n")
    assert tiny.splitlines()[:4] == [
        f"Files: {WHEELS}/tiny-1.0-*.whl",
        "Copyright: Copyright (c) 2019 Jane Doe",
        "Comment: tiny 1.0",
        "License: MIT",
    ]
    assert " Copyright (c) 2019 Jane Doe\n ." in tiny  # the text, blank lines as " ."


def test_a_shipped_apache_text_is_pointed_at_debians_copy(tmp_path: Path) -> None:
    # lintian: copyright-file-contains-full-apache-2-license.
    metadata = "License-Expression: Apache-2.0 OR BSD-3-Clause\n"
    licences = {"LICENSE.APACHE": APACHE, "LICENSE.BSD": "Copyright (c) 2001 Someone\n"}
    _dist(tmp_path, "dual", metadata, {"dual/__init__.py": ""}, licences)
    dual = _render(tmp_path)[2]
    assert "License: Apache-2.0 or BSD-3-Clause\n" in dual
    assert "TERMS AND CONDITIONS" not in dual
    assert " On Debian systems, the full text of Apache-2.0 is in" in dual


def test_a_licence_named_only_by_classifier_takes_the_modules_header(tmp_path: Path) -> None:
    # nvidia-ml-py: "License: BSD" by classifier, its terms only atop pynvml.py.
    metadata = "Classifier: License :: OSI Approved :: BSD License\n"
    header = (
        "#####\n# Copyright (c) 2020, Vendor Corp.  All rights reserved. #\n# Redistribution...\n"
    )
    _dist(tmp_path, "binding", metadata, {"binding.py": header + "import os\n"}, {})
    binding = _render(tmp_path)[2]
    assert "Copyright: Copyright (c) 2020, Vendor Corp.  All rights reserved.\n" in binding
    assert "License: BSD\n Copyright (c) 2020, Vendor Corp." in binding


def test_a_licence_debian_ships_is_pointed_at(tmp_path: Path) -> None:
    metadata = "License: LGPL-3.0-only OR GPL-2.0-only\nAuthor-email: Qt Team <qt@example.org>\n"
    _dist(tmp_path, "qtish", metadata, {"qtish/__init__.py": ""}, {})
    qtish = _render(tmp_path)[2]
    assert "Copyright: Qt Team\n" in qtish
    assert "/usr/share/common-licenses/LGPL-3." in qtish
    assert "/usr/share/common-licenses/GPL-2." in qtish


def test_a_project_licence_that_is_not_apache_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "LICENSE"
    other.write_text(MIT)
    with pytest.raises(ValueError, match=r"not the Apache License 2\.0"):
        deb_copyright.render(tmp_path, other, _wheels, 2026)

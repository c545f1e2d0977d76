"""A package's ``/usr/share/doc/<package>/copyright`` in Debian's machine-readable format
(DEP-5, https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/).

The project itself is Apache-2.0 (the repository's LICENSE). Every third-party distribution
whose wheels the package ships gets a ``Files:`` paragraph naming them (its metadata read
from a tree its wheels' ``.dist-info`` and top-level modules are unpacked into),
with its licence as its metadata declares it (``License-Expression``, else ``License``,
else the trove classifiers) and the licence text it ships (``License-File``). A licence it
ships no text for is pointed at ``/usr/share/common-licenses`` where Debian has it there;
else the header comment of its first module (nvidia-ml-py carries its BSD terms only there).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email import message_from_bytes
from email.message import Message
from pathlib import Path

__all__ = ["Dist", "dists", "render", "write"]

FORMAT = "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
# SPDX ids Debian ships the text of, and the file name it has there.
COMMON_LICENSES = {
    "Apache-2.0": "Apache-2.0",
    "GPL-2.0-only": "GPL-2",
    "GPL-3.0-only": "GPL-3",
    "LGPL-2.1-only": "LGPL-2.1",
    "LGPL-3.0-only": "LGPL-3",
    "MPL-2.0": "MPL-2.0",
}
_CLASSIFIERS = {
    "License :: OSI Approved :: MIT License": "MIT",
    "License :: OSI Approved :: BSD License": "BSD",
    "License :: OSI Approved :: Apache Software License": "Apache-2.0",
    "License :: OSI Approved :: Python Software Foundation License": "PSF-2.0",
}
_APACHE_2 = re.compile(r"Apache License\s+Version 2\.0,")
_COPYRIGHT_LINE = re.compile(r"^\s*(?:#\s*)?(Copyright\s.*\d{4}.*|\(c\)\s.*\d{4}.*)$", re.I | re.M)


class Dist:
    """One installed distribution (a ``*.dist-info`` directory) of a venv."""

    def __init__(self, dist_info: Path) -> None:
        self.dist_info = dist_info
        self.site = dist_info.parent
        self.metadata: Message = message_from_bytes((dist_info / "METADATA").read_bytes())
        self.name = str(self.metadata["Name"])
        self.version = str(self.metadata["Version"])

    def paths(self) -> list[str]:
        """The top-level site-packages entries the dist installed, from its RECORD."""
        record = (self.dist_info / "RECORD").read_text(encoding="utf-8").splitlines()
        tops = {line.split(",", 1)[0].split("/", 1)[0] for line in record if line}
        return sorted(top for top in tops if not top.startswith("..") and top != "__pycache__")

    def license(self) -> str:
        """The licence as a DEP-5 short name (SPDX; ``OR`` and ``AND`` lowered, as DEP-5)."""
        declared = self.metadata["License-Expression"] or self.metadata["License"] or ""
        if not declared.strip() or "\n" in declared.strip() or len(declared) > 80:
            classifiers = self.metadata.get_all("Classifier") or []
            known = [_CLASSIFIERS[c] for c in classifiers if c in _CLASSIFIERS]
            declared = " OR ".join(known) or "unknown"
        return re.sub(r"\b(OR|AND|WITH)\b", lambda m: m.group(1).lower(), declared.strip())

    def license_texts(self) -> list[str]:
        """The texts of the licence files it ships (License-File, under dist-info)."""
        texts = []
        for name in self.metadata.get_all("License-File") or []:
            for candidate in (self.dist_info / "licenses" / name, self.dist_info / name):
                if candidate.is_file():
                    texts.append(candidate.read_text(encoding="utf-8", errors="replace"))
                    break
        return texts

    def header_comment(self) -> str:
        """The leading ``#`` comment block of its first top-level module, if any."""
        for top in self.paths():
            module = self.site / top
            if module.suffix == ".py" and module.is_file():
                lines = module.read_text(encoding="utf-8", errors="replace").splitlines()
                # Boxed comments close their lines with "#" too.
                block = [re.sub(r"^#+ ?|\s*#*\s*$", "", line) for line in _leading_comments(lines)]
                return "\n".join(block).strip("\n")
        return ""

    def authors(self) -> str:
        """Who the metadata names: author, else maintainer (e-mail names without addresses)."""
        for field in ("Author", "Author-email", "Maintainer", "Maintainer-email"):
            if value := self.metadata[field]:
                return re.sub(r"\s*<[^>]*>", "", str(value)).strip()
        return "its authors"


def _leading_comments(lines: list[str]) -> list[str]:
    block: list[str] = []
    for line in lines:
        if line.startswith("#!") and not block:
            continue
        if not line.startswith("#"):
            break
        block.append(line)
    return block


def dists(site: Path) -> list[Dist]:
    """The distributions (``*.dist-info``) in ``site``, by name."""
    found = [Dist(info) for info in site.glob("*.dist-info")]
    return sorted(found, key=lambda dist: dist.name.lower())


def _field(text: str) -> str:
    """A multi-line DEP-5 field value: continuation lines indented, blank ones as ``.``."""
    lines = [line.rstrip().expandtabs() for line in text.strip("\n").splitlines()]
    return "\n".join(f" {line}" if line.strip() else " ." for line in lines)


def _pointer(spdx: str) -> str:
    return (
        f"On Debian systems, the full text of {spdx} is in "
        f"/usr/share/common-licenses/{COMMON_LICENSES[spdx]}."
    )


def _shortened(text: str) -> str:
    """A licence text, or the pointer to Debian's copy where it is the Apache 2.0 whole."""
    whole = "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    return _pointer("Apache-2.0") if whole and _APACHE_2.search(text) else text


def _license_body(dist: Dist, license: str) -> str:
    if texts := dist.license_texts():
        return "\n\n".join(_shortened(text) for text in texts)
    ids = [part for part in re.split(r"\s+(?:or|and)\s+", license) if part]
    if ids and all(i in COMMON_LICENSES for i in ids):
        return "\n".join(_pointer(i) for i in ids)
    if header := dist.header_comment():
        return header
    return f"{dist.name} {dist.version} ships no licence text; its metadata says: {license}."


def _copyright(dist: Dist, body: str) -> str:
    holders = dict.fromkeys(match.strip() for match in _COPYRIGHT_LINE.findall(body))
    holders.pop("Copyright [yyyy] [name of copyright owner]", None)
    return "\n".join(holders) or dist.authors()


def render(site: Path, project_license: Path, files: Callable[[Dist], str], year: int) -> str:
    """The copyright file of a package shipping the distributions in ``site``, each one's
    files (its wheels) named by ``files``."""
    if "Apache License\n                           Version 2.0" not in project_license.read_text():
        raise ValueError(f"{project_license} is not the Apache License 2.0 this file says it is")
    paragraphs = [
        f"Format: {FORMAT}\nUpstream-Name: gpu-agent\n"
        "Comment: The application, and the wheels of the Python distributions it runs\n"
        " with, installed into a virtualenv in /opt/gpu-agent on the machine, as pinned\n"
        " with their hashes in the project's requirements*.txt. Each one's licence\n"
        " below is as its metadata declares it, with the text it ships.",
        f"Files: *\nCopyright: {year} gpu-agent contributors\nLicense: Apache-2.0\n"
        + _field(_pointer("Apache-2.0")),
    ]
    for dist in dists(site):
        if dist.name == "gpu-provider-agent":
            continue  # the project itself: Files: *
        license = dist.license()
        body = _license_body(dist, license)
        paragraphs.append(
            f"Files: {files(dist)}\nCopyright: {_field(_copyright(dist, body)).lstrip()}\n"
            f"Comment: {dist.name} {dist.version}\nLicense: {license}\n{_field(body)}"
        )
    return "\n\n".join(paragraphs) + "\n"


def write(
    target: Path, site: Path, project_license: Path, files: Callable[[Dist], str], year: int
) -> Path:
    """Write ``target`` for the distributions in ``site`` (see ``render``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(site, project_license, files, year), encoding="utf-8")
    return target

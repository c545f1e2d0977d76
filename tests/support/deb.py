"""The built packages: their version and architecture, the Pythons they are for, where they lie."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from hal import __version__

__all__ = ["ARCH", "PYTHONS", "VERSION", "Debs"]

VERSION = f"{__version__}-1"
ARCH = subprocess.run(
    ["dpkg", "--print-architecture"], capture_output=True, text=True, check=False
).stdout.strip()
PYTHONS = ((3, 11), (3, 12), (3, 13))


@dataclass(frozen=True)
class Debs:
    """The two packages, built as `make deb` builds them, and their files unpacked."""

    service: Path
    tray: Path
    root: Path
    """Both packages' files under one root, as installed together."""

"""Test images built locally from the static busybox binary: nothing can be pulled here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["build_busybox_image"]


def build_busybox_image(tag: str, context: Path) -> str:
    """Build ``tag``: busybox and its applets in /bin, and a setuid copy in /suid."""
    bin_dir = context / "bin"
    bin_dir.mkdir()
    shutil.copy2("/bin/busybox", bin_dir / "busybox")
    applets = subprocess.run(
        ["/bin/busybox", "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (bin_dir / applet).symlink_to("busybox")
    # busybox picks its applet by its own name, so the setuid copy keeps the name busybox.
    suid = context / "suid" / "busybox"
    suid.parent.mkdir()
    shutil.copy2("/bin/busybox", suid)
    suid.chmod(0o4755)
    dockerfile = 'FROM scratch\nCOPY bin /bin\nCOPY suid /suid\nCMD ["/bin/sh"]\n'
    (context / "Dockerfile").write_text(dockerfile)
    subprocess.run(
        ["docker", "build", "--quiet", "--tag", tag, str(context)], capture_output=True, check=True
    )
    return tag

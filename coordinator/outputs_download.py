"""``gpu-coordinator submit --wait --out DIR``: a finished job's outputs, checked.

Each output the receipt names ``ok`` and the coordinator's artifact store holds is fetched
through the read API and written to ``DIR/<path>`` only once its SHA-256 and size are the
receipt's (``output_mismatch`` otherwise; nothing of it is written). Outputs that went to
the submitter's own targets are not here, and are listed as such; one the store's retention
removed is ``output_expired``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path, PurePosixPath
from typing import Any

from coordinator.client import AdminClient
from coordinator.errors import AdminError

__all__ = ["download_outputs"]


def download_outputs(client: AdminClient, job: dict[str, Any], out_dir: Path) -> list[str]:
    """Fetch and check ``job``'s stored outputs into ``out_dir``; the paths written.

    Raises:
        AdminError: ``output_mismatch`` (the bytes are not the receipt's), ``output_expired``
            (removed by the store's retention), ``bad_answer``
            (a receipt path that would leave ``out_dir``), the API's codes.
    """
    result = job.get("result") or {}
    receipt = result.get("receipt") or {}
    stored = {o.get("path") for o in job.get("outputs", []) if isinstance(o, dict)}
    expired = {o.get("path") for o in job.get("outputs_expired", []) if isinstance(o, dict)}
    written = []
    for item in receipt.get("outputs", []):
        path, sha256, size = item.get("path"), item.get("sha256"), item.get("size_bytes")
        if item.get("status") == "ok" and path in expired:
            raise AdminError("output_expired", f"{path}: removed by the store's retention")
        if item.get("status") != "ok" or path not in stored:
            continue
        relative = PurePosixPath(str(path))
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise AdminError("bad_answer", f"output path {path!r} would leave {out_dir}")
        data = client.output(str(job["job_id"]), str(path), int(size))
        if hashlib.sha256(data).hexdigest() != sha256 or len(data) != size:
            raise AdminError("output_mismatch", f"{path}: not the bytes the receipt names")
        _write(out_dir / relative, data)
        written.append(str(path))
    return written


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with temporary.open("xb") as out:
        out.write(data)
    os.replace(temporary, path)

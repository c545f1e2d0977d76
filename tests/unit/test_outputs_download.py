"""``submit --out``: what it does with outputs the store no longer holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.client import AdminClient
from coordinator.errors import AdminError
from coordinator.outputs_download import download_outputs


def test_an_output_removed_by_retention_fails_output_expired_and_writes_nothing(
    tmp_path: Path,
) -> None:
    job = {
        "job_id": "job-1",
        "result": {
            "receipt": {
                "outputs": [
                    {"path": "result.txt", "status": "ok", "sha256": "a" * 64, "size_bytes": 3}
                ]
            }
        },
        "outputs": [],
        "outputs_expired": [{"path": "result.txt", "expired": 1.0}],
    }
    # Never asked: an expired output is known from the job alone.
    client = AdminClient("http://127.0.0.1:9", "token")
    with pytest.raises(AdminError) as caught:
        download_outputs(client, job, tmp_path / "out")
    assert caught.value.code == "output_expired"
    assert not (tmp_path / "out").exists()

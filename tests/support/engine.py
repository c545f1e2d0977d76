"""The Docker engine the docker-marked tests run on: the test image's tag, runtime checks."""

from __future__ import annotations

import os
import subprocess

import pytest

__all__ = ["TEST_IMAGE", "require_runtime"]

TEST_IMAGE = "gpu-agent-test/busybox:1"


def require_runtime(runtime: str) -> None:
    """Skip, or fail under GPU_AGENT_REQUIRE_DOCKER=1, when the engine lacks a runtime."""
    listed = subprocess.run(
        ["docker", "info", "--format", "{{json .Runtimes}}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    if f'"{runtime}"' in listed:
        return
    reason = f"the Docker engine has no {runtime} runtime"
    if os.environ.get("GPU_AGENT_REQUIRE_DOCKER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)

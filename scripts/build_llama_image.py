"""Build the llama-server test image unless this engine has it: ``make llama-image``.

The tests build it on first use too; benches and the demo call this first. It prints the
image's tag. The first build compiles llama.cpp on the host (cmake, g++): many minutes on two
cores; its output goes to ``build.log`` in the cache (``--log`` to choose).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.llama import EngineUnreachable, cache_dir, llama_server_image

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Build (or find) the image; print its tag. Exit 2 when no engine answers on the
    socket (a wrong ``--docker-socket``), 1 when the build fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docker-socket", default="/var/run/docker.sock")
    parser.add_argument("--log", type=Path, default=cache_dir() / "build.log")
    args = parser.parse_args(argv)
    try:
        tag = llama_server_image(args.docker_socket, log=args.log)
    except EngineUnreachable as error:
        print(f"build-llama-image: {error}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as error:
        print(f"build-llama-image: {error}", file=sys.stderr)
        return 1
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())

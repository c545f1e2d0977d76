"""The CPU cost of finding DRM clients in the real /proc, at 1 Hz.

Run with ``python bench/drm_clients.py [--processes 500] [--fds 40]``: it starts that many
``sleep`` processes, each holding that many open files, and times the first scan (every
descriptor of every process read) and the steady ticks after it (rules in
``hal/drm_clients.py``). Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hal.drm_clients import DrmClientScan  # noqa: E402


def main() -> None:
    """Start the processes, time the scans, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=500)
    parser.add_argument("--fds", type=int, default=40)
    parser.add_argument("--ticks", type=int, default=60)
    args = parser.parse_args()
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(args.fds)]
    sleepers = [subprocess.Popen(["sleep", "600"], pass_fds=held) for _ in range(args.processes)]
    try:
        time.sleep(0.5)
        scan = DrmClientScan(Path("/proc"))
        started = time.process_time()
        scan.clients(now=0.0)
        first_ms = (time.process_time() - started) * 1e3
        started = time.process_time()
        for tick in range(1, args.ticks + 1):
            scan.clients(now=float(tick))
        tick_ms = (time.process_time() - started) * 1e3 / args.ticks
        visible = sum(1 for name in os.listdir("/proc") if name.isdigit())
        print(f"{visible} processes, {args.fds} extra descriptors in {args.processes} of them")
        print(f"first scan: {first_ms:.1f} ms CPU")
        print(f"steady tick (mean of {args.ticks}, 1 s apart, rescans included): {tick_ms:.2f} ms")
        print(f"at 1 Hz: {tick_ms / 10:.3f} % of one core")
    finally:
        for sleeper in sleepers:
            sleeper.kill()
        for sleeper in sleepers:
            sleeper.wait()


if __name__ == "__main__":
    main()

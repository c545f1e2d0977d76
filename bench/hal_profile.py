"""Benchmarks of the HAL on the host plus 8 GPUs served by the fake NVML.

Run with ``make bench`` (or ``python bench/hal_profile.py --quick`` for a 10 s sampling run).
Figures are printed and written to ``bench/results/hal.json``; nothing here is asserted.

- profile: wall time of ``gpu-agent profile --json``, against ``python -c "import psutil"``
  as the floor (goal: under 2x the floor).
- tick: agent CPU time for one sample of the host and 8 GPUs (goal: under 1 ms).
- sampling: the agent's CPU share sampling at 1 Hz for 60 s (goal: under 0.5% of one core),
  and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakenvml import build  # noqa: E402

from hal.backend import HalConfig  # noqa: E402
from hal.host import host_sample  # noqa: E402
from hal.machine import Hal  # noqa: E402
from hal.types import Sample  # noqa: E402

CAPTURE = ROOT / "tests" / "fixtures" / "nvidia-smi-xml" / "dual_a5000-v13.xml"
GPUS = 8


def eight_gpu_library(out_dir: Path) -> Path:
    """A fake NVML serving 8 copies of a recorded RTX A5000, each with its own bus and uuid."""
    return build.build_library(build.replicate(build.parse_capture(CAPTURE), GPUS), out_dir)


def wall_times(argvs: list[list[str]], env: dict[str, str], runs: int) -> list[list[float]]:
    """Wall times of ``runs`` runs of each command, after one warm-up run of each.

    The commands take turns, so that a load that comes and goes on the machine weighs on
    each of them alike instead of on whichever ran while it lasted.
    """
    for argv in argvs:
        subprocess.run(argv, env=env, check=True, capture_output=True)
    times: list[list[float]] = [[] for _ in argvs]
    for _ in range(runs):
        for argv, taken in zip(argvs, times, strict=True):
            start = time.perf_counter()
            subprocess.run(argv, env=env, check=True, capture_output=True)
            taken.append(time.perf_counter() - start)
    return times


def installed_venv(path: Path) -> Path:
    """A virtual environment with the agent installed as a user installs it (no extras).

    The development venv is slower to start: its editable-install hook runs at every
    interpreter start, and its test tools pull typing_extensions into msgspec's import.
    The dependencies are installed once, from the lock; the agent itself at every run, so
    that what is timed is the code in this tree, not the code of the first run.
    """
    pip = [str(path / "bin" / "pip"), "install", "--quiet"]
    if not (path / "bin" / "gpu-agent").exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        locked = ["--require-hashes", "--only-binary", ":all:", "-r"]
        for lock in ("requirements-build.txt", "requirements.txt"):
            subprocess.run([*pip, *locked, str(ROOT / lock)], check=True)
    own = ["--no-deps", "--no-build-isolation", "--force-reinstall", str(ROOT)]
    subprocess.run([*pip, *own], check=True)
    return path


def bench_profile(venv: Path, env: dict[str, str], runs: int) -> dict[str, float]:
    """``gpu-agent profile --json`` against the floor of starting Python and psutil."""
    agent, floor = wall_times(
        [
            [str(venv / "bin" / "gpu-agent"), "profile", "--json"],
            [str(venv / "bin" / "python"), "-c", "import psutil"],
        ],
        env,
        runs,
    )
    prefix = "dev_" if venv == ROOT / ".venv" else ""
    return {
        f"{prefix}profile_median_s": statistics.median(agent),
        f"{prefix}floor_median_s": statistics.median(floor),
        f"{prefix}profile_to_floor": statistics.median(agent) / statistics.median(floor),
    }


def bench_tick(library: Path, ticks: int) -> dict[str, float]:
    """CPU time of one tick (host + 8 GPUs, JSON-encoded), in this process."""
    hal = Hal(HalConfig(nvml_library=str(library), backends=("nvml",)))
    hal.open()
    encoder = msgspec.json.Encoder()
    try:
        for _ in range(50):  # warm caches and let "not supported" readings settle
            encoder.encode(Sample(taken_at=time.time(), host=host_sample(), gpus=hal.sample()))
        start = time.process_time()
        for _ in range(ticks):
            gpus = hal.sample()
        gpu_only = (time.process_time() - start) / ticks
        start = time.process_time()
        for _ in range(ticks):
            encoder.encode(Sample(taken_at=time.time(), host=host_sample(), gpus=hal.sample()))
        whole = (time.process_time() - start) / ticks
    finally:
        hal.close()
    assert len(gpus) == GPUS
    return {"tick_gpus_cpu_ms": gpu_only * 1e3, "tick_total_cpu_ms": whole * 1e3}


def bench_sampling(env: dict[str, str], seconds: int) -> dict[str, float]:
    """CPU share and peak RSS of ``gpu-agent sample`` at 1 Hz, from its first sample on."""
    argv = [str(ROOT / ".venv/bin/gpu-agent"), "sample", "--interval", "1"]
    proc = subprocess.Popen([*argv, "--count", str(seconds + 1)], env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    started = time.monotonic()
    cpu_start = _cpu_seconds(proc.pid)
    for _ in range(seconds - 1):
        proc.stdout.readline()
    cpu_end = _cpu_seconds(proc.pid)
    elapsed = time.monotonic() - started
    proc.stdout.read()
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return {
        "sampling_seconds": elapsed,
        "sampling_cpu_share_pct": 100 * (cpu_end - cpu_start) / elapsed,
        "peak_rss_mib": usage.ru_maxrss / 1024,
    }


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks_per_s  # utime + stime


def main() -> None:
    """Run every benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s sampling run, fewer repeats")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        library = eight_gpu_library(Path(tmp))
        env = {**os.environ, "GPU_AGENT_NVML_LIB": str(library)}
        runs = 5 if args.quick else 20
        results = {
            **bench_profile(installed_venv(ROOT / "build" / "bench-venv"), env, runs),
            **bench_profile(ROOT / ".venv", env, runs),
            **bench_tick(library, ticks=200 if args.quick else 2000),
            **bench_sampling(env, seconds=10 if args.quick else 60),
        }
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "hal.json").write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key:28} {value:10.3f}")


if __name__ == "__main__":
    main()

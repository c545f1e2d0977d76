#!/usr/bin/env bash
# `make demo`: show what gpu-agent sees on this machine, and what comes next.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin

echo "== gpu-agent profile: this machine's host and GPUs =="
"$bin/gpu-agent" profile
echo
echo "== gpu-agent sample --count 2: telemetry as JSON lines =="
"$bin/gpu-agent" sample --interval 0.5 --count 2 | cut -c1-160
echo
echo "== gpu-agent doctor: what stands between this machine and serving GPU jobs =="
"$bin/gpu-agent" doctor || true
echo
if ! "$bin/python" -c 'import sys; sys.exit(0 if __import__("glob").glob("/dev/nvidia*") else 1)'; then
  build=$(mktemp -d)
  capture=../shared/fixtures/nvidia-smi-xml/dual_a5000-v13.xml
  if [ -f "$capture" ] && command -v gcc >/dev/null; then
    echo "== No NVIDIA GPU here: the same profile against a recorded 2x RTX A5000 (fake NVML) =="
    lib=$("$bin/python" tests/fakenvml/build.py --xml "$capture" --out "$build")
    GPU_AGENT_NVML_LIB="$lib" "$bin/gpu-agent" profile | sed -n '/^VENDOR/,$p'
    rm -rf "$build"
    echo
  fi
fi
cat <<'MSG'
Next in this demo, as the coordinator and sandbox land (see the issues):
  - a reference coordinator on 127.0.0.1 with a dashboard of nodes and live telemetry,
  - this agent connected to it, attesting its hardware with a signed profile,
  - a sample job run in a hardened Docker sandbox pinned to its GPUs.
MSG

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
if docker info >/dev/null 2>&1 && [ -x /bin/busybox ]; then
  echo "== gpu-agent run-local: a sample job in the hardened sandbox =="
  context=$(mktemp -d)
  "$bin/python" -c 'import sys; sys.path.insert(0, "tests"); from images import build_busybox_image; build_busybox_image(sys.argv[1], __import__("pathlib").Path(sys.argv[2]))' \
    gpu-agent-demo/busybox:1 "$context"
  rm -rf "$context"
  spec=$(mktemp --suffix .toml)
  cat > "$spec" <<'SPEC'
image = "gpu-agent-demo/busybox:1"
command = ["sh", "-c", "echo hello from the sandbox: uid $(id -u), $(ls /sys/class/net | tr '\\n' ' '); cat /input/greeting.txt > /output/result.txt"]
timeout_s = 30
outputs = ["result.txt"]

[resources]
memory_bytes = "64MiB"
pids = 64

[[inputs]]
path = "greeting.txt"
content = "inputs go in read-only, outputs come out with digests\n"
SPEC
  echo "spec: $spec"; cat "$spec"; echo
  "$bin/gpu-agent" run-local "$spec"
  rm -f "$spec"
  echo
else
  echo "== No Docker engine reachable (or no /bin/busybox to build a local image from): no sample job =="
  echo "   On Debian: sudo apt install docker.io busybox-static, then make demo again."
  echo
fi
cat <<'MSG'
Next in this demo, as the coordinator lands (see the issues):
  - a reference coordinator on 127.0.0.1 with a dashboard of nodes and live telemetry,
  - this agent connected to it, attesting its hardware with a signed profile,
  - jobs offered by the coordinator, signed, run in this sandbox, with signed receipts.
MSG

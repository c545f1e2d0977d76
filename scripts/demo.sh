#!/usr/bin/env bash
# `make demo`: the whole loop on this machine: a reference coordinator, an agent attesting
# this machine's hardware and streaming its telemetry, the doctor, and a sample sandboxed job.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/.venv/bin
demo=$PWD/.demo
mkdir -p "$demo"
pids=()
jobs_api=""
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

echo "== gpu-agent profile: this machine's host and GPUs =="
"$bin/gpu-agent" profile
echo

# Without an NVIDIA GPU here, the agent serves a recorded 2x RTX A5000 through a fake
# libnvidia-ml.so.1, so that the dashboard has GPUs to show.
if ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
  if command -v gcc >/dev/null; then
    export GPU_AGENT_NVML_LIB=$("$bin/python" tests/support/fakenvml/build.py \
      --xml tests/fixtures/nvidia-smi-xml/dual_a5000-v13.xml --out "$demo/fakenvml")
    echo "== No NVIDIA GPU here: the agent below serves a recorded 2x RTX A5000 (fake NVML) =="
  else
    echo "== No NVIDIA GPU here, and no gcc to build the fake NVML of a recorded 2x RTX A5000:"
    echo "   the agent below serves this machine's GPUs only (install gcc to see the recorded ones) =="
  fi
  echo
fi

# Three free ports at once (the agents' websocket, the artifact store, the gateway): the
# defaults next to the first one may be another program's on a busy machine.
read -r port artifacts_port gateway_port < <("$bin/python" -c '
import socket
held = [socket.socket() for _ in range(3)]
for s in held:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in held))')
echo "== gpu-coordinator serve: the reference coordinator on 127.0.0.1:$port =="
"$bin/gpu-coordinator" serve --host 127.0.0.1 --port "$port" --db "$demo/coordinator.db" \
  --artifacts-port "$artifacts_port" --gateway-port "$gateway_port" \
  --state-dir "$demo/coordinator" > "$demo/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do grep -q "gateway at" "$demo/coordinator.log" 2>/dev/null && break; sleep 0.1; done
cat "$demo/coordinator.log"
key=$("$bin/gpu-coordinator" key --state-dir "$demo/coordinator" | awk '/public key/ {print $3}')
echo

# The sample job's image, built here from the static busybox (nothing is pulled).
image=""
if docker info >/dev/null 2>&1 && [ -x /bin/busybox ]; then
  context=$(mktemp -d)
  "$bin/python" -c 'import sys; sys.path.insert(0, "tests"); from support.images import build_busybox_image; build_busybox_image(sys.argv[1], __import__("pathlib").Path(sys.argv[2]))' \
    gpu-agent-demo/busybox:1 "$context"
  rm -rf "$context"
  # An offer names its image by digest or id, never by a tag that could move after the
  # coordinator signed it: this image has no registry, so its id.
  image=$(docker image inspect --format '{{.Id}}' gpu-agent-demo/busybox:1)
fi

echo "== gpu-agent run: this agent, pinned to that coordinator's key =="
# The admission policy: the coordinator's jobs may use the demo's locally built image only.
echo "allowed_images = [\"${image:-gpu-agent-demo/busybox}\"]" > "$demo/policy.toml"
"$bin/gpu-agent" run --coordinator "ws://127.0.0.1:$port/agent" --coordinator-key "$key" \
  --state-dir "$demo/agent" --runtime-dir "$demo/run" --policy "$demo/policy.toml" \
  --interval 1 --batch 2 \
  > "$demo/agent.log" 2>&1 &
pids+=($!)
"$bin/gpu-agent" keys create --state-dir "$demo/agent"
node=$("$bin/gpu-agent" keys show --state-dir "$demo/agent" | awk '/node id/ {print $3}')
api="http://127.0.0.1:$port/api/nodes/$node"
for _ in $(seq 100); do
  "$bin/python" - "$api" <<'PY' 2>/dev/null && break
import json, sys, urllib.request
node = json.load(urllib.request.urlopen(sys.argv[1]))
sys.exit(0 if node.get("profile_verified") and node.get("latest_telemetry") else 1)
PY
  sleep 0.2
done
"$bin/python" - "$api" <<'PY'
import json, sys, urllib.request
node = json.load(urllib.request.urlopen(sys.argv[1]))
gpus = node["profile"]["profile"]["gpus"] if node.get("profile") else []
print(f"attestation: profile seq {node['profile']['seq'] if node.get('profile') else '-'}, "
      f"verified={node['profile_verified']}, {len(gpus)} GPU(s): "
      + ", ".join(g["name"] for g in gpus))
telemetry = node.get("latest_telemetry") or {}
print(f"telemetry:   seq {telemetry.get('seq')}, {len(telemetry.get('samples', []))} sample(s) in the last batch")
PY
echo

echo "== gpu-agent status: the running agent, through its local control socket =="
"$bin/gpu-agent" status --socket "$demo/run/agent.sock" || true
echo

echo "== gpu-agent doctor: what stands between this machine and serving GPU jobs =="
"$bin/gpu-agent" doctor || true
echo

if [ -n "$image" ]; then
  echo "== gpu-agent run-local: a sample job in the hardened sandbox =="
  echo "image: gpu-agent-demo/busybox:1, id $image"
  cat > "$demo/job.toml" <<SPEC
image = "$image"
command = ["sh", "-c", "echo hello from the sandbox: uid \$(id -u), network: \$(ls /sys/class/net); cat /input/greeting.txt > /output/result.txt"]
timeout_s = 30
outputs = ["result.txt"]

[resources]
memory_bytes = "64MiB"
pids = 64

[[inputs]]
path = "greeting.txt"
content = "inputs go in read-only, outputs come out with digests\n"
SPEC
  echo "spec: $demo/job.toml"
  "$bin/gpu-agent" run-local "$demo/job.toml"
  echo
  echo "== gpu-coordinator submit: the same job, as a signed offer from the coordinator to the agent =="
  if job=$("$bin/gpu-coordinator" submit "$demo/job.toml" --node "$node" --state-dir "$demo/coordinator"); then
    for _ in $(seq 100); do
      "$bin/python" - "http://127.0.0.1:$port/api/jobs/$job" <<'PY' 2>/dev/null && break
import json, sys, urllib.request
sys.exit(0 if json.load(urllib.request.urlopen(sys.argv[1]))["final"] else 1)
PY
      sleep 0.2
    done
    "$bin/python" - "http://127.0.0.1:$port/api/jobs/$job" <<'PY'
import json, sys, urllib.request
job = json.load(urllib.request.urlopen(sys.argv[1]))
result = job.get("result") or {}
print(f"job {job['job_id']}: {job['state']}, stdout: {job['logs']['stdout'].strip()!r}")
print(f"receipt: sha256 {result.get('receipt_sha256')}, verified={result.get('verified')}, "
      f"chain_ok={result.get('chain_ok')}")
PY
    jobs_api="http://127.0.0.1:$port/api/jobs/$job"
  fi
  echo
else
  echo "== No Docker engine reachable (or no /bin/busybox to build a local image from): no sample job =="
  echo "   On Debian: sudo apt install docker.io busybox-static, then make demo again."
  echo
fi

cat <<MSG
Where to look:
  dashboard:    http://127.0.0.1:$port/
  attestation:  $api   (the verified hardware profile)
  telemetry:    $api/telemetry?since_seq=0
  job:          ${jobs_api:-"(no job ran)"}   (state, logs, the verified receipt)
  gateway:      http://127.0.0.1:$gateway_port/v1   (OpenAI-compatible; a key: gpu-coordinator api-keys create NAME --state-dir $demo/coordinator)
  logs:         $demo/coordinator.log, $demo/agent.log
MSG
if [ -t 0 ]; then
  echo "The coordinator and the agent keep running; press Ctrl-C to stop them."
  wait
else
  echo "(Not a terminal: stopping the coordinator and the agent now.)"
fi

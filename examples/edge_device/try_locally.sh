#!/usr/bin/env bash
# Try the edge_device example on one machine: play the hub's operator (register the device,
# start `fedvlm-hub start` with its embedded broker on a free port), prepare the device's
# model, data, secret and config file, then run the device's part (run_device.sh).
set -euo pipefail

PROGRAM=try_locally.sh
HERE="$(cd "$(dirname "$0")" && pwd)"
usage() {
    cat <<EOF
usage: $PROGRAM [--work-dir DIR] [--model DIR] [--size tiny|small] [--rounds N] [--steps N] [-h|--help]

Everything on this machine, nothing downloaded: a hub (embedded MQTT broker on a free local
port, settings from hub.toml), one registered device with a data folder in RLAIF-V format,
then run_device.sh: fedvlm-edge join, export, ask.

  --work-dir DIR  where everything goes (default: work/edge_device)
  --model DIR     the base VLM to use (default: build an untrained tiny one with
                  \`fedvlm-edge make-tiny-model\`; a pre-trained one such as
                  work/demo/model from \`fedvlm demo\` answers better)
  --size S        tiny or small, for the built model and the pictures (default: small)
  --rounds N      federated rounds (default: hub.toml's)
  --steps N       training steps per round (default: hub.toml's)
  -h, --help      show this help

Needs fedvlm-hub, fedvlm-edge and python3 with fedvlm on PATH (activate the venv).
EOF
}

die() { echo "$PROGRAM: error: $*" >&2; exit 2; }
run() { echo "\$ $*"; "$@"; }

work=work/edge_device
model=""
size=small
hub_flags=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --work-dir) [[ $# -ge 2 ]] || die "--work-dir needs a folder"; work="$2"; shift 2 ;;
        --model) [[ $# -ge 2 ]] || die "--model needs a folder"; model="$2"; shift 2 ;;
        --size) [[ $# -ge 2 && "$2" =~ ^(tiny|small)$ ]] || die "--size is tiny or small"; size="$2"; shift 2 ;;
        --rounds) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || die "--rounds needs a positive number"
                  hub_flags+=(--rounds "$2"); shift 2 ;;
        --steps) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || die "--steps needs a positive number"
                 hub_flags+=(--local-steps "$2"); shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done
for command in fedvlm-hub fedvlm-edge python3; do
    command -v "$command" >/dev/null || die "$command is not on PATH (activate FedVLM's virtual environment)"
done
[[ -z "$model" || -f "$model/config.json" ]] || die "--model '$model' is not a saved model folder (no config.json)"

mkdir -p "$work"
work="$(cd "$work" && pwd)"
device="$work/device"
rm -rf "$work/hub-state" "$device/state" "$device/onnx"   # a fresh federation each run
mkdir -p "$device/secrets" "$device/models"

echo "== the device's base model"
if [[ -n "$model" ]]; then
    rm -rf "$device/models/base"
    ln -s "$(cd "$model" && pwd)" "$device/models/base"
elif [[ ! -f "$device/models/base/config.json" ]]; then
    run fedvlm-edge make-tiny-model "$device/models/base" --size "$size"
fi

echo "== the device's data, RLAIF-V JSON Lines + images"
run python3 "$HERE/make_data.py" --out "$device/data" --size "$size"

echo "== the hub's operator registers the device; the secret goes to a file only the device reads"
secret_file="$device/secrets/phone-17.secret"
( umask 077; fedvlm-hub clients add phone-17 --state-dir "$work/hub-state" | tail -n 1 > "$secret_file" )
echo "\$ fedvlm-hub clients add phone-17 --state-dir $work/hub-state   # secret saved to $secret_file"

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
echo "== the hub, embedded broker on 127.0.0.1:$port (log: $work/hub.log)"
hub=(fedvlm-hub start --config "$HERE/hub.toml" --state-dir "$work/hub-state" --port "$port" ${hub_flags[@]+"${hub_flags[@]}"})
echo "\$ ${hub[*]} &"
"${hub[@]}" > "$work/hub.log" 2>&1 &
hub_pid=$!
trap 'kill "$hub_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do   # wait until the broker accepts connections (at most 20 s)
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1).close()" 2>/dev/null && break
    kill -0 "$hub_pid" 2>/dev/null || { cat "$work/hub.log" >&2; die "the hub exited"; }
    sleep 0.2
done

# Ask about the first held-out picture, with its own question.
first_test="$(python3 -c 'import json, sys; r = json.loads(open(sys.argv[1]).readline()); print(r["image"]); print(r["question"])' "$device/data/test.jsonl")"
image="data/$(sed -n 1p <<< "$first_test")"
question="$(sed -n 2p <<< "$first_test")"
cat > "$device/device.env" <<EOF
# Written by $PROGRAM: the device's settings (see $HERE/device.env for each one).
HUB_URL=mqtt://127.0.0.1:$port
FEDERATION=edge-example
CLIENT_ID=phone-17
SECRET_FILE=secrets/phone-17.secret
MODEL_DIR=models/base
DATA=data/train.jsonl
EVAL_DATA=data/test.jsonl
STATE_DIR=state
ONNX_DIR=onnx
MQTT_VERSION=3.1.1      # the embedded broker speaks MQTT 3.1.1
IMAGE=$image
QUESTION="$question"
EOF
echo "== the device, with its config file $device/device.env"
"$HERE/run_device.sh" --config "$device/device.env"

wait "$hub_pid" || die "the hub failed; see $work/hub.log"
trap - EXIT
echo "== the hub's view"
run fedvlm-hub status --state-dir "$work/hub-state"

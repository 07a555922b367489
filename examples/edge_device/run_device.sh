#!/usr/bin/env bash
# A device's part in a federation, with the fedvlm-edge commands a real device runs:
#   1. fedvlm-edge join    take part in the hub's rounds (only the shared factors leave)
#   2. fedvlm-edge export  the personalised model to ONNX: base graphs + this device's adapter
#   3. fedvlm-edge ask     answer a question about a picture with ONNX Runtime
set -euo pipefail

PROGRAM=run_device.sh
usage() {
    cat <<EOF
usage: $PROGRAM [--config FILE] [--rounds N] [--skip-join] [-h|--help]

Run this device's part of a federation with the settings in FILE (default: device.env
beside this script; see that file for every setting). Relative paths in FILE are relative
to FILE's folder. Every command is printed before it runs.

  --config FILE   the device's settings (shell syntax, NAME=value)
  --rounds N      leave after sending N updates (default: stay until the hub is done)
  --skip-join     only export and ask (the device already took part)
  -h, --help      show this help

Needs fedvlm-edge on PATH (pip install "fedvlm[edge,onnx]").
EOF
}

die() { echo "$PROGRAM: error: $*" >&2; exit 2; }
# Print a command as it could be pasted into a shell, then run it.
show() {
    local line="" arg
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+="$arg "; else line+="'${arg//\'/\'\\\'\'}' "; fi
    done
    echo "\$ ${line% }"
}
run() { show "$@"; "$@"; }

config="$(dirname "$0")/device.env"
rounds=""
skip_join=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) [[ $# -ge 2 ]] || die "--config needs a file"; config="$2"; shift 2 ;;
        --rounds) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || die "--rounds needs a positive number"; rounds="$2"; shift 2 ;;
        --skip-join) skip_join=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done

[[ -f "$config" ]] || die "config file '$config' does not exist (copy examples/edge_device/device.env and edit it)"
command -v fedvlm-edge >/dev/null || die "fedvlm-edge is not on PATH: pip install \"fedvlm[edge,onnx]\" (or activate its venv)"
cd "$(dirname "$config")"
# shellcheck source=device.env
source "./$(basename "$config")"
for name in HUB_URL FEDERATION CLIENT_ID SECRET_FILE MODEL_DIR DATA STATE_DIR ONNX_DIR IMAGE QUESTION; do
    [[ -n "${!name:-}" ]] || die "$config does not set $name"
done
[[ -f "$SECRET_FILE" ]] || die "secret file '$SECRET_FILE' does not exist: put the secret from \`fedvlm-hub clients add $CLIENT_ID\` there"

if [[ $skip_join -eq 0 ]]; then
    echo "== 1. join federation '$FEDERATION' at $HUB_URL as $CLIENT_ID"
    join=(fedvlm-edge join --hub "$HUB_URL" --federation "$FEDERATION" --client-id "$CLIENT_ID"
          --secret-file "$SECRET_FILE" --model "$MODEL_DIR" --data "$DATA" --state-dir "$STATE_DIR"
          --mqtt-version "${MQTT_VERSION:-auto}" --quiet)
    [[ -n "${EVAL_DATA:-}" ]] && join+=(--eval-data "$EVAL_DATA")
    [[ -n "$rounds" ]] && join+=(--rounds "$rounds")
    [[ "${BROKER_LOGIN:-0}" == 1 ]] && join+=(--broker-login)
    [[ -n "${BROKER_USERNAME:-}" ]] && join+=(--username "$BROKER_USERNAME")
    [[ -n "${BROKER_PASSWORD_FILE:-}" ]] && join+=(--password-file "$BROKER_PASSWORD_FILE")
    [[ -n "${CA_FILE:-}" ]] && join+=(--ca-file "$CA_FILE")
    run "${join[@]}"
fi

echo "== 2. export the personalised model to ONNX"
run fedvlm-edge export --state-dir "$STATE_DIR" --model "$MODEL_DIR" --out "$ONNX_DIR"

echo "== 3. ask it about a picture, with ONNX Runtime and this device's adapter"
run fedvlm-edge ask --onnx "$ONNX_DIR" --adapter "$ONNX_DIR/$CLIENT_ID.onnx_adapter" --image "$IMAGE" \
    --question "$QUESTION"

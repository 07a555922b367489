#!/bin/bash
# usage: run.sh OUTNAME SEEDS STRATEGIES [extra simulate flags...]
set -e
cd /work/wt-visionfew
name=$1; seeds=$2; strategies=$3; shift 3
exec /work/tools/heavy .venv/bin/fedvlm simulate --scenario few-shot --clients 16 --examples-per-client 32 \
  --test-examples-per-client 16 --rounds 4 --local-steps 8 --seeds "$seeds" --late-joiners 4 \
  --late-joiner-steps 16 --global-test-size 32 --score-last-round-only --quiet \
  --strategies "$strategies" --out work/visionfew/$name "$@"

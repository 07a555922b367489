#!/bin/bash
# few-shot-codes with the benchmark's exact settings (benchmarks/personalisation.py), one thread.
# usage: work/tune.sh OUT SEEDS STRATEGIES
cd /work/wt-plora15
exec /work/tools/heavy --slot 2 .venv/bin/fedvlm simulate --scenario few-shot-codes --model /work/cache/base-current \
  --clients 16 --examples-per-client 32 --test-examples-per-client 16 --rounds 4 --local-steps 8 --lora-rank 8 \
  --client-ranks 2,4,8 --global-test-size 32 --late-joiners 4 --late-joiner-steps 16 --score-last-round-only \
  --threads 1 --quiet --out "$1" --seeds "$2" --strategies "$3"

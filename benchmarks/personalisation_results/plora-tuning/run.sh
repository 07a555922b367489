#!/bin/bash
# few-shot-codes with the benchmark's exact settings (benchmarks/personalisation.py), one thread.
# usage (from the repository root): benchmarks/personalisation_results/plora-tuning/run.sh BASE_DIR OUT SEEDS STRATEGIES
# e.g. ... run.sh work/models/small-pretrained work/tune 3,4,5 'plora,plora[shared_lr_scale=2],local,fedsa'
exec .venv/bin/fedvlm simulate --scenario few-shot-codes --model "$1" \
  --clients 16 --examples-per-client 32 --test-examples-per-client 16 --rounds 4 --local-steps 8 --lora-rank 8 \
  --client-ranks 2,4,8 --global-test-size 32 --late-joiners 4 --late-joiner-steps 16 --score-last-round-only \
  --threads 1 --quiet --out "$2" --seeds "$3" --strategies "$4"

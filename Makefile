# Every target creates the virtual environment itself when it is missing.
# torch and torchvision come from constraints.txt, pinned as a pair that imports together
# (see the comment there), so pip never resolves to another build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fedvlm-installed
WORK ?= work

.PHONY: help venv demo test bench-edge bench-inference bench-transport bench-personalisation bench-data-memory bench-rlaifv bench-hub-scale bench-hub-kill fuzz clean

help:
	@echo "make demo        run the main job (see README)"
	@echo "make test        run the test suite"
	@echo "make bench-edge  edge training benchmark (throughput and memory)"
	@echo "make bench-inference  ONNX Runtime with an adapter vs PyTorch eager generate()"
	@echo "make bench-transport  protocol vs plain MQTT publish; aggregation vs numpy"
	@echo "make bench-rlaifv  every strategy, SFT and DPO, on RLAIF-V-like shards split by source (3 seeds; < 30 min)"
	@echo "make bench-data-memory  peak RSS of reading RLAIF-V shards at 500 vs 5,000 rows (ratio near 1)"
	@echo "make bench-personalisation  federation vs training alone: few-shot-codes and few-shot, concept shift, every strategy vs examples per client (2 processes; under 30 min + base)"
	@echo "make bench-hub-scale  N simulated devices vs a real hub and mosquitto (HUB_SCALE_SETTINGS; ~5 min)"
	@echo "make bench-hub-kill   the hub, then a hub worker, SIGKILLed with half of 1,000 updates acknowledged (~2 min)"
	@echo "make fuzz        10,000 hostile messages to a hub process over each broker (FUZZ_MESSAGES, FUZZ_SEED)"
	@echo "make clean       remove the virtual environment and the work dir"

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24" 
	$(PIP) install --quiet -c constraints.txt torch torchvision
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedvlm demo --work-dir $(WORK)/demo

# Two test processes on two cores (pytest-xdist), a test file to each at a time, so module
# fixtures are built once; at most 4, so a big machine does not start one torch per core.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

bench-edge: $(STAMP)
	$(PY) benchmarks/edge_train.py --out $(WORK)/bench

bench-inference: $(STAMP)
	$(PY) benchmarks/inference.py --out $(WORK)/bench

bench-transport: $(STAMP)
	$(PY) benchmarks/transport.py --out $(WORK)/bench --repeats 25

bench-data-memory: $(STAMP)
	$(PY) benchmarks/data_memory.py --out $(WORK)/bench/data-memory

bench-rlaifv: $(STAMP)
	$(PY) benchmarks/rlaifv.py --out $(WORK)/bench/rlaifv

# PERSONALISATION_BASE=DIR: a base already built elsewhere (e.g. a shared cache of the default one).
PERSONALISATION_BASE ?=
bench-personalisation: $(STAMP)
	$(PY) benchmarks/personalisation.py --out $(WORK)/bench/personalisation $(if $(PERSONALISATION_BASE),--model $(PERSONALISATION_BASE))

# DEVICESxSIZE[:Kw][:drain] settings, comma-separated (Kw: K hub workers; drain: the workers stopped until
# the broker holds the round, then timed); the default is every setting.
HUB_SCALE_SETTINGS ?= 100x64KiB,1000x64KiB,10000x64KiB,1000x1MiB,1000x64KiB:1w,1000x64KiB:2w,10000x64KiB:1w,10000x64KiB:2w,10000x64KiB:1w:drain,10000x64KiB:2w:drain

bench-hub-scale: $(STAMP)
	$(PY) benchmarks/hub_scale.py --settings $(HUB_SCALE_SETTINGS) --out $(WORK)/bench/hub-scale

# The hub, then worker 0 of 2, SIGKILLed when half the round is acknowledged; devices never re-send.
bench-hub-kill: $(STAMP)
	$(PY) benchmarks/hub_kill.py --devices 1000 --kill both --out $(WORK)/bench/hub-kill

FUZZ_MESSAGES ?= 10000
FUZZ_SEED ?= 7

# Seeded: the same FUZZ_SEED sends the same messages. Reports: $(WORK)/fuzz/fuzz-<broker>-<seed>.json
fuzz: $(STAMP)
	$(PY) benchmarks/fuzz_hub.py --messages $(FUZZ_MESSAGES) --seed $(FUZZ_SEED) --broker embedded --out $(WORK)/fuzz
	$(PY) benchmarks/fuzz_hub.py --messages $(FUZZ_MESSAGES) --seed $(FUZZ_SEED) --broker mosquitto --out $(WORK)/fuzz

clean:
	rm -rf $(VENV) $(WORK)

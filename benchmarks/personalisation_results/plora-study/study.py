# The pLoRA study of benchmarks/README.md ("Making pLoRA strong"): run from the repository root
# as `python study.py few-shot,few-shot-r16` and `python study.py concept-shift,concept-shift-r16`.
"""pLoRA study: variants that keep B shared and A personal, few-shot and concept shift, 3 seeds."""
import sys, time
from pathlib import Path
from fedvlm.simulate import SimulationSettings, simulate
which = sys.argv[1]
out = Path("work/study")
VARIANTS = ("plora", "plora[refit_steps=2]", "plora[personal_lr_scale=4]", "plora[refit_steps=2,personal_lr_scale=4]")
common = dict(rounds=4, local_steps=8, global_test_size=32, test_examples_per_client=16, score_every_round=False,
              model=Path("work/models/small-pretrained"), seeds=(0, 1, 2), progress=False, examples_per_client=32)
few = dict(scenario="few-shot", clients=16, late_joiners=4, late_joiner_steps=16)
cs = dict(scenario="concept-shift", clients=8)
runs = {
    "few-shot": dict(**few, strategies=VARIANTS),
    "concept-shift": dict(**cs, strategies=VARIANTS),
    "few-shot-r16": dict(**few, strategies=("plora",), lora_rank=16),
    "concept-shift-r16": dict(**cs, strategies=("plora",), lora_rank=16),
}
for name in which.split(","):
    t = time.perf_counter()
    r = simulate(SimulationSettings(out=out / name, **common, **runs[name]))
    print(f"== {name} ({time.perf_counter() - t:.0f} s)", flush=True)
    for k, e in r["strategies"].items():
        print(f"{name} | {k} | {e['personal_accuracy']:.3f} ± {e['personal_accuracy_std']:.3f} | "
              f"{e['personal_accuracy_per_seed']} | late {e['late_joiner_accuracy']}", flush=True)

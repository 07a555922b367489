"""`fedvlm simulate`: two clients, two rounds, every strategy and reference, on the tiny VLM.

Checks the accounting against what each strategy shares (tensor names and sizes read from
a model built here), the results.json schema, resuming after a killed run, and one-line
errors for user mistakes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedvlm.cli import main as fedvlm_main
from fedvlm.simulate import SimulationSettings, simulate

STRATEGIES = ("plora", "fedit", "ffa", "fedsa", "fedex", "local", "centralised", "base", "plora-refit")
# safetensors header per tensor (name, dtype, shape, offsets as JSON) and the metadata: generous bounds.
HEADER_PER_TENSOR, HEADER_FIXED = 160, 600


def tiny_settings(out: Path, model: Path, **overrides) -> SimulationSettings:
    values = dict(out=out, scenario="concept-shift", clients=2, examples_per_client=8, test_examples_per_client=4,
                  model=model, strategies=STRATEGIES, rounds=2, local_steps=2, batch_size=4, seeds=(0,),
                  quantization="none", global_test_size=6, progress=False)
    return SimulationSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def simulated(tiny_model_dir, tmp_path_factory):
    settings = tiny_settings(tmp_path_factory.mktemp("sim"), tiny_model_dir)
    started = time.perf_counter()
    results = simulate(settings)
    return settings, results, time.perf_counter() - started


def lora_factor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every LoRA factor of the tiny model at the simulation's layout (rank 8), from PEFT itself."""
    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.shared.lora_config import LoraSettings

    model = PersonalVLM.from_pretrained(model_dir, lora=LoraSettings(r=8, alpha=16), quantization="none")
    return {name: array.shape for name, array in model.adapter_state().items()}


def test_results_schema_and_outputs(simulated):
    settings, results, seconds = simulated
    assert set(results) >= {"strategies", "args", "version"}
    assert list(results["strategies"]) == list(STRATEGIES)
    assert results["args"]["clients"] == 2 and results["args"]["seeds"] == [0]
    for name, entry in results["strategies"].items():
        for field in ("personal_accuracy", "personal_accuracy_std", "global_accuracy"):
            assert 0.0 <= entry[field] <= 1.0, (name, field)
        assert entry["rounds"] == 2 and len(entry["personal_accuracy_per_round"]) == 2
        assert [c["client_id"] for c in entry["per_client"]] == ["client_00", "client_01"]
        assert entry["seconds"] > 0
        assert {"bytes_up_per_client_round", "bytes_down_per_client_round"} <= set(entry)
    on_disk = json.loads((settings.out / "results.json").read_text())
    assert on_disk["strategies"].keys() == results["strategies"].keys()
    table = (settings.out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in STRATEGIES)
    for plot in ("personal_accuracy_per_round.png", "accuracy_vs_bytes.png"):
        assert (settings.out / plot).read_bytes()[:4] == b"\x89PNG"
    assert seconds < 120  # small and fast


def test_bytes_match_what_each_strategy_shares(simulated, tiny_model_dir):
    _, results, _ = simulated
    shapes = lora_factor_shapes(tiny_model_dir)
    factor_bytes = {factor: sum(4 * _size(s) for n, s in shapes.items() if f".lora_{factor}." in n) for factor in "AB"}
    count = {factor: sum(f".lora_{factor}." in n for n in shapes) for factor in "AB"}
    shares = {"plora": "B", "ffa": "B", "fedsa": "A", "fedit": "AB", "fedex": "AB", "plora-refit": "B"}
    entries = results["strategies"]
    for name, factors in shares.items():
        payload = sum(factor_bytes[f] for f in factors)
        header = entries[name]["bytes_up_per_client_round"] - payload
        assert 0 < header < HEADER_FIXED + HEADER_PER_TENSOR * sum(count[f] for f in factors), name
        assert entries[name]["shared_tensors"]["factors"] == sorted(factors)
        assert entries[name]["shared_tensors"]["values"] * 4 == payload
    # pLoRA sends B only: exactly fedit's payload less the A factors.
    assert entries["fedit"]["bytes_up_per_client_round"] - entries["plora"]["bytes_up_per_client_round"] == \
        pytest.approx(factor_bytes["A"], abs=HEADER_PER_TENSOR * count["A"])
    # The hub sends back what was averaged; FedEx adds one dense residual per adapted module.
    assert entries["plora"]["bytes_down_per_client_round"] == pytest.approx(
        entries["plora"]["bytes_up_per_client_round"], abs=HEADER_FIXED)
    modules = [n.split(".lora_A.")[0] for n in shapes if ".lora_A." in n]
    residuals = sum(4 * shapes[m + ".lora_B.weight"][0] * shapes[m + ".lora_A.weight"][1] for m in modules)
    assert entries["fedex"]["bytes_down_per_client_round"] - entries["fedit"]["bytes_down_per_client_round"] == \
        pytest.approx(residuals, abs=HEADER_PER_TENSOR * len(modules))
    # Refitting A after each global B is local work: not one byte more than pLoRA.
    assert entries["plora-refit"]["bytes_up_per_client_round"] == entries["plora"]["bytes_up_per_client_round"]
    assert entries["plora-refit"]["bytes_down_per_client_round"] == entries["plora"]["bytes_down_per_client_round"]
    assert entries["local"]["bytes_up_per_client_round"] == 0
    assert entries["local"]["bytes_down_per_client_round"] == 0
    assert entries["centralised"]["bytes_up_per_client_round"] is None  # a reference, not a federation


def _size(shape) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def test_personalisation_mechanics(simulated):
    """Shared-everything strategies leave every client with one model; pLoRA and local do not."""
    settings, results, _ = simulated
    runs = {name: json.loads((settings.out / "runs" / f"{name}-seed0.json").read_text()) for name in STRATEGIES}
    for name in ("fedit", "ffa", "fedex", "centralised", "base"):
        assert len({c["global_accuracy"] for c in runs[name]["per_client"]}) == 1, name
    assert runs["base"]["rounds"][0]["per_client"] == runs["base"]["rounds"][1]["per_client"]
    assert all(r["selected"] == ["client_00", "client_01"] for r in runs["plora"]["rounds"])


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-c", "import sys; from fedvlm.cli import main; sys.exit(main())", *args]


def test_resumes_after_being_killed(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sim"
    args = ["simulate", "--scenario", "label-skew", "--clients", "2", "--examples-per-client", "8",
            "--test-examples-per-client", "4", "--model", str(tiny_model_dir), "--strategies", "local,plora,fedit",
            "--rounds", "2", "--local-steps", "2", "--batch-size", "4", "--quantization", "none",
            "--global-test-size", "6", "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(_cli(args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "runs" / "local-seed0.json"
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists() and not (out / "results.json").exists(), "the run finished before it could be killed"
    kept = first.stat().st_mtime_ns
    finished = subprocess.run(_cli(args), env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert first.stat().st_mtime_ns == kept  # the finished run was not redone
    results = json.loads((out / "results.json").read_text())
    assert list(results["strategies"]) == ["local", "plora", "fedit"]
    # Other settings in the same --out are refused, not mixed in.
    other = list(args)
    other[other.index("--rounds") + 1] = "3"
    capsys.readouterr()
    assert fedvlm_main(other) == 2  # in this process: a third interpreter start-up (~5 s) would only add time
    refused = capsys.readouterr().err
    assert "other settings (rounds differ)" in refused and "Traceback" not in refused


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}", "--partition", "dirichlet:-1"], "bad --partition 'dirichlet:-1'"),
    (["--data", "{tmp}", "--partition", "shards"], "bad --partition 'shards'"),
    (["--strategies", "plora,fedavg"], "unknown strategy 'fedavg'"),
    (["--data", "{tmp}/missing"], "does not exist"),
    (["--seeds", "0,x"], "bad --seeds"),
    (["--fraction", "0"], "--fraction must be in (0, 1]"),
    (["--model", "{tmp}"], "holds no config.json"),
])
def test_user_mistakes_end_in_one_line(args, message, tmp_path, capsys):
    code = fedvlm_main(["simulate", *[a.replace("{tmp}", str(tmp_path)) for a in args], "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err
    assert code == 2 and message in error and "Traceback" not in error
    assert error.startswith("fedvlm: error:") and error.count("\n") == 1


def test_data_folder_split_by_dirichlet_partition(tiny_model_dir, tiny_federation, tmp_path, capsys):
    from fedvlm.edge.data import write_records

    data = tmp_path / "data"
    for client in tiny_federation.clients:  # the origin_dataset names the question kind: 4 sources
        write_records(client.train + client.test, data / f"{client.client_id}.parquet", ds_name="test")
    code = fedvlm_main(["simulate", "--data", str(data), "--partition", "dirichlet:1.0", "--clients", "2",
                        "--test-fraction", "0.25", "--model", str(tiny_model_dir), "--strategies", "plora,local",
                        "--rounds", "1", "--local-steps", "1", "--batch-size", "4", "--quantization", "none",
                        "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    clients = results["strategies"]["plora"]["per_client"]
    assert sum(c["test_examples"] for c in clients) == pytest.approx(0.25 * 96, abs=2)
    assert results["args"]["partition"] == "dirichlet:1"
    # origin_dataset with more clients than sources is refused with the numbers.
    code = fedvlm_main(["simulate", "--data", str(data), "--clients", "5", "--model", str(tiny_model_dir),
                        "--out", str(tmp_path / "o2"), "--quiet"])
    assert code == 2 and "needs at least one source per client" in capsys.readouterr().err


def test_refit_trains_the_personal_factors_only(tiny_model_dir, tiny_federation):
    """plora-refit's extra step leaves the just-received shared B exactly as the hub sent it."""
    import numpy as np

    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.edge.training import TrainingConfig, encode_examples
    from fedvlm.shared.strategies import PLoRA

    model = PersonalVLM.from_pretrained(tiny_model_dir, strategy=PLoRA(refit_steps=2), quantization="none")
    rng = np.random.default_rng(0)  # a received global B (B = 0 would give A no gradient)
    model.load_adapter_state({name: (rng.normal(0, 0.1, value.shape).astype(np.float32) if ".lora_B." in name
                                     else value) for name, value in model.adapter_state().items()})
    before = model.adapter_state()
    metrics = model.refit_personal(encode_examples(model.processor, tiny_federation.clients[0].train[:8]),
                                   TrainingConfig(steps=4, batch_size=4, learning_rate=1e-2, progress=False))
    assert metrics.steps == 2  # the strategy's refit_steps, not the round's
    after = model.adapter_state()
    shared = [name for name in before if ".lora_B." in name]
    personal = [name for name in before if ".lora_A." in name]
    assert all(np.array_equal(before[name], after[name]) for name in shared)
    assert any(not np.array_equal(before[name], after[name]) for name in personal)
    assert all(p.requires_grad for name, p in model.model.named_parameters() if ".lora_B." in name)  # restored


def test_strategies_sharing_part_of_the_rank_send_that_part(tiny_model_dir, tmp_path):
    """rank-split and feddpa at k=2 of r=8 send a quarter of fedit's factors; under flexlora a
    client of rank 2 sends a quarter of what a client of rank 8 sends, and gets its rank back."""
    strategies = ("fedit", "rank-split[shared_rank=2]", "feddpa[global_rank=2]", "flexlora")
    settings = tiny_settings(tmp_path / "o", tiny_model_dir, strategies=strategies, rounds=1, client_ranks=(2, 8))
    entries = simulate(settings)["strategies"]
    shapes = lora_factor_shapes(tiny_model_dir)
    factors = sum(4 * _size(s) for s in shapes.values())
    header = HEADER_FIXED + HEADER_PER_TENSOR * len(shapes)
    for name in ("rank-split[shared_rank=2]", "feddpa[global_rank=2]"):
        assert entries[name]["bytes_up_per_client_round"] == pytest.approx(factors / 4, abs=header)
        assert entries[name]["shared_tensors"]["values"] * 4 == factors / 4
    run = json.loads((settings.out / "runs" / "flexlora-seed0.json").read_text())
    (small, full) = run["per_client"]
    assert (small["lora_rank"], full["lora_rank"]) == (2, 8)
    assert small["bytes_up"] == pytest.approx(factors / 4, abs=header) and full["bytes_up"] == pytest.approx(
        factors, abs=header)  # fmt: skip
    # The hub sends the federation's rank back; fedit's clients all run at rank 8 whatever --client-ranks says.
    assert entries["flexlora"]["bytes_down_per_client_round"] == pytest.approx(factors, abs=header)
    assert {c["lora_rank"] for c in json.loads((settings.out / "runs" / "fedit-seed0.json").read_text())["per_client"]} \
        == {8}


def test_rlaifv_shards_split_by_origin_dataset_end_to_end(tiny_model_dir, tmp_path, capsys):
    """`fedvlm simulate --data SHARDS --partition origin_dataset`: shards in the exact schema (the generator's,
    plus one written by pyarrow with bad rows) run end to end; the split and the rows skipped are reported."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fedvlm.edge.data.preference_scenes import write_preference_shards

    data = tmp_path / "shards"
    write_preference_shards(data, 24, sources=["COCO", "VQAv2"], shards=2, image_size=32, row_group_size=4)
    good = pq.read_table(data / "train-00000-of-00002.parquet").slice(0, 3).to_pylist()
    bad = [{**good[0], "chosen": ""}, {**good[1], "origin_split": "{broken"}, good[2]]
    pq.write_table(pa.Table.from_pylist(bad, schema=pq.read_schema(data / "train-00000-of-00002.parquet")),
                   data / "zz-extra.parquet")
    args = ["simulate", "--data", str(data), "--partition", "origin_dataset", "--clients", "2",
            "--model", str(tiny_model_dir), "--strategies", "plora,fedit", "--rounds", "1", "--local-steps", "1",
            "--batch-size", "4", "--quantization", "none", "--max-per-client", "10", "--quiet"]
    code = fedvlm_main([*args, "--out", str(tmp_path / "refused")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "Traceback" not in error
    assert f"{data / 'zz-extra.parquet'}:row 0 (idx 0): 'chosen' is empty [empty_chosen]" in error
    assert "--skip-bad" in error

    out = tmp_path / "o"
    code = fedvlm_main([*args, "--skip-bad", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["strategies"]) == {"plora", "fedit"}
    split = results["data"]["0"]
    assert split == json.loads((out / "partition.json").read_text())["0"]
    assert split["skipped"]["by_reason"] == {"empty_chosen": 1, "bad_origin_split": 1}
    assert split["rows_usable"] == 25 and split["rows_kept"] == 20
    clients = split["table"]["clients"]
    assert sorted(map(tuple, (sorted(c) for c in clients.values()))) == [("COCO",), ("VQAv2",)]
    assert all(sum(c.values()) == 10 for c in clients.values())
    assert "| client | COCO | VQAv2 | total |" in printed  # the table, on the console
    assert "skipped 2 bad row(s) (--skip-bad): 1 empty_chosen, 1 bad_origin_split" in printed
    markdown = (out / "results.md").read_text()
    assert "## Data" in markdown and "| client_00 |" in markdown and "1 bad_origin_split" in markdown


def test_late_joiners_adapt_only_their_personal_part(tiny_model_dir, tmp_path):
    """Few-shot scenario with late joiners: every strategy scores them, after the last round, on
    their own test sets; pLoRA's adapt their personal part (train_personal: B held, see the refit
    test), FedIT's have nothing personal and are scored as the global model, `local`'s train alone."""
    from fedvlm.edge.personal_model import PersonalVLM
    from fedvlm.shared.strategies import FedIT, PLoRA

    settings = tiny_settings(tmp_path / "sim", tiny_model_dir, scenario="few-shot", clients=2, late_joiners=2,
                             late_joiner_steps=2, strategies=("plora", "fedit", "local", "base"),
                             score_every_round=False)
    results = simulate(settings)
    # Scored after the last round only; per question kind of the scenario as well as overall.
    plora = json.loads((settings.out / "runs" / "plora-seed0.json").read_text())
    assert plora["rounds"][0]["personal_accuracy"] is None and plora["rounds"][-1]["personal_accuracy"] is not None
    by_kind = results["strategies"]["plora"]["personal_accuracy_by_kind"]
    assert by_kind and set(by_kind) <= {"position", "vertical", "many"}
    assert "per question kind" in (settings.out / "results.md").read_text()
    for name in settings.strategies:
        run = json.loads((settings.out / "runs" / f"{name}-seed0.json").read_text())
        assert [c["client_id"] for c in run["late_joiners"]] == ["client_02", "client_03"]
        assert [c["client_id"] for c in run["per_client"]] == ["client_00", "client_01"]  # never federated
        steps = {c["adaptation_steps"] for c in run["late_joiners"]}
        assert steps == ({2} if name in ("plora", "local") else {0}), name
        assert 0 <= results["strategies"][name]["late_joiner_accuracy"] <= 1
    assert "Late joiners (2 clients" in (settings.out / "results.md").read_text()
    assert not PersonalVLM.from_pretrained(tiny_model_dir, strategy=FedIT(),
                                           quantization="none").has_trainable_personal_part()
    assert PersonalVLM.from_pretrained(tiny_model_dir, strategy=PLoRA(), quantization="none").has_trainable_personal_part()
    with pytest.raises(ValueError, match="--late-joiners needs a --scenario"):
        tiny_settings(tmp_path / "x", tiny_model_dir, scenario=None, data=tmp_path, late_joiners=1)

"""One (strategy, seed) run of a whole federation in one process, on one base model.

The base is loaded once and wrapped with LoRA once; clients differ only in their adapter
state (a dict of numpy arrays), which is swapped in before a client trains or is scored.
Training is FedVLM's own trainer (``fedvlm.edge.training.train``), the split into shared
and personal tensors and the aggregation are the strategy's own (the hub's code path), and
every update and global version goes through the wire encoding before it is used.

Order of a round, as on the real hub: select clients (seeded, the same for every
strategy), each trains from its current state and sends its shared tensors, the hub
aggregates and publishes, every client absorbs the global version (personal tensors
untouched); then every client's personal model is scored on its own held-out data.

Late joiners (clients that never took part) are scored after the last round: each starts
from the shared initialisation, absorbs the final global version, trains only its personal
part on its own data (``PersonalVLM.train_personal``), and is scored on its own test set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fedvlm.edge.answer_metrics import LikelihoodScores
from fedvlm.edge.chat_format import forward_input_names
from fedvlm.edge.evaluation import EvalInputs, evaluate, has_rejected, likelihood_scores, mean_or_none, prepare_evaluation
from fedvlm.edge.objectives import build_objective
from fedvlm.edge.personal_model import PersonalVLM
from fedvlm.edge.training import TrainingConfig, encode_examples, train
from fedvlm.shared.lora_config import LoraSettings
from fedvlm.shared.lora_keys import at_rank, factor_of
from fedvlm.shared.strategies import build_strategy
from fedvlm.simulate import wire
from fedvlm.simulate.clients import SimulatedClient
from fedvlm.simulate.settings import BASE, CENTRALISED, SimulationSettings, strategy_spec

OnRound = Callable[[int], None]  # called with the number of rounds just finished


def lora_settings(settings: SimulationSettings, seed: int) -> LoraSettings:
    """The adapter layout of a seed's runs: every strategy starts from the same factors."""
    return LoraSettings(r=settings.lora_rank, alpha=2 * settings.lora_rank, init_seed=seed, parts=settings.lora_parts,
                        layers=settings.lora_layers, target_modules=settings.lora_target_modules)


def training_config(settings: SimulationSettings, steps: int, seed: int, round_number: int, stream: int) -> TrainingConfig:
    """Same learning rate, objective and batch order for every strategy: the order depends on
    seed, round and client only."""
    return TrainingConfig(steps=steps, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                          seed=seed * 1_000_003 + round_number * 1_009 + stream, progress=False,
                          objective=build_objective(settings.objective, settings.dpo_beta))


def select_clients(settings: SimulationSettings, seed: int, round_number: int) -> list[int]:
    rng = np.random.default_rng([seed, round_number, 41])
    return sorted(int(i) for i in rng.choice(settings.clients, settings.selected_per_round, replace=False))


def _digest(state: dict[str, np.ndarray]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(state):
        hasher.update(name.encode())
        hasher.update(np.ascontiguousarray(state[name]).tobytes())
    return hasher.hexdigest()


# Every score a run reports, per client on its own held-out data and on the pooled test set;
# one that does not apply to the data (exact match of long answers, preference scores
# without rejected answers) is None. See fedvlm.edge.evaluation.
METRICS: tuple[str, ...] = ("accuracy", "loss", "perplexity", "preference_accuracy", "reward_margin", "rouge_l", "bleu")


class EncodedData:
    """A seed's training and test sets encoded once for every strategy's run of that seed (the
    processor on every picture took about a tenth of a run, and more at 256 examples per client).

    Encodings depend on the data, the processor and the inputs the model's forward takes,
    which every strategy of a simulation shares; they are keyed by the data set itself.
    """

    def __init__(self) -> None:
        self._sets: dict[tuple, tuple[Sequence, object]] = {}

    def training(self, model: PersonalVLM, examples: Sequence, objective) -> list:
        """``examples`` as ``objective`` trains on them (``encode_examples``)."""
        return self._get(("train", objective.name), examples,
                         lambda: encode_examples(model.processor, examples, objective=objective))

    def evaluation(self, model: PersonalVLM, examples: Sequence) -> EvalInputs:
        """``examples`` as ``evaluate`` scores them."""
        return self._get(("eval", forward_input_names(model.model)), examples,
                         lambda: prepare_evaluation(model.model, model.processor, examples))

    def _get(self, kind: tuple, examples: Sequence, encode: Callable[[], object]):
        key = (*kind, id(examples))
        # The data set is held with its encoding, so its id cannot be reused by another one.
        if key not in self._sets or self._sets[key][0] is not examples:
            self._sets[key] = (examples, encode())
        return self._sets[key][1]


class Scorer:
    """The scores of an adapter state on a test set; identical states are scored once (under
    fedit, ffa and fedex every client holds the same global model).

    The reward margin is measured against ``reference_state``, the federation's shared LoRA
    initialisation (the same for every strategy of a seed), scored once per test set that has
    rejected answers (without them there is no margin to measure).
    """

    def __init__(self, model: PersonalVLM, settings: SimulationSettings, reference_state: dict[str, np.ndarray],
                 encoded: EncodedData | None = None):
        self.model = model
        self.settings = settings
        self.reference_state = reference_state
        self.encoded = encoded or EncodedData()
        self._cache: dict[tuple[str, int], dict] = {}
        self._reference: dict[int, LikelihoodScores | None] = {}

    def metrics(self, state: dict[str, np.ndarray], examples: Sequence) -> dict[str, float | None]:
        key = (_digest(state), id(examples))
        if key not in self._cache:
            prepared = self.encoded.evaluation(self.model, examples)
            reference = self._reference_scores(examples, prepared)
            self.model.load_adapter_state(state)
            result = evaluate(self.model.model, self.model.processor, examples,
                              max_new_tokens=self.settings.max_new_tokens, reference=reference,
                              beta=self.settings.dpo_beta, prepared=prepared)
            self._cache[key] = {name: getattr(result, name) for name in METRICS}
            if result.accuracy is not None:
                self._cache[key]["accuracy_by_kind"] = kind_counts(examples, result.predictions)
        return self._cache[key]

    def _reference_scores(self, examples: Sequence, prepared: EvalInputs) -> LikelihoodScores | None:
        if id(examples) not in self._reference:
            reference = None
            if has_rejected(examples):  # ``evaluate`` uses a reference for the reward margin only
                self.model.load_adapter_state(self.reference_state)
                reference = likelihood_scores(self.model.model, self.model.processor, examples,
                                              chosen=prepared.chosen, rejected=prepared.rejected)
            self._reference[id(examples)] = reference
        return self._reference[id(examples)]


def kind_counts(examples: Sequence, predictions: Sequence[str]) -> dict[str, list[int]]:
    """Per question kind of synthetic records (``fedvlm.edge.data.question_kind``): [right, asked];
    empty for other data. Summed over clients, these say which skill a strategy gains or loses."""
    from fedvlm.edge.answer_metrics import normalize_answer
    from fedvlm.edge.data import question_kind

    counts: dict[str, list[int]] = {}
    for example, prediction in zip(examples, predictions):
        kind = question_kind(example) if hasattr(example, "origin_dataset") else None
        if kind is not None:
            tally = counts.setdefault(kind, [0, 0])
            tally[0] += int(normalize_answer(prediction) == normalize_answer(example.chosen))
            tally[1] += 1
    return counts


def accuracy_by_kind(per_client: Sequence[dict]) -> dict[str, float]:
    """Exact match per question kind over every client's held-out examples pooled (empty when
    the data has no kinds)."""
    totals: dict[str, list[int]] = {}
    for scores in per_client:
        for kind, (right, asked) in (scores.get("accuracy_by_kind") or {}).items():
            tally = totals.setdefault(kind, [0, 0])
            tally[0], tally[1] = tally[0] + right, tally[1] + asked
    return {kind: right / asked for kind, (right, asked) in sorted(totals.items()) if asked}


def mean_metrics(per_client: Sequence[dict]) -> dict[str, float | None]:
    """Each score's mean over clients (None where it does not apply)."""
    return {name: mean_or_none([m[name] for m in per_client]) for name in METRICS}


@dataclasses.dataclass
class RunResult:
    """One (strategy, seed) run; ``to_dict`` is what the per-run file holds."""

    strategy: str
    seed: int
    rounds: list[dict]  # per round: personal accuracy (mean and per client), bytes this round
    per_client: list[dict]
    shared: dict  # what leaves a device: tensor count, values, factors
    seconds: float
    late_joiners: list[dict] = dataclasses.field(default_factory=list)  # per late client: its accuracy

    @property
    def late_joiner_accuracy(self) -> float | None:
        return float(np.mean([c["personal_accuracy"] for c in self.late_joiners])) if self.late_joiners else None

    def mean(self, kind: str) -> dict[str, float | None]:
        """``personal`` or ``global`` scores, mean over clients."""
        return mean_metrics([c[kind] for c in self.per_client])

    def to_dict(self) -> dict:
        personal, global_ = self.mean("personal"), self.mean("global")
        return {"strategy": self.strategy, "seed": self.seed, "personal_accuracy": personal["accuracy"],
                "global_accuracy": global_["accuracy"], "personal": personal, "global": global_,
                "personal_accuracy_by_kind": accuracy_by_kind([c["personal"] for c in self.per_client]),
                "late_joiner_accuracy": self.late_joiner_accuracy,
                "late_joiner_accuracy_by_kind": accuracy_by_kind(self.late_joiners),
                **dataclasses.asdict(self)}


def run(name: str, model_dir: Path, settings: SimulationSettings, seed: int, clients: Sequence[SimulatedClient],
        pooled: Sequence, on_round: OnRound = lambda done: None,
        late_joiners: Sequence[SimulatedClient] = (), encoded: EncodedData | None = None) -> RunResult:
    """Run strategy ``name`` (a ``--strategies`` label: a strategy with options, a variant or a
    reference) for one seed; then adapt and score ``late_joiners``. ``encoded``: the seed's data
    sets already encoded by earlier runs (shared by every strategy of the seed)."""
    started = time.perf_counter()
    encoded = encoded or EncodedData()
    lora = lora_settings(settings, seed)
    # References train both factors and share nothing; labels name a strategy and its options.
    strategy_name, options = ("fedit", {}) if name in (CENTRALISED, BASE) else strategy_spec(name, settings.refit_steps)
    model = PersonalVLM.from_pretrained(model_dir, lora=lora, strategy=build_strategy(strategy_name, options, lora),
                                        quantization=settings.quantization)
    model.reset_adapters()
    start = model.adapter_state()
    if name in (CENTRALISED, BASE):
        rounds, per_client = _reference(name, model, settings, seed, clients, pooled, on_round, encoded)
        shared = {"tensors": 0, "values": 0, "factors": []}
        final, adapt = model.adapter_state(), False  # one model for every client, late ones too
    else:
        rounds, per_client, shared, final_global = _federation(model, settings, seed, clients, pooled, on_round,
                                                               encoded)
        final = model.strategy.absorb(start, final_global) if final_global is not None else start
        adapt = True
    late = [_late_joiner(model, settings, seed, index, client, final, adapt, encoded)
            for index, client in enumerate(late_joiners)]
    return RunResult(name, seed, rounds, per_client, shared, time.perf_counter() - started, late)


def _late_joiner(model: PersonalVLM, settings: SimulationSettings, seed: int, index: int, client: SimulatedClient,
                 state: dict[str, np.ndarray], adapt: bool, encoded: EncodedData) -> dict:
    """A client that never took part: from ``state`` (the shared initialisation with the final
    global version absorbed), its personal part trained on its own data, scored on its own test set."""
    model.load_adapter_state(state)
    steps = 0
    if adapt and model.has_trainable_personal_part():
        config = training_config(settings, settings.late_joiner_steps, seed, settings.rounds + 1, 800 + index)
        model.train_personal(encoded.training(model, client.train, config.objective), config)
        steps = settings.late_joiner_steps
    result = evaluate(model.model, model.processor, client.test, prepared=encoded.evaluation(model, client.test))
    return {"client_id": client.client_id, "description": client.description, "train_examples": len(client.train),
            "test_examples": len(client.test), "adaptation_steps": steps, "personal_accuracy": result.accuracy,
            "accuracy_by_kind": kind_counts(client.test, result.predictions) if result.accuracy is not None else {}}


def _federation(model: PersonalVLM, settings: SimulationSettings, seed: int, clients: Sequence[SimulatedClient],
                pooled: Sequence, on_round: OnRound, encoded: EncodedData) -> tuple[list[dict], list[dict], dict, dict | None]:
    """The rounds; returns per-round and per-client results, what is shared, and the last global
    version (None when nothing is shared)."""
    model.reset_adapters()
    strategy, scorer = model.strategy, Scorer(model, settings, model.adapter_state(), encoded)
    # A client of lower rank is simulated on the federation-rank model with its components
    # beyond its rank zero (they stay zero in training); it sends and absorbs at its own rank.
    full, ranks = model.lora.r, client_ranks(settings, model, len(clients))
    own_rank = at_rank if strategy.heterogeneous_ranks else lambda tensors, rank: dict(tensors)
    states = [own_rank(own_rank(model.adapter_state(), rank), full) for rank in ranks]
    objective = build_objective(settings.objective, settings.dpo_beta)
    training_sets = [encoded.training(model, client.train, objective) for client in clients]
    bytes_up, bytes_down = [0] * len(clients), [0] * len(clients)
    shared_template, _ = strategy.split(states[0])
    previous_global = None
    rounds = []
    for round_number in range(1, settings.rounds + 1):
        selected = select_clients(settings, seed, round_number)
        aggregator = strategy.new_aggregator(model.lora.scaling)
        sent = []
        for index in selected:
            model.load_adapter_state(states[index])
            model.train_encoded(training_sets[index], training_config(settings, settings.local_steps, seed, round_number,
                                                                index))  # fmt: skip
            states[index] = model.adapter_state()
            shared = own_rank(model.shared_update(), ranks[index])
            if shared:  # `local` shares nothing: no message at all
                payload = wire.update_payload(
                    shared, round_number=round_number, client_id=clients[index].client_id,
                    samples=len(clients[index].train), strategy=strategy.name, base_fingerprint=model.fingerprint,
                    lora_config_hash=model.layout_hash)
                aggregator.add(wire.received(payload), weight=len(clients[index].train))
                bytes_up[index] += len(payload)
                sent.append(len(payload))
        down = 0
        if aggregator.count:
            new_global = aggregator.result(previous_global)
            payload = wire.global_version_payload(new_global, round_number=round_number, strategy=strategy.name)
            global_state = wire.received(payload)
            down = len(payload)
            for index in range(len(clients)):  # the global version is retained: every client fetches it
                states[index] = own_rank(strategy.absorb(own_rank(states[index], ranks[index]), global_state), full)
                bytes_down[index] += down
                # Local work only (nothing more is sent), and only by clients that trained this
                # round, so a refit costs what the strategy without it costs with any --fraction.
                if model.strategy.refit_steps and index in selected:
                    model.load_adapter_state(states[index])
                    model.refit_personal(training_sets[index],
                                         training_config(settings, settings.local_steps, seed, round_number, 500 + index))
                    states[index] = model.adapter_state()
            previous_global = new_global
        scores = _scores_of_round(settings, round_number, lambda: [scorer.metrics(states[i], clients[i].test)
                                                                    for i in range(len(clients))])
        rounds.append({"round": round_number, "selected": [clients[i].client_id for i in selected],
                       **scores, "bytes_up_per_client": float(np.mean(sent)) if sent else 0.0,
                       "bytes_down_per_client": down})
        on_round(1)
    per_client = [_client_entry(client, rounds[-1]["per_client_metrics"][i], scorer.metrics(states[i], pooled),
                                lora_rank=ranks[i], bytes_up=bytes_up[i], bytes_down=bytes_down[i])
                  for i, client in enumerate(clients)]
    shared = {"tensors": len(shared_template), "values": int(sum(v.size for v in shared_template.values())),
              "factors": sorted({factor_of(name) for name in shared_template})}
    return rounds, per_client, shared, previous_global


def client_ranks(settings: SimulationSettings, model: PersonalVLM, n_clients: int) -> list[int]:
    """Each client's LoRA rank: ``settings.client_ranks`` in turn under a strategy whose devices may
    differ in rank, else the federation's."""
    if not settings.client_ranks or not model.strategy.heterogeneous_ranks:
        return [model.lora.r] * n_clients
    return [settings.client_ranks[index % len(settings.client_ranks)] for index in range(n_clients)]


def _reference(name: str, model: PersonalVLM, settings: SimulationSettings, seed: int,
               clients: Sequence[SimulatedClient], pooled: Sequence, on_round: OnRound,
               encoded: EncodedData) -> tuple[list[dict], list[dict]]:
    """``centralised``: one LoRA on the union of the clients' training data, with as many optimiser
    steps per round as the federation's selected clients take together; ``base``: no training."""
    model.reset_adapters()
    scorer = Scorer(model, settings, model.adapter_state(), encoded)
    union = encode_examples(model.processor, [record for client in clients for record in client.train],
                            objective=build_objective(settings.objective, settings.dpo_beta)) \
        if name == CENTRALISED else []  # ``base`` trains on nothing
    rounds = []
    for round_number in range(1, settings.rounds + 1):
        if name == CENTRALISED:
            train(model.model, model.processor, union,
                  training_config(settings, settings.local_steps * settings.selected_per_round, seed,
                                  round_number, stream=999))
        state = model.adapter_state()
        scores = _scores_of_round(settings, round_number, lambda: [scorer.metrics(state, client.test)
                                                                    for client in clients])
        rounds.append({"round": round_number, "selected": [], **scores, "bytes_up_per_client": 0.0,
                       "bytes_down_per_client": 0})
        on_round(1)
    global_scores = scorer.metrics(model.adapter_state(), pooled)
    per_client = [_client_entry(client, rounds[-1]["per_client_metrics"][i], global_scores, lora_rank=None,
                                bytes_up=0, bytes_down=0) for i, client in enumerate(clients)]
    return rounds, per_client


def _scores_of_round(settings: SimulationSettings, round_number: int, score: Callable[[], list[dict]]) -> dict:
    """A round's scores; with ``score_every_round`` off only the last round is scored (the others'
    are None): scoring every client every round is about half a run's time."""
    if settings.score_every_round or round_number == settings.rounds:
        return _round_scores(score())
    return {"personal_accuracy": None, "per_client": None, "personal": dict.fromkeys(METRICS),
            "per_client_metrics": None}


def _round_scores(scores: Sequence[dict]) -> dict:
    """A round's record: exact match per client and mean (as before long answers were scored), and every score."""
    return {"personal_accuracy": mean_or_none([s["accuracy"] for s in scores]),
            "per_client": [s["accuracy"] for s in scores], "personal": mean_metrics(scores),
            "per_client_metrics": list(scores)}


def _client_entry(client: SimulatedClient, personal: dict, global_: dict, *, lora_rank: int | None, bytes_up: int,
                  bytes_down: int) -> dict:
    """A client's final scores: with its own model on its own held-out data, and on the pooled test set."""
    entry = {"client_id": client.client_id, "description": client.description, "train_examples": len(client.train),
             "test_examples": len(client.test), "personal_accuracy": personal["accuracy"],
             "global_accuracy": global_["accuracy"], "personal": personal, "global": global_,
             "bytes_up": bytes_up, "bytes_down": bytes_down}
    if lora_rank is not None:
        entry["lora_rank"] = lora_rank
    return entry

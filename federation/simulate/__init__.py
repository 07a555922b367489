"""``fedvlm simulate``: a whole federation in one process, every strategy side by side.

One base model in memory, clients as swappable adapter states, FedVLM's own trainer,
strategies, aggregation and wire encoding; results, tables and plots in ``--out``.

    from fedvlm.simulate import SimulationSettings, simulate
    results = simulate(SimulationSettings(out=Path("work/sim"), scenario="concept-shift", seeds=(0, 1, 2)))
"""

from fedvlm.simulate.settings import ALL_STRATEGIES, DEFAULT_STRATEGIES, SCENARIOS, Partition, SimulationSettings

__all__ = ["ALL_STRATEGIES", "DEFAULT_STRATEGIES", "Partition", "SCENARIOS", "SimulationSettings", "simulate"]


def __getattr__(name: str):
    # Lazily: the runner needs torch, and `fedvlm --help` should not wait for it.
    if name == "simulate":
        from fedvlm.simulate.runner import simulate

        return simulate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

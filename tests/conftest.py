"""Fixtures shared by the whole suite: a tiny VLM saved to disk and a small data set.

Everything is built locally (nothing can be downloaded) and loaded back through the real
loading code.
"""

from __future__ import annotations

import os

import pytest

# Offline semantics everywhere: a missing local model must be an error, never a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs hubs, devices and brokers side by side on few cores; OpenMP threads that
# spin while waiting starve the others (measured 4-8x slower training here). Subprocesses
# inherit this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from fedvlm.edge.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_federation():
    """Two clients' worth of synthetic concept-shift data at the tiny model's image size."""
    from fedvlm.edge.data.synthetic import ScenarioConfig, generate_federation

    config = ScenarioConfig.preset("concept-shift", n_clients=2, examples_per_client=32,
                                   test_examples_per_client=16, image_size=32, seed=0)
    return generate_federation(config)


@pytest.fixture(scope="session")
def colour_examples():
    """24 one-colour images asking for their colour: quick to learn, for training tests."""
    import dataclasses

    from PIL import Image

    @dataclasses.dataclass
    class Example:
        image: Image.Image
        question: str
        chosen: str

    colours = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230)}
    return [Example(Image.new("RGB", (32, 32), rgb), "what colour is it?", name) for name, rgb in colours.items()] * 8

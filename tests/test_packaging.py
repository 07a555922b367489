"""Packaging promises: every code folder ships, the commands answer --help, the layers stay apart."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    setuptools = _pyproject()["tool"]["setuptools"]
    folder_of = setuptools["package-dir"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in folder_of.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == listed, f"pyproject lists {sorted(listed)}, folders hold {sorted(found)}"


@pytest.mark.parametrize("command", ["fedvlm", "fedvlm-edge", "fedvlm-hub"])
def test_console_scripts_answer_help(command):
    result = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage:" in result.stdout


def _imports(folder: str) -> set[str]:
    names = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return names


def test_edge_and_hub_never_import_each_other():
    assert not any(name.startswith("fedvlm.hub") for name in _imports("edge_sdk"))
    assert not any(name.startswith("fedvlm.edge") for name in _imports("hub"))
    assert not any(name.split(".")[0] in {"torch", "transformers", "peft"} for name in _imports("hub"))
    shared = _imports("shared")
    assert not any(name.startswith(("fedvlm.edge", "fedvlm.hub", "torch", "transformers")) for name in shared)


def test_torch_and_torchvision_are_the_pinned_pair():
    import torch
    import torchvision

    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#")
    )
    assert torch.__version__.split("+")[0] == pins["torch"]
    assert torchvision.__version__.split("+")[0] == pins["torchvision"]
    # The pair really works together: the operator that a mismatched torchvision lacks.
    assert torchvision.ops.nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1.0]), 0.5).tolist() == [0]

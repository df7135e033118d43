"""The conda recipe and environment.yml against setup.py (conda itself cannot run here: no channels)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch", "matplotlib": "matplotlib-base"}


def core_requirements() -> dict[str, str]:
    """setup.py's CORE list as {conda name: lower bound}."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    (core,) = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and any(getattr(target, "id", None) == "CORE" for target in node.targets)]
    requirements = {}
    for item in ast.literal_eval(core):
        name, bound = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", item).groups()
        requirements[CONDA_NAMES.get(name, name)] = bound
    return requirements


def section(text: str, name: str) -> str:
    """The lines of a two-space-indented section of meta.yaml (``host``, ``run``, …)."""
    match = re.search(rf"^  {name}:\n((?:    .*\n|\s*#.*\n)+)", text, re.MULTILINE)
    assert match, f"no {name} section"
    return match.group(1)


@pytest.mark.parametrize("path", ["conda-recipe/meta.yaml", "environment.yml"])
def test_every_core_requirement_is_listed_with_the_same_lower_bound(path):
    text = (ROOT / path).read_text()
    if path.endswith("meta.yaml"):
        text = section(text, "run")
    for name, bound in core_requirements().items():
        if name == "openmm" and path.endswith("meta.yaml"):
            assert "pin_compatible('openmm'" in text  # the version the plugin was compiled against
            continue
        assert re.search(rf"^\s*- {re.escape(name)} >={re.escape(bound)}\s*$", text, re.MULTILINE), (name, bound)
    assert re.search(r"^\s*- openmm-torch >=", text, re.MULTILINE)


def test_the_recipe_compiles_the_native_plugin():
    text = (ROOT / "conda-recipe" / "meta.yaml").read_text()
    assert not re.search(r"^\s*noarch:", text, re.MULTILINE)  # a compiled plugin is not noarch
    assert "{{ compiler('cxx') }}" in section(text, "build")
    assert re.search(r"^\s*- openmm >=", section(text, "host"), re.MULTILINE)
    assert "python -m openmm_flowmatch.native status" in text
    assert "cxx-compiler" in (ROOT / "environment.yml").read_text()

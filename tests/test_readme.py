"""The README's "use it in your OpenMM script" example runs as written.

The snippet is read from README.md itself, so the README cannot drift from the API. The
artifact it loads is a randomly initialised CGNet with priors fitted to jittered copies of the
bundled structure; the check is that the plain OpenMM script builds the System, takes steps and
stays finite, and that its energy equals the artifact's own network energy plus the priors.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    text = README.read_text()
    section = text.split("## Use it in your OpenMM script", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "README has no python block under 'Use it in your OpenMM script'"
    return match.group(1)


@pytest.fixture
def artifact_directory(tmp_path, alanine_dipeptide_pdb):
    from openmm_flowmatch import CGMapping, Priors, export_force_field
    from openmm_flowmatch.forcefield.features import InvariantFeatures
    from openmm_flowmatch.forcefield.networks import CGNet

    shutil.copy(alanine_dipeptide_pdb, tmp_path / "alanine_dipeptide.pdb")
    pdb = app.PDBFile(str(alanine_dipeptide_pdb))
    mapping = CGMapping.backbone(pdb.topology)
    beads = mapping.map_positions(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    generator = np.random.default_rng(0)
    samples = beads + generator.normal(scale=0.01, size=(200, *beads.shape[1:]))
    priors = Priors.fit(samples, mapping.bonds, temperature=300.0)
    model = CGNet(InvariantFeatures.from_positions(samples, bonds=mapping.bonds))
    export_force_field(model, tmp_path / "ala2.pt", priors=priors, mapping=mapping, temperature=300.0,
                       training={"method": "untrained (test)"})
    return tmp_path, model, priors, beads[0]


def test_readme_example_runs_in_plain_openmm(artifact_directory, monkeypatch):
    directory, model, priors, start = artifact_directory
    monkeypatch.chdir(directory)
    namespace: dict = {}
    exec(compile(readme_snippet(), str(README), "exec"), namespace)

    simulation = namespace["simulation"]
    state = simulation.context.getState(getEnergy=True, getPositions=True)
    positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    assert np.all(np.isfinite(positions))
    assert not np.allclose(positions, start)  # it moved

    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    x = torch.tensor(positions, dtype=torch.float64)
    with torch.no_grad():
        expected = float(model.double()(x[None])[0] + priors.energy(x))
    np.testing.assert_allclose(energy, expected, rtol=1e-4, atol=1e-3)

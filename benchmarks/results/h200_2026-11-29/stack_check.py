"""Versions, platforms, and a TorchForce System XML round trip evaluated on CUDA (exit 0 = usable)."""
import sys
import numpy as np
import openmm
import openmm.unit as unit
import torch

import openmmtorch

print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "openmm", openmm.__version__, "openmmtorch", getattr(openmmtorch, "__version__", "?"))
print("platforms", [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())])
print("plugin load failures", openmm.Platform.getPluginLoadFailures())
print("device", torch.cuda.get_device_name(0))


class Spring(torch.nn.Module):
    def forward(self, positions):
        return torch.sum(positions ** 2)


module = torch.jit.script(Spring())
module.save("/tmp/spring.pt")
system = openmm.System()
for _ in range(3):
    system.addParticle(1.0)
system.addForce(openmmtorch.TorchForce("/tmp/spring.pt"))
copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
print("deserialized TorchForce System")
positions = np.arange(9.0).reshape(3, 3) * 0.1
for platform in ("CPU", "CUDA"):
    context = openmm.Context(copy, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    assert abs(energy - np.sum(positions ** 2)) < 1e-4, energy
    assert np.abs(forces + 2 * positions).max() < 1e-4
    print(platform, "energy", energy, "ok")

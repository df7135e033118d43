"""Force matching on a synthetic target with a known potential; checkpoints, resume, early stopping."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from openmm_flowmatch.forcefield import CGNet, InvariantFeatures, TrainingError, forces_of, train_force_field
from openmm_flowmatch.priors import HarmonicBonds, Priors

N_BEADS = 5
BONDS = [(i, i + 1) for i in range(N_BEADS - 1)]
PAIRS = [(i, j) for i in range(N_BEADS) for j in range(i + 2, N_BEADS)]
PAIR_SPRING = 100.0  # kJ/mol/nm²
PAIR_LENGTH = 0.3  # nm
RIPPLE_HEIGHT = 5.0  # kJ/mol
RIPPLE_LENGTH = 0.1  # nm


def random_chains(n_frames: int, seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    steps = generator.normal(size=(n_frames, N_BEADS, 3))
    lengths = 0.15 + 0.01 * generator.normal(size=(n_frames, N_BEADS, 1))
    steps = lengths * steps / np.linalg.norm(steps, axis=-1, keepdims=True)
    return np.cumsum(steps, axis=1)


def pair_energy(positions: torch.Tensor) -> torch.Tensor:
    """The known non-bonded part on all pairs two or more bonds apart: a spring plus a ripple,
    E = Σ k (d − d₀)² + h cos(d / λ)."""
    energy = torch.zeros(positions.shape[:-2], dtype=positions.dtype)
    for first, second in PAIRS:
        distance = torch.linalg.vector_norm(positions[..., second, :] - positions[..., first, :], dim=-1)
        energy = energy + PAIR_SPRING * (distance - PAIR_LENGTH) ** 2 + RIPPLE_HEIGHT * torch.cos(distance / RIPPLE_LENGTH)
    return energy


def known_priors() -> Priors:
    return Priors([HarmonicBonds(BONDS, [0.15] * 4, [5000.0] * 4)])


def synthetic_data(n_frames: int, seed: int, priors: Priors) -> tuple[np.ndarray, np.ndarray]:
    positions = random_chains(n_frames, seed)
    total = lambda x: pair_energy(x) + priors.energy(x)  # noqa: E731
    forces = forces_of(total, torch.tensor(positions)).numpy()
    return positions, forces


def small_model(positions: np.ndarray, seed: int = 0) -> CGNet:
    torch.manual_seed(seed)
    return CGNet(InvariantFeatures.from_positions(positions), hidden_width=48, n_layers=2)


def test_training_recovers_the_forces_of_a_known_potential():
    priors = known_priors()
    train, validation = synthetic_data(800, 0, priors), synthetic_data(200, 1, priors)
    model = train_force_field(
        train, priors, validation_data=validation,
        # the known potential acts on pairs two bonds apart: the force-matching default ("all") sees them
        model_kwargs={"hidden_width": 32, "n_layers": 2, "activation": "silu"},
        epochs=15, batch_size=50, learning_rate=1e-2, progress=False, seed=3,
    )
    info = model.training_info
    assert info["best_validation_loss"] < 0.05 * info["initial_validation_loss"]
    assert info["validation_loss"][-1] < info["validation_loss"][0]
    # stated error: on fresh configurations the total force −∇(U_prior+U_net) recovers the
    # non-bonded target forces with a relative RMS error below 20 %
    test_positions, test_forces = synthetic_data(300, 2, priors)
    x = torch.tensor(test_positions, dtype=torch.float32)
    predicted = forces_of(lambda p: model(p) + priors.energy(p), x).double().numpy()
    pair_forces = test_forces - priors.forces(torch.tensor(test_positions)).numpy()
    relative_error = np.sqrt(np.mean((predicted - test_forces) ** 2) / np.mean(pair_forces**2))
    assert relative_error < 0.2, relative_error
    # an untrained network of the same shape does far worse
    untrained = small_model(test_positions)
    untrained_forces = forces_of(lambda p: untrained(p) + priors.energy(p), x).double().numpy()
    assert np.sqrt(np.mean((untrained_forces - test_forces) ** 2) / np.mean(pair_forces**2)) > 0.8


def test_loss_is_the_mse_of_the_total_forces():
    """Training on F − F_prior is the same objective as MSE(−∇(U_prior+U_net), F)."""
    priors = known_priors()
    positions, forces = synthetic_data(40, 4, priors)
    model = small_model(positions).double()
    x = torch.tensor(positions)
    total = forces_of(lambda p: model(p) + priors.energy(p), x)
    direct = torch.mean((total - torch.tensor(forces)) ** 2)
    residual = torch.tensor(forces) - priors.forces(x)
    from openmm_flowmatch.forcefield import force_matching_loss

    torch.testing.assert_close(force_matching_loss(model, x, residual, create_graph=False), direct)
    # the trainer's recorded initial validation loss is this number for the held-out block
    trained = train_force_field(
        (positions, forces), priors, model=small_model(positions), validation_fraction=0.25,
        epochs=0, progress=False, dtype=torch.float64,
    )
    held_out = slice(30, 40)
    reference = small_model(positions).double()
    expected = torch.mean(
        (forces_of(lambda p: reference(p) + priors.energy(p), x[held_out]) - torch.tensor(forces[held_out])) ** 2
    )
    assert trained.training_info["initial_validation_loss"] == pytest.approx(float(expected), rel=1e-10)
    assert trained.training_info["frames"] == 30 and trained.training_info["validation_frames"] == 10


def test_checkpoint_resume_gives_the_uninterrupted_result(tmp_path):
    priors = known_priors()
    positions, forces = synthetic_data(200, 5, priors)
    options = dict(batch_size=40, learning_rate=2e-3, progress=False, seed=7, early_stopping_patience=0)
    straight = train_force_field((positions, forces), priors, model=small_model(positions), epochs=4, **options)
    checkpoint = tmp_path / "ff.ckpt"
    train_force_field((positions, forces), priors, model=small_model(positions), epochs=2,
                      checkpoint_path=checkpoint, **options)
    assert checkpoint.exists()
    resumed = train_force_field((positions, forces), priors, model=small_model(positions), epochs=4,
                                checkpoint_path=checkpoint, **options)
    assert resumed.training_info["epochs"] == 4
    np.testing.assert_allclose(resumed.training_info["validation_loss"], straight.training_info["validation_loss"], rtol=1e-6)
    for (name, value), other in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(value, other, msg=name)
    # a checkpoint of another run is refused, not silently continued
    with pytest.raises(TrainingError, match=r"another run \(frames: was \d+, now \d+"):
        train_force_field((positions[:150], forces[:150]), priors, model=small_model(positions), epochs=4,
                          checkpoint_path=checkpoint, **options)
    # resume=False starts afresh
    fresh = train_force_field((positions, forces), priors, model=small_model(positions), epochs=1,
                              checkpoint_path=checkpoint, resume=False, **options)
    assert fresh.training_info["epochs"] == 1


def test_same_seed_same_model_and_early_stopping():
    priors = known_priors()
    positions, forces = synthetic_data(120, 6, priors)
    options = dict(epochs=3, batch_size=30, progress=False, seed=11, model_kwargs={"hidden_width": 16, "n_layers": 2})
    first = train_force_field({"positions": positions, "forces": forces}, priors, **options)
    second = train_force_field({"positions": positions, "forces": forces}, priors, **options)
    for value, other in zip(first.state_dict().values(), second.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=0, atol=0)
    # an unreachable improvement threshold stops training after `patience` epochs without one
    stopped = train_force_field(
        (positions, forces), priors, epochs=50, batch_size=30, progress=False, early_stopping_patience=2,
        minimum_improvement=1e12, model_kwargs={"hidden_width": 16, "n_layers": 2},
    )
    assert stopped.training_info["stopped_early"] and stopped.training_info["epochs"] == 3
    assert stopped.training_info["best_epoch"] == 0


def test_dataset_objects_and_bad_input():
    priors = known_priors()
    positions, forces = synthetic_data(60, 7, priors)
    from openmm_flowmatch.data.dataset import CGDataset

    train, validation, _ = CGDataset(positions, forces, temperature=300.0).split(validation=0.2, test=0.1)
    model = train_force_field(train, priors, validation_data=validation, epochs=1, progress=False,
                              method="flow-matching",
                              model_kwargs={"hidden_width": 8, "n_layers": 1, "lipschitz_bound": 2.0})
    info = model.training_info
    assert info["method"] == "flow-matching" and info["temperature"] == 300.0 and info["model"]["class"] == "CGNet"
    assert info["frames"] == len(train.positions) and info["validation_frames"] == len(validation.positions)
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            assert torch.linalg.matrix_norm(layer.weight.double(), 2) <= 2.0 + 1e-6
    with pytest.raises(TrainingError, match="no forces"):
        train_force_field(types.SimpleNamespace(positions=positions, forces=None), priors, progress=False)
    with pytest.raises(TrainingError, match="shape"):
        train_force_field((positions, forces[:, :4]), priors, progress=False)
    with pytest.raises(TrainingError, match="NaN"):
        bad = forces.copy()
        bad[3, 1, 0] = np.nan
        train_force_field((positions, bad), priors, progress=False)
    with pytest.raises(TrainingError, match="method"):
        train_force_field((positions, forces), priors, method="magic", progress=False)
    with pytest.raises(TrainingError, match="6 beads"):
        features = InvariantFeatures(6)
        train_force_field((positions, forces), priors, model=CGNet(features, hidden_width=8, n_layers=1), progress=False)


def test_corrupt_checkpoint_raises_clear_error(tmp_path):
    priors = known_priors()
    positions, forces = synthetic_data(40, 8, priors)
    checkpoint = tmp_path / "broken.ckpt"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="broken.ckpt"):
        train_force_field((positions, forces), priors, epochs=1, checkpoint_path=checkpoint, progress=False)


# -------------------------------------------------------------- precomputed features, step budgets
def test_precomputed_feature_forces_equal_autograd_forces():
    from openmm_flowmatch.forcefield.training import feature_jacobians, forces_from_features

    positions = torch.tensor(random_chains(50, 9))
    for features in (InvariantFeatures.from_positions(positions),
                     InvariantFeatures.from_positions(positions, min_separation=1),
                     InvariantFeatures(N_BEADS, include_angles=False, include_distances=False)):
        torch.manual_seed(0)
        model = CGNet(features, hidden_width=24, n_layers=3, activation="silu").double()
        values, jacobian = feature_jacobians(model.features, positions)
        assert jacobian.shape == (50, features.n_features, 3 * N_BEADS)
        expected = forces_of(model, positions).flatten(1)
        got = forces_from_features(model, values, jacobian)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


def test_training_along_both_paths_gives_the_same_parameters():
    priors = known_priors()
    positions, forces = synthetic_data(120, 10, priors)
    options = dict(epochs=2, batch_size=32, progress=False, seed=3, dtype=torch.float64, early_stopping_patience=0,
                   model_kwargs={"hidden_width": 24, "n_layers": 3, "lipschitz_bound": 1.0})
    fast = train_force_field((positions, forces), priors, precompute_features=True, **options)
    slow = train_force_field((positions, forces), priors, precompute_features=False, **options)
    assert fast.training_info["precomputed_features"] and not slow.training_info["precomputed_features"]
    for (name, value), other in zip(fast.state_dict().items(), slow.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=1e-8, atol=1e-8, msg=name)
    # over the memory limit: falls back to the autograd path
    limited = train_force_field((positions, forces), priors, feature_memory_limit=1.0, **options)
    assert not limited.training_info["precomputed_features"]


def test_message_passing_networks_train_through_the_features():
    from openmm_flowmatch.forcefield import MessagePassingNet

    priors = known_priors()
    positions, forces = synthetic_data(40, 12, priors)
    model = MessagePassingNet([0, 1, 1, 1, 0], hidden_width=8, n_interactions=1, n_radial=4)
    trained = train_force_field((positions, forces), priors, model=model, max_steps=3, batch_size=16, progress=False)
    assert not trained.training_info["precomputed_features"] and trained.training_info["steps"] == 3


def test_step_budget_validation_interval_and_patience_in_steps():
    priors = known_priors()
    positions, forces = synthetic_data(100, 13, priors)  # 90 training frames: 3 batches of 30 an epoch
    options = dict(batch_size=30, progress=False, seed=2, model_kwargs={"hidden_width": 16, "n_layers": 2})
    trained = train_force_field((positions, forces), priors, max_steps=7, validation_interval=2, epochs=1, **options)
    info = trained.training_info
    assert info["steps"] == 7 and info["validation_steps"] == [2, 4, 6, 7] and len(info["validation_loss"]) == 4
    stopped = train_force_field((positions, forces), priors, max_steps=100, validation_interval=2, patience_steps=4,
                                minimum_improvement=1e12, **options)
    assert stopped.training_info["stopped_early"] and stopped.training_info["validation_steps"] == [2, 4, 6]
    assert stopped.training_info["best_step"] == 2


def test_published_schedule_decays_from_3e_3_to_1e_5():
    from openmm_flowmatch.forcefield.training import published_schedule

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=3e-3)
    scheduler = published_schedule(optimizer, 1000)
    rates = []
    for _ in range(1000):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(3e-3) and rates[299] == pytest.approx(3e-3) and rates[-1] == pytest.approx(1e-5)
    assert len(set(np.round(rates, 12))) == 6
    priors = known_priors()
    positions, forces = synthetic_data(60, 14, priors)
    model = train_force_field((positions, forces), priors, max_steps=4, learning_rate_schedule="published",
                              progress=False, model_kwargs={"hidden_width": 8, "n_layers": 1})
    assert model.training_info["learning_rate"] == 3e-3 and model.training_info["learning_rate_schedule"] == "published"
    with pytest.raises(TrainingError, match="learning_rate_schedule"):
        train_force_field((positions, forces), priors, learning_rate_schedule="cosine", progress=False)


def test_resume_in_the_middle_of_an_epoch_gives_the_uninterrupted_result(tmp_path):
    priors = known_priors()
    positions, forces = synthetic_data(200, 15, priors)  # 180 training frames: 5 batches of 40
    options = dict(batch_size=40, progress=False, seed=4, early_stopping_patience=0, validation_interval=3,
                   model_kwargs={"hidden_width": 16, "n_layers": 2})
    straight = train_force_field((positions, forces), priors, max_steps=9, **options)
    checkpoint = tmp_path / "steps.ckpt"
    train_force_field((positions, forces), priors, max_steps=3, checkpoint_path=checkpoint, **options)
    resumed = train_force_field((positions, forces), priors, max_steps=9, checkpoint_path=checkpoint, **options)
    assert resumed.training_info["validation_steps"] == [3, 6, 9]
    for (name, value), other in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=0, atol=0, msg=name)

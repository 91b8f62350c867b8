"""Every invalid privacy setting fails before training, naming the field and the bound."""

import warnings

import pytest
import torch
from torch.utils.data import IterableDataset

from dpldm.errors import ConfigError
from dpldm.privacy.sampling import poisson_loader
from dpldm.privacy.settings import DifferentialPrivacy, PriorRelease, check_trainer, plan

F = "model.init_args.privacy.init_args"


@pytest.mark.parametrize("kwargs, field, bound", [
    ({"epsilon": 0.0}, f"{F}.epsilon", "> 0"),
    ({"epsilon": -1.0}, f"{F}.epsilon", "> 0"),
    ({"epsilon": None}, f"{F}.epsilon", "noise_multiplier"),
    ({"max_grad_norm": 0.0}, f"{F}.max_grad_norm", "> 0"),
    ({"noise_multiplier": -0.5}, f"{F}.noise_multiplier", ">= 0"),
    ({"accountant": "gdp"}, f"{F}.accountant", "prv"),
    ({"max_physical_batch_size": 0}, f"{F}.max_physical_batch_size", ">= 1"),
    ({"prior": [PriorRelease(1.0, 0.01, 10), PriorRelease(0.0, 0.01, 10)]}, f"{F}.prior[1].noise_multiplier", "> 0"),
    ({"prior": [PriorRelease(1.0, 1.5, 10)]}, f"{F}.prior[0].sample_rate", "(0, 1]"),
    ({"prior": [PriorRelease(1.0, 0.01, 0)]}, f"{F}.prior[0].steps", ">= 1"),
])
def test_invalid_settings_raise(kwargs, field, bound):
    with pytest.raises(ConfigError) as err:
        DifferentialPrivacy(**kwargs)
    assert err.value.field == field and bound in err.value.bound


@pytest.mark.parametrize("delta", [0.0, -1e-6, 1e-3, 1.0])  # N = 1000: (0, 1e-3)
def test_delta_outside_zero_one_over_n(delta):
    with pytest.raises(ConfigError, match=r"delta.*\(0, 1/N\)"):
        plan(DifferentialPrivacy(delta=delta), 1000, 10, 100, None)


def test_delta_above_one_over_10n_warns_and_default_is_one_over_10n():
    with pytest.warns(UserWarning, match="1/\\(10N\\)"):
        plan(DifferentialPrivacy(delta=5e-4), 1000, 10, 100, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = plan(DifferentialPrivacy(), 1000, 10, 100, None)
    assert p.delta == pytest.approx(1e-4) and p.sample_rate == pytest.approx(0.01)


@pytest.mark.parametrize("batch_size", [0, 1001])
def test_sample_rate_outside_zero_one(batch_size):
    with pytest.raises(ConfigError, match="data.init_args.batch_size.*q = "):
        plan(DifferentialPrivacy(), 1000, batch_size, 100, None)


def test_planned_steps_from_max_steps_or_epochs():
    assert plan(DifferentialPrivacy(), 1000, 50, 123, 7).planned_steps == 123
    assert plan(DifferentialPrivacy(), 1000, 50, -1, 7).planned_steps == 7 * 20
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        plan(DifferentialPrivacy(), 1000, 50, -1, -1)


class _Trainer:
    def __init__(self, accumulate=1, distributed=False, clip=None, world_size=1, precision="32-true", strategy=None):
        self.accumulate_grad_batches, self.gradient_clip_val, self.world_size = accumulate, clip, world_size
        self.precision, self.strategy = precision, strategy
        self._accelerator_connector = type("C", (), {"use_distributed_sampler": distributed})()


@pytest.mark.parametrize("trainer, field", [
    (_Trainer(accumulate=4), "trainer.accumulate_grad_batches"),
    (_Trainer(distributed=True), "trainer.use_distributed_sampler"),
    (_Trainer(clip=1.0), "trainer.gradient_clip_val"),
    (_Trainer(world_size=2, strategy=object()), "trainer.strategy.*DDP"),
    (_Trainer(precision="16-mixed"), "trainer.precision"),
])
def test_trainer_settings_that_break_dp(trainer, field):
    with pytest.raises(ConfigError, match=field):
        check_trainer(trainer)


def test_plain_trainer_settings_pass():
    from lightning.pytorch.strategies import DDPStrategy

    check_trainer(_Trainer())
    check_trainer(_Trainer(precision="bf16-mixed"))
    check_trainer(_Trainer(world_size=2, strategy=DDPStrategy()))  # noise once for the global batch


def test_secure_mode_excludes_a_seed():
    with pytest.raises(ConfigError, match="privacy.init_args.seed.*secure_mode"):
        DifferentialPrivacy(secure_mode=True, seed=0)
    assert DifferentialPrivacy(secure_mode=True).seed is None


def test_iterable_dataset_is_rejected():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1)

    with pytest.raises(ConfigError, match="map-style dataset of known size N"):
        poisson_loader(Stream(), 4, seed=0)

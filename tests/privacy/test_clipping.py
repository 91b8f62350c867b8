"""Book-keeping clipping (``fast``, ``ghost``) gives the update of Opacus's per-example gradients (``hooks``)."""

from pathlib import Path

import pytest
import torch

from dpldm.errors import ConfigError
from dpldm.modules import FrozenAutoencoder, LatentDiffusion, OpenCLIPTextEncoder, build_autoencoder, build_unet
from dpldm.privacy import DifferentialPrivacy, TrainableScope
from dpldm.privacy.clipping import BookKeepingClipper
from tests.conftest import TINY_AE, TINY_UNET
from tests.privacy.common import batch, dp_update, make_engine, make_model

ARCH = str(Path(__file__).resolve().parents[2] / "configs" / "laion" / "tiny-clip.json")


@pytest.mark.parametrize("mode", ["fast", "ghost"])
@pytest.mark.parametrize("noise_draws, physical, kind", [
    (1, 7, "attention"), (3, 7, "attention"), (2, 3, "attention"), (2, 4, "full"), (1, 7, "cross_attention"),
    (2, 3, "lora"), (2, 4, "full+updown"),
])
def test_modes_give_the_same_clipped_noised_update(mode, noise_draws, physical, kind):
    data, updates = batch(7), {}
    kind, updown = kind.split("+")[0], kind.endswith("+updown")  # updown: a resblock_updown UNet (DP-LDM's)
    for clipping in ("hooks", mode):
        model = make_model(noise_draws, kind, updown)
        engine = make_engine(model, 7, sigma=0.5, clip=0.05, clipping=clipping, physical=physical)
        updates[clipping] = dp_update(model, engine, data, noise_draws)
    assert updates["hooks"].abs().max() > 0
    torch.testing.assert_close(updates[mode], updates["hooks"], rtol=1e-4, atol=1e-7)


def test_same_update_with_a_text_projection_and_an_empty_batch():
    def model():
        torch.manual_seed(0)
        return LatentDiffusion(build_unet(**TINY_UNET), FrozenAutoencoder(build_autoencoder(**TINY_AE)),
                               OpenCLIPTextEncoder(ARCH, pretrained=None, projection_dim=16), noise_draws=2,
                               scope=TrainableScope("attention"), privacy=DifferentialPrivacy(seed=0)).train()

    data = {"image": batch(5)["image"], "caption": ["a", "b c", "d", "e f g", "h"]}
    for d in (data, {}):
        updates = {}
        for clipping in ("hooks", "fast"):
            m = model()
            updates[clipping] = dp_update(m, make_engine(m, 5, sigma=0.5, clip=0.05, clipping=clipping), d, 2)
        torch.testing.assert_close(updates["fast"], updates["hooks"], rtol=1e-4, atol=1e-7)


def test_each_clipped_example_contributes_at_most_c():
    model = make_model(noise_draws=2)
    engine = make_engine(model, batch_size=6, sigma=0.0, clip=1e-3, clipping="fast")
    update = dp_update(model, engine, batch(6), noise_draws=2)
    assert update.norm() <= 6 * 1e-3 / 6 + 1e-7  # ||sum of clipped|| / B <= n C / B
    assert update.norm() > 0.1 * 1e-3  # and the examples were clipped to C, not to 0


def test_fast_mode_keeps_no_tensors_outside_a_step_and_refuses_unknown_layers():
    model = make_model()
    engine = make_engine(model, 6, clipping="fast")
    with torch.no_grad():  # e.g. sampling between steps: nothing is captured
        model.per_example_loss(batch(6))
    assert not engine.clipper.inputs and not engine.clipper.grads
    with pytest.raises(ConfigError, match="clipping: hooks"):
        BookKeepingClipper([torch.nn.PReLU()])


def test_unknown_clipping_mode_names_the_field():
    with pytest.raises(ConfigError, match="privacy.init_args.clipping"):
        DifferentialPrivacy(clipping="fastest")


def test_full_scope_convolutions_are_clipped_without_per_example_gradients(monkeypatch):
    """k x k convolutions take the Linear path (unfolded patches; ghost norms where cheaper), not Opacus's
    per-example conv gradients: with that sampler gone, ``fast`` still gives ``hooks``' update."""
    from opacus.grad_sample import GradSampleModule

    model = make_model(2, "full")
    expected = dp_update(model, make_engine(model, 7, sigma=0.5, clip=0.05, physical=4), batch(7), 2)

    def refuse(*args):
        raise AssertionError("Opacus's per-example conv gradients were instantiated")

    monkeypatch.setitem(GradSampleModule.GRAD_SAMPLERS, torch.nn.Conv2d, refuse)
    model = make_model(2, "full")
    convs = [m for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert any(p.requires_grad for m in convs for p in m.parameters())
    update = dp_update(model, make_engine(model, 7, sigma=0.5, clip=0.05, clipping="fast", physical=4), batch(7), 2)
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-7)

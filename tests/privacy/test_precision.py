"""DP-SGD under bf16-mixed precision (the GPU recipes' setting), checked on the CPU's bf16 autocast: the forward
and backward run in bf16, per-example norms, clipping, the clipped sum and the noise in the fp32 of the master
weights."""

import copy

import pytest
import torch

from tests.privacy.common import batch, data, dp_model, dp_update, make_engine, make_model, trainer


def bf16_update(clipping, sigma=0.0, clip=0.05, n=6, kind="attention"):
    model = make_model(noise_draws=2, kind=kind)
    engine = make_engine(model, n, sigma=sigma, clip=clip, clipping=clipping, physical=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        update = dp_update(model, engine, batch(n), noise_draws=2)
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    return update


@pytest.mark.parametrize("clipping, kind", [("fast", "attention"), ("ghost", "attention"), ("hooks", "attention"),
                                            ("fast", "full")])
def test_bf16_step_clips_in_fp32_and_matches_the_per_example_gradient_path(clipping, kind):
    update = bf16_update(clipping, kind=kind)
    assert update.dtype == torch.float32 and torch.isfinite(update).all() and update.abs().max() > 0
    assert update.norm() <= 6 * 0.05 / 6 * (1 + 1e-5)  # ||sum of clipped|| / B <= n C / B, in fp32
    torch.testing.assert_close(update, bf16_update("hooks", kind=kind), rtol=2e-2, atol=1e-5)


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the same fit on a GPU, where one is at hand"))])
@pytest.mark.parametrize("clipping", ["fast", "hooks"])
def test_a_bf16_mixed_fit_takes_dp_steps(tmp_path, clipping, accelerator):
    model = dp_model(clipping=clipping)
    frozen = copy.deepcopy({n: p for n, p in model.state_dict().items()
                            if not dict(model.named_parameters()).get(n, torch.empty(0)).requires_grad})
    trainable = [p.detach().clone() for p in model.trainable_parameters()]
    trainer(tmp_path, 2, enable_checkpointing=False, precision="bf16-mixed", accelerator=accelerator,
            devices=1).fit(model, data())
    assert model.dp.accountant.steps == 2
    model.cpu()
    assert all(torch.equal(model.state_dict()[n], v) for n, v in frozen.items())
    assert any(not torch.equal(p, b) for p, b in zip(model.trainable_parameters(), trainable))
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())

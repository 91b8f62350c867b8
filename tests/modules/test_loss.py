import pytest
import torch
from diffusers import DDPMScheduler

from dpldm.modules.loss import MinSNRWeighting, UniformTimesteps, UnitWeighting, denoising_loss


class Echo(torch.nn.Module):
    """A 'denoiser' returning its input, so the loss can be computed by hand."""

    def forward(self, z, t, encoder_hidden_states):
        return type("Out", (), {"sample": z})()


def test_per_example_loss_is_mean_over_k_draws():
    sched = DDPMScheduler()
    z0 = torch.randn(3, 2, 4, 4)
    ctx = torch.randn(3, 1, 5)
    torch.manual_seed(0)
    loss = denoising_loss(Echo(), z0, ctx, sched, UniformTimesteps(), UnitWeighting(), noise_draws=4)
    assert loss.shape == (3,)
    # brute force with the same random stream: draws of one example are adjacent
    torch.manual_seed(0)
    t = torch.randint(0, 1000, (12,))
    noise = torch.randn(12, 2, 4, 4)
    zk = z0.repeat_interleave(4, 0)
    zt = sched.add_noise(zk, noise, t)
    ref = (zt - noise).pow(2).flatten(1).mean(1).view(3, 4).mean(1)
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("kind, target", [
    ("v_prediction", lambda sched, z0, noise, t: sched.get_velocity(z0, noise, t)),  # v = alpha_t eps - sigma_t z0
    ("sample", lambda sched, z0, noise, t: z0),
])
def test_v_and_sample_prediction_targets(kind, target):
    sched = DDPMScheduler(prediction_type=kind)
    z0 = torch.randn(2, 1, 2, 2)
    torch.manual_seed(1)
    loss = denoising_loss(Echo(), z0, torch.zeros(2, 1, 1), sched, UniformTimesteps(), UnitWeighting())
    torch.manual_seed(1)
    t = torch.randint(0, 1000, (2,))
    noise = torch.randn(2, 1, 2, 2)
    zt = sched.add_noise(z0, noise, t)
    torch.testing.assert_close(loss, (zt - target(sched, z0, noise, t)).pow(2).flatten(1).mean(1))


def test_min_snr_weighting_caps_low_noise_steps():
    sched = DDPMScheduler()
    w = MinSNRWeighting(gamma=5.0)(torch.tensor([0, 999]), sched)
    alpha_bar = sched.alphas_cumprod[[0, 999]]
    snr = alpha_bar / (1 - alpha_bar)
    assert w[0] < 1 and torch.isclose(w[0], 5.0 / snr[0])  # high SNR: capped
    assert torch.isclose(w[1], torch.tensor(1.0))  # low SNR: weight 1


def test_min_snr_weighting_of_z0_targets_is_the_capped_snr():
    sched = DDPMScheduler(prediction_type="sample")
    w = MinSNRWeighting(gamma=5.0)(torch.tensor([0, 999]), sched)
    alpha_bar = sched.alphas_cumprod[[0, 999]]
    torch.testing.assert_close(w, (alpha_bar / (1 - alpha_bar)).clamp(max=5.0))

"""DP-SGD over several processes: disjoint Poisson shards at the global q, clipped sums added over ranks,
noise once for the global batch; through Lightning's DDP, the same epsilon as on one process."""

import glob
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpldm.datamodules import DigitsDataModule
from dpldm.privacy import epsilon_for
from dpldm.privacy.sampling import ShardedPoissonSampler
from tests.privacy.common import batch, dp_update, make_engine, make_model
from tests.privacy.tiny_fit import dpldm, tiny_dp_config


def test_shards_are_disjoint_and_their_union_is_a_poisson_sample():
    n, q, world = 1001, 0.05, 3
    samplers = [ShardedPoissonSampler(n, q, r, world, torch.Generator().manual_seed(r)) for r in range(world)]
    shards = [set(s.shard.tolist()) for s in samplers]
    assert set().union(*shards) == set(range(n)) and sum(map(len, shards)) == n  # a partition of the N
    assert {len(s) for s in samplers} == {int(1 / q)}  # the same number of steps on every rank
    sizes = []
    for _ in range(20):
        for batches in zip(*samplers):
            merged = [i for b in batches for i in b]
            assert len(merged) == len(set(merged))
            sizes.append(len(merged))
    sizes = torch.tensor(sizes, dtype=torch.float)
    assert abs(sizes.mean() - q * n) < 4 * (q * n * (1 - q) / len(sizes)) ** 0.5
    assert sizes.var().item() == pytest.approx(q * n * (1 - q), rel=0.25)


def test_every_rank_yields_its_empty_batches():
    sampler = ShardedPoissonSampler(10, 1e-9, 1, 2)
    sampler.steps = 5
    assert list(sampler) == [[]] * 5  # skipping them would desynchronise the ranks' all-reduce


def test_secure_sampling_draws_from_the_os_at_rate_q():
    sampler = ShardedPoissonSampler(20_000, 0.1, secure=True, generator=None)
    sizes = [len(next(iter(sampler))) for _ in range(5)]
    assert all(abs(s - 2000) < 4 * (2000 * 0.9) ** 0.5 for s in sizes) and len(set(sizes)) > 1


def _rank(rank, world, init_file, out, clipping, sigma, clip, empty):
    """One process: this rank's shard of the global batch of 8, one engine step (SGD, lr 1)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model(1)
        engine = make_engine(model, 8, sigma=sigma, clip=clip, clipping=clipping, physical=3)
        local = {} if empty else {k: v[rank::world] for k, v in batch(8).items()}
        torch.save(dp_update(model, engine, local, 1), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp_path, clipping, sigma, clip, empty, world=2):
    mp.spawn(_rank, args=(world, str(tmp_path / "init"), str(tmp_path), clipping, sigma, clip, empty), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("clipping", ["fast", "hooks"])
def test_ranks_sum_their_clipped_gradients(tmp_path, clipping):
    """Without noise, two ranks with half the batch each make the update of the whole batch."""
    ranks = _run_ranks(tmp_path, clipping, sigma=0.0, clip=2.0, empty=False)
    torch.testing.assert_close(ranks[0], ranks[1], rtol=0, atol=0)  # identical models on every rank
    # On one process: each half alone (same draws of t and noise as on its rank), then the sum (SGD is linear).
    halves = []
    for r in range(2):
        model = make_model(1)
        engine = make_engine(model, 8, sigma=0.0, clip=2.0, clipping=clipping, physical=3)
        halves.append(dp_update(model, engine, {k: v[r::2] for k, v in batch(8).items()}, 1))
    assert halves[0].abs().max() > 1e-3 and (halves[0] - halves[1]).abs().max() > 1e-3
    # (differences of float32 parameters before and after: rounding ~1e-7)
    torch.testing.assert_close(ranks[0], halves[0] + halves[1], rtol=1e-4, atol=1e-6)


def test_noise_is_added_once_for_the_global_batch(tmp_path):
    """The update's noise std on two ranks is sigma C / B, as on one process (not sqrt(2) times it)."""
    sigma, clip, b = 2.0, 0.05, 8
    ranks = _run_ranks(tmp_path, "fast", sigma=sigma, clip=clip, empty=True)
    torch.testing.assert_close(ranks[0], ranks[1], rtol=0, atol=0)
    model = make_model(1)
    single = dp_update(model, make_engine(model, b, sigma=sigma, clip=clip, clipping="fast"), {}, 1)
    assert ranks[0].numel() > 10_000
    assert ranks[0].std().item() == pytest.approx(sigma * clip / b, rel=0.03)
    assert ranks[0].std().item() == pytest.approx(single.std().item(), rel=0.05)


def test_lightning_ddp_fit_on_two_processes(tmp_path):
    """``dpldm fit`` with the DDP strategy on 2 CPU processes (gloo): the epsilon of one process for the same
    (q, sigma, T, delta), reported once; SGD's update after T steps has the noise of T global batches."""
    sigma, clip, steps = 2.0, 1e-4, 3
    cfg = tiny_dp_config(tmp_path / "run", max_steps=steps,
                         privacy={"epsilon": 50.0, "noise_multiplier": sigma, "max_grad_norm": clip},
                         optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}},
                         callbacks=[{"class_path": "dpldm.callbacks.SampleGrid",  # writes on rank 0 only
                                     "init_args": {"per_class": 1, "num_steps": 2}}])
    done = dpldm("fit", "--config", cfg, "--trainer.strategy=ddp", "--trainer.devices=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    reports = glob.glob(str(tmp_path / "run" / "**" / "privacy.json"), recursive=True)
    assert len(reports) == 1  # written once, by rank 0
    assert len(glob.glob(str(tmp_path / "run" / "**" / "samples" / "final.png"), recursive=True)) == 1
    report = json.load(open(reports[0]))
    q = report["privacy/sample_rate"]
    assert report["world_size"] == 2 and report["privacy/steps"] == steps
    assert report["privacy/epsilon"] == pytest.approx(epsilon_for(sigma, q, steps, report["privacy/delta"]), rel=1e-9)
    assert q == pytest.approx(16 / DigitsDataModule(image_size=8).num_train_samples, rel=1e-12)  # the global q
    assert done.stderr.count("DP-SGD: epsilon") + done.stdout.count("DP-SGD: epsilon") == 1

    from dpldm.commands.lightning_cli import DPLDMCLI

    initial = DPLDMCLI(args=["--config", cfg, "--trainer.logger=false"], run=False).model  # same seed: same init
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    names = [n for n, p in initial.named_parameters() if p.requires_grad]
    update = torch.cat([(state["state_dict"][n] - initial.state_dict()[n]).flatten() for n in names])
    frozen = [n for n, p in initial.named_parameters() if not p.requires_grad]
    assert all(torch.equal(state["state_dict"][n], initial.state_dict()[n]) for n in frozen)
    assert update.std().item() == pytest.approx(steps ** 0.5 * sigma * clip / 16, rel=0.05)


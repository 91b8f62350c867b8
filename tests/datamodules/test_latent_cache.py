"""The latent cache: exact values, invalidation, resuming, and Poisson sampling over its N records."""

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

from dpldm.datamodules import DigitsDataModule, LatentCacheDataModule, LatentCacheDataset
from dpldm.datamodules import cache_writer
from dpldm.datamodules.cache_writer import CacheMismatchError
from dpldm.privacy.sampling import poisson_loader, poisson_rate
from tests.conftest import TINY_AE


class Killed(Exception):
    """Stands in for a job killed mid-build."""


def cached(tmp_path, **kw):
    return LatentCacheDataModule(DigitsDataModule(image_size=8), str(tmp_path / "cache"), **kw)


def test_decoding_a_cached_latent_matches_decoding_a_fresh_encode(tiny_model, tmp_path):
    dm = cached(tmp_path, flip_views=True)
    meta = dm.build(tiny_model)
    images = dm.source.cache_dataset()
    ds = LatentCacheDataset(dm.cache_dir)
    assert len(ds) == meta["num_records"] == len(images) == 1437  # one record per image, flips are views
    ae = tiny_model.autoencoder
    for i in (0, 700, 1436):
        x = images[i]["image"][None]
        stored = torch.from_numpy(np.load(f"{dm.cache_dir}/moments.npy")[i])  # [V, 2c, h, w]
        assert torch.allclose(ae.decode(ae.from_moments(stored[:1])), ae.decode(ae.encode(x)), atol=1e-5)  # batched vs alone
        assert torch.allclose(stored[1], ae.moments(x.flip(-1))[0], atol=1e-5)  # view 1 = the flipped image
        assert ds[i]["label"] == images[i]["label"]
    views = {tuple(ds[0]["moments"].flatten()[:4].tolist()) for _ in range(40)}
    assert len(views) == 2  # each access returns one of the two views


def test_float16_storage_is_close_and_half_the_size(tiny_model, tmp_path):
    dm = cached(tmp_path, dtype="float16")
    dm.build(tiny_model)
    arr = np.load(f"{dm.cache_dir}/moments.npy", mmap_mode="r")
    assert arr.dtype == np.float16
    x = dm.source.cache_dataset()[3]["image"][None]
    fresh = tiny_model.autoencoder.moments(x)[0]
    assert torch.allclose(torch.from_numpy(np.array(arr[3, 0], np.float32)), fresh, atol=2e-3, rtol=1e-3)


def test_a_changed_encoder_or_preprocessing_invalidates_the_cache(tiny_model, tmp_path):
    dm = cached(tmp_path)
    dm.build(tiny_model)
    first = np.load(f"{dm.cache_dir}/moments.npy")
    with torch.no_grad():
        tiny_model.autoencoder.vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(CacheMismatchError, match="autoencoder.*on_mismatch"):
        dm.build(tiny_model)
    dm.on_mismatch = "rebuild"
    dm.build(tiny_model)
    assert not np.array_equal(first, np.load(f"{dm.cache_dir}/moments.npy"))
    other = LatentCacheDataModule(DigitsDataModule(image_size=8, seed=1), dm.cache_dir)  # another split
    with pytest.raises(CacheMismatchError, match="preprocessing"):
        other.build(tiny_model)
    flipped = LatentCacheDataModule(DigitsDataModule(image_size=8), dm.cache_dir, flip_views=True)
    with pytest.raises(CacheMismatchError, match="views"):
        flipped.build(tiny_model)


def test_an_interrupted_build_resumes_where_it_stopped(tiny_model, tmp_path, monkeypatch):
    reference = cached(tmp_path / "ref", encode_batch_size=100, chunk_size=200)
    reference.build(tiny_model)
    encode, calls, resumed = cache_writer._encode, [], False

    def flaky(batch, *args):
        calls.append(len(batch["image"]))
        if len(calls) == 7 and not resumed:
            raise Killed  # killed after 6 batches = 3 finished parts
        return encode(batch, *args)

    monkeypatch.setattr(cache_writer, "_encode", flaky)
    dm = cached(tmp_path, encode_batch_size=100, chunk_size=200)
    with pytest.raises(Killed):
        dm.build(tiny_model)
    assert cache_writer.read_meta(dm.cache_dir) is None  # no meta.json: not usable half-built
    calls.clear()
    resumed = True
    dm.build(tiny_model)
    assert sum(calls) == 1437 - 600  # only the records after the last finished part are encoded again
    for f in ("moments", "labels"):
        assert np.array_equal(np.load(f"{dm.cache_dir}/{f}.npy"), np.load(f"{reference.cache_dir}/{f}.npy"))


class Stream(IterableDataset):
    """A deterministic stream of 50 images, like a webdataset pass without shuffling."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for i in range(50):
            yield {"image": torch.rand(1, 8, 8, generator=g) * 2 - 1, "label": i % 10}


def test_a_stream_resumes_by_replaying_the_finished_batches(tiny_model, tmp_path, monkeypatch):
    source = DigitsDataModule(image_size=8)
    monkeypatch.setattr(source, "cache_dataset", lambda: Stream())
    ref = LatentCacheDataModule(source, str(tmp_path / "ref"), encode_batch_size=8, chunk_size=16)
    ref.build(tiny_model)
    encode, calls, resumed = cache_writer._encode, [], False

    def flaky(batch, *args):
        calls.append(1)
        if len(calls) == 4 and not resumed:
            raise Killed
        return encode(batch, *args)

    monkeypatch.setattr(cache_writer, "_encode", flaky)
    dm = LatentCacheDataModule(source, str(tmp_path / "cache"), encode_batch_size=8, chunk_size=16)
    with pytest.raises(Killed):
        dm.build(tiny_model)
    calls.clear()
    resumed = True
    assert dm.build(tiny_model)["num_records"] == 50
    assert len(calls) == 5  # 7 batches of which 2 (one part) were finished
    assert np.array_equal(np.load(f"{dm.cache_dir}/moments.npy"), np.load(f"{ref.cache_dir}/moments.npy"))

    # interrupted again, then resumed with other batching: replaying batches would misalign, so it starts over
    resumed, calls[:] = False, []
    other = LatentCacheDataModule(source, str(tmp_path / "again"), encode_batch_size=8, chunk_size=16)
    with pytest.raises(Killed):
        other.build(tiny_model)
    resumed, calls[:] = True, []
    other.encode_batch_size = 10
    assert other.build(tiny_model)["num_records"] == 50 and len(calls) == 5  # all 50 records, in batches of 10
    assert np.array_equal(np.load(f"{other.cache_dir}/moments.npy"), np.load(f"{ref.cache_dir}/moments.npy"))


def test_poisson_batches_are_drawn_over_the_caches_records(tiny_model, tmp_path):
    dm = cached(tmp_path, batch_size=64)
    dm.build(tiny_model)
    dm.setup("fit")
    dm.train_loader_factory = lambda dataset, workers: poisson_loader(dataset, dm.batch_size, 3, workers)  # DP's
    loader = dm.train_dataloader()
    n = dm.num_train_samples
    assert n == 1437 and loader.batch_sampler.num_samples == n
    assert poisson_rate(loader) == pytest.approx(64 / n)
    sizes = [len(b["moments"]) for b in loader]
    assert len(sizes) == round(n / 64)  # an epoch is 1/q steps
    assert abs(np.mean(sizes) - 64) < 4 * np.sqrt(64 / len(sizes))  # mean qN = 64
    assert set(next(iter(loader))) == {"moments", "label"}


def test_a_missing_cache_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="dpldm cache --config"):
        cached(tmp_path).num_train_samples


def test_dp_fit_from_the_cache_never_runs_the_encoder(tiny_model, tmp_path, monkeypatch):
    import lightning.pytorch as L

    from dpldm.modules import ClassEmbedder, FrozenAutoencoder, LatentDiffusion, build_autoencoder, build_unet
    from dpldm.privacy import DifferentialPrivacy
    from tests.conftest import TINY_UNET

    torch.manual_seed(0)
    model = LatentDiffusion(build_unet(**TINY_UNET), FrozenAutoencoder(build_autoencoder(**TINY_AE)),
                            ClassEmbedder(10, embed_dim=16), noise_draws=2,
                            privacy=DifferentialPrivacy(epsilon=8.0, max_physical_batch_size=8))
    dm = cached(tmp_path, batch_size=16)
    trainer = L.Trainer(max_steps=2, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    original, encoded = FrozenAutoencoder.moments, []

    def counting(self, images):
        encoded.append(len(images))
        return original(self, images)

    monkeypatch.setattr(FrozenAutoencoder, "moments", counting)
    trainer.fit(model, dm)  # prepare_data builds the cache with the model's own encoder
    assert sum(encoded) == 1437  # every private image encoded exactly once, during the build
    assert model.dp.plan.num_samples == 1437 and model.dp.accountant.steps == 2


@pytest.mark.parametrize("privacy, trainer_kw, field", [
    ({"delta": 1e-3}, {}, "privacy.init_args.delta"),  # delta >= 1/N (N = 1437)
    ({"noise_multiplier": 0.05}, {}, "privacy.init_args.noise_multiplier"),  # not even one step fits
    ({}, {"use_distributed_sampler": True}, "trainer.use_distributed_sampler"),
    (None, {}, "model.init_args.privacy"),  # private digits without DP, undeclared
])
def test_cheap_checks_fail_before_anything_is_encoded(tmp_path, monkeypatch, privacy, trainer_kw, field):
    """Every check that needs no encoding (privacy settings, delta vs N, the sampler, DP on private data) runs
    before the latent cache is built: at LAION scale the build takes hours."""
    import lightning.pytorch as L

    from dpldm.errors import ConfigError
    from dpldm.modules import ClassEmbedder, FrozenAutoencoder, LatentDiffusion, build_autoencoder, build_unet
    from dpldm.privacy import DifferentialPrivacy
    from tests.conftest import TINY_UNET

    dp = None if privacy is None else DifferentialPrivacy(**{"epsilon": 8.0, **privacy})
    model = LatentDiffusion(build_unet(**TINY_UNET), FrozenAutoencoder(build_autoencoder(**TINY_AE)),
                            ClassEmbedder(10, embed_dim=16), privacy=dp)
    encoded = []
    monkeypatch.setattr(FrozenAutoencoder, "moments", lambda self, images: encoded.append(len(images)))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                        **{"use_distributed_sampler": False, **trainer_kw})
    with pytest.raises(ConfigError, match=field):
        trainer.fit(model, cached(tmp_path, batch_size=16))
    assert encoded == [] and not (tmp_path / "cache").exists()


def test_a_shape_mismatch_fails_before_anything_is_encoded(tmp_path, monkeypatch):
    import lightning.pytorch as L

    from dpldm.errors import ConfigError
    from dpldm.modules import ClassEmbedder, FrozenAutoencoder, LatentDiffusion, build_autoencoder, build_unet
    from dpldm.privacy import DifferentialPrivacy
    from tests.conftest import TINY_UNET

    model = LatentDiffusion(build_unet(**{**TINY_UNET, "sample_size": 8}), FrozenAutoencoder(build_autoencoder(**TINY_AE)),
                            ClassEmbedder(10, embed_dim=16), privacy=DifferentialPrivacy(epsilon=8.0))
    encoded = []
    monkeypatch.setattr(FrozenAutoencoder, "moments", lambda self, images: encoded.append(len(images)))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        use_distributed_sampler=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="sample_size"):
        trainer.fit(model, cached(tmp_path, batch_size=16))
    assert encoded == [] and not (tmp_path / "cache").exists()

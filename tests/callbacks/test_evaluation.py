"""Metric callbacks: shared samples, the values they log, and where they log them."""

import csv
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from dpldm.callbacks import FID, CLIPScore, DownstreamAccuracy, SampleSettings
from dpldm.callbacks.evaluation import conditions
from dpldm.datamodules import ImageDataModule, TensorImageDataset
from dpldm.errors import ConfigError

ARCH = str(Path(__file__).resolve().parents[2] / "configs" / "laion" / "tiny-clip.json")


def quadrant_images(labels: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """Class k: a bright 8x8 quadrant k on a dark 16x16 image, plus noise (trivially separable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((len(labels), 1, 16, 16), -1.0)
    for i, k in enumerate(labels.tolist()):
        r, c = divmod(k, 2)
        x[i, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 1.0
    return (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)


class Quadrants(ImageDataModule):
    num_classes, channels, image_size = 4, 1, 16

    def _build(self, split):
        labels = torch.arange(200) % 4
        return TensorImageDataset(quadrant_images(labels, 0.3, {"train": 0, "val": 1, "test": 2}[split]), labels)


class NoisyVal(Quadrants):
    """Quadrants whose val split is noisier and mislabelled (quadrant k + 1 labelled k): a metric scored on
    it differs from one scored on the test split."""

    def _build(self, split):
        if split != "val":
            return super()._build(split)
        labels = torch.arange(200) % 4
        return TensorImageDataset(quadrant_images((labels + 1) % 4, 1.2, 1), labels)


class SameValAndTest(Quadrants):
    def _build(self, split):
        return super()._build("test")


class Conditioner(nn.Module):
    def __init__(self, text=False):
        super().__init__()
        self.input_key, self.num_classes = ("caption" if text else "label"), 4


class FakeGenerator(L.LightningModule):
    """Samples the quadrant of its label (``noise`` controls how good it is); counts its sampling calls."""

    def __init__(self, noise=0.3, text=False):
        super().__init__()
        self.conditioner, self.noise, self.calls = Conditioner(text), noise, 0
        self.layer = nn.Linear(1, 1)

    def sample(self, cond, guidance_scale=None, num_steps=None, generator=None, eta=0.0, solver=None):
        self.calls += 1
        labels = torch.tensor([len(c) % 4 for c in cond]) if isinstance(cond, list) else cond
        return quadrant_images(labels.cpu(), self.noise, int(torch.randint(1000, (), generator=generator)))


class Trainable(FakeGenerator):
    def training_step(self, batch, batch_idx):
        return self.layer(batch["image"].mean((1, 2, 3))[:, None]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyFeatures(nn.Module):
    def forward(self, x):  # [B, 1, 16, 16] -> [B, 4]: mean brightness per quadrant
        return x.unfold(2, 8, 8).unfold(3, 8, 8).mean((-1, -2)).flatten(1)


def test_conditions_balance_classes_and_cycle_prompts():
    assert conditions(FakeGenerator(), 10).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert conditions(FakeGenerator(text=True), 3, ["a", "b"]) == ["a", "b", "a"]
    with pytest.raises(ConfigError, match="prompts"):
        conditions(FakeGenerator(text=True), 3)


def test_downstream_accuracy_and_fid_share_the_samples_of_a_step():
    model, data = FakeGenerator(), Quadrants(batch_size=64)
    settings = SampleSettings(batch_size=100)
    acc = DownstreamAccuracy(num_samples=200, epochs=5, sampling=settings).evaluate(model, data, step=7)
    fid = FID(TinyFeatures(), num_samples=200, sampling=settings).evaluate(model, data, step=7)
    assert model.calls == 2  # 200 samples in batches of 100, drawn once for both metrics
    assert acc["test/downstream_acc"] > 0.9  # separable samples -> the real test split is classified well
    bad = FID(TinyFeatures(), num_samples=200, sampling=settings).evaluate(FakeGenerator(noise=1.5), data, step=7)
    assert fid["test/fid"] < 0.05 < bad["test/fid"]  # samples like the test split: ~0; noisy samples: far


def test_downstream_accuracy_is_at_chance_for_a_generator_that_ignores_labels():
    class Ignores(FakeGenerator):
        def sample(self, cond, *args, **kwargs):
            return super().sample(torch.zeros_like(cond), *args, **kwargs)

    acc = DownstreamAccuracy(num_samples=200, epochs=5).evaluate(Ignores(), Quadrants(), step=0)
    assert acc["test/downstream_acc"] < 0.5


def test_per_class_downstream_accuracy_finds_the_class_a_generator_draws_wrong():
    class MixesUpThree(FakeGenerator):  # draws class 3 as class 0
        def sample(self, cond, *args, **kwargs):
            return super().sample(torch.where(cond == 3, 0, cond), *args, **kwargs)

    metric = DownstreamAccuracy(num_samples=200, epochs=5, per_class=True)
    acc = metric.evaluate(MixesUpThree(), Quadrants(), step=0)
    per_class = [acc[f"test/downstream_acc/class_{k}"] for k in range(4)]
    assert per_class[3] < 0.2 and min(per_class[1:3]) > 0.9  # class 3 lost; 1, 2 intact (0 shares its look with 3)
    assert acc["test/downstream_acc"] == pytest.approx(sum(per_class) / 4, abs=0.02)  # balanced test classes
    assert "test/downstream_acc/class_0" not in DownstreamAccuracy(num_samples=200, epochs=5).evaluate(
        MixesUpThree(), Quadrants(), step=0)  # off by default: one number per split


def test_downstream_accuracy_scores_at_its_image_size_with_the_sampling_solver(monkeypatch):
    """DPImageBench scores the MNIST family at 28x28: samples and real test images are resized alike before the
    classifier sees them, and the settings' solver reaches the model."""
    from dpldm.metrics import downstream

    seen, solvers = [], []
    train = downstream.train_classifier
    monkeypatch.setattr(downstream, "train_classifier", lambda x, *a, **k: seen.append(x.shape) or train(x, *a, **k))

    class Records(FakeGenerator):
        def sample(self, cond, *args, solver=None, **kwargs):
            solvers.append(solver)
            return super().sample(cond, *args, **kwargs)

    metric = DownstreamAccuracy(num_samples=200, epochs=5, image_size=8,
                                sampling=SampleSettings(solver="dpm_solver++", num_steps=6))
    acc = metric.evaluate(Records(), Quadrants(), step=0)
    assert seen == [(200, 1, 8, 8)] and set(solvers) == {"dpm_solver++"}
    assert acc["test/downstream_acc"] > 0.9  # quadrants survive the resize, real test images resized too
    with pytest.raises(ConfigError, match="image_size"):
        DownstreamAccuracy(image_size=4)


def test_clip_score_callback_reports_a_score_for_its_prompts():
    cb = CLIPScore(prompts=["a cat", "a red car"], model_name=ARCH, pretrained=None, num_samples=4)
    images = torch.rand(4, 1, 16, 16) * 2 - 1  # grey samples are accepted (repeated to RGB)
    value = cb.compute(FakeGenerator(text=True), None, images, ["a cat", "a red car"] * 2)["prompts/clip_score"]
    assert 0 <= value <= 100
    with pytest.raises(ConfigError, match="prompts"):
        CLIPScore(prompts=[])


def test_metrics_are_logged_next_to_training_metrics(tmp_path):
    model, data = Trainable(), Quadrants(batch_size=50)
    callbacks = [DownstreamAccuracy(num_samples=100, epochs=2, every_n_epochs=1), FID(TinyFeatures(), num_samples=100)]
    trainer = L.Trainer(max_epochs=2, logger=CSVLogger(tmp_path, name="logs"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, data)
    rows = list(csv.DictReader(open(next(tmp_path.glob("logs/version_*/metrics.csv")))))
    acc_steps = [int(r["step"]) for r in rows if r.get("test/downstream_acc")]
    assert len(acc_steps) == 3  # after each of the 2 epochs, and at the end of fit
    assert [r for r in rows if r.get("test/fid")]  # the FID at the end only
    assert callbacks[1].last["test/fid"] < 0.05


def test_metrics_are_printed_where_no_logger_keeps_them(caplog):
    """`dpldm fit --trainer.logger=false` still shows the final metrics (they were lost without a logger)."""
    model, data, metric = Trainable(), Quadrants(batch_size=50), DownstreamAccuracy(num_samples=100, epochs=2)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[metric])
    trainer.fit(model, data)
    value = metric.last["test/downstream_acc"]
    assert f"DownstreamAccuracy at step {trainer.global_step}: test/downstream_acc = {value:.4g}" in caplog.text


def test_fast_dev_run_skips_the_metrics(tmp_path):
    model, cb = Trainable(), DownstreamAccuracy(num_samples=10)
    L.Trainer(fast_dev_run=True, callbacks=[cb], enable_progress_bar=False, default_root_dir=tmp_path).fit(model, Quadrants())
    assert cb.last is None and model.calls == 0


def test_fid_reads_the_real_images_once(monkeypatch):
    from dpldm.callbacks import evaluation

    calls, real = [], evaluation.real_images
    monkeypatch.setattr(evaluation, "real_images", lambda *a: calls.append(1) or real(*a))
    fid = FID(TinyFeatures(), num_samples=100)
    for step in (1, 2):  # two evaluations: the reference statistics are computed once
        fid.evaluate(FakeGenerator(), Quadrants(), step=step)
    assert len(calls) == 1


def test_keys_name_the_split_they_are_computed_on():
    assert DownstreamAccuracy(num_samples=8).keys() == ["test/downstream_acc"]  # the default: the final test split
    assert FID(TinyFeatures(), num_samples=8, name="fid_glyph", splits=["val", "test"]).keys() == [
        "val/fid_glyph", "test/fid_glyph"]
    assert FID(reference_dir="refs", num_samples=8).keys() == ["ref/fid"]  # a fixed reference set, not a data split
    assert CLIPScore(prompts=["a cat"], num_samples=8).keys() == ["prompts/clip_score"]  # no real images at all
    for bad in (["train"], [], ["val", "val"], ["validation"]):  # never the private training set
        with pytest.raises(ConfigError, match="DownstreamAccuracy.splits"):
            DownstreamAccuracy(num_samples=8, splits=bad)
    with pytest.raises(ConfigError, match="FID.splits"):
        FID(reference_dir="refs", num_samples=8, splits=["val"])


def test_downstream_classifier_is_trained_once_and_tested_on_val_and_test(monkeypatch):
    from dpldm.metrics import downstream

    trained, train = [], downstream.train_classifier
    monkeypatch.setattr(downstream, "train_classifier", lambda *a, **k: trained.append(1) or train(*a, **k))
    model, data = FakeGenerator(), NoisyVal(batch_size=64)
    cb = DownstreamAccuracy(num_samples=200, epochs=5, splits=["val", "test"], sampling=SampleSettings(batch_size=100))
    acc = cb.evaluate(model, data, step=3)
    assert list(acc) == ["val/downstream_acc", "test/downstream_acc"] and len(trained) == 1 and model.calls == 2
    images, labels = cb.samples(model, 3)
    data.setup("test")
    test_x, test_y = downstream.load_images(data.test_dataloader())
    assert acc["test/downstream_acc"] == downstream.downstream_accuracy(images, labels, test_x, test_y, 4, epochs=5)
    assert acc["val/downstream_acc"] < 0.3 < 0.9 < acc["test/downstream_acc"]  # val/: scored on the val split


def test_fid_scores_one_set_of_samples_against_val_and_test(monkeypatch):
    from dpldm.callbacks import evaluation

    calls, real = [], evaluation.real_images
    monkeypatch.setattr(evaluation, "real_images", lambda *a: calls.append(a[2]) or real(*a))
    fid = FID(TinyFeatures(), num_samples=200, splits=["val", "test"], sampling=SampleSettings(batch_size=100))
    model, data = FakeGenerator(), NoisyVal()
    for step in (1, 2):
        values = fid.evaluate(model, data, step=step)
    assert sorted(calls) == ["test", "val"]  # the reference statistics: once per split, over both evaluations
    assert values["test/fid"] < 0.05 < values["val/fid"]  # samples like the test split, unlike the noisy val split
    assert model.calls == 4  # one set of 200 samples per evaluation, shared by both splits


def test_val_and_test_must_be_different_images():
    with pytest.raises(ConfigError, match="same images"):  # choosing on val would then choose on test
        DownstreamAccuracy(num_samples=40, epochs=1, splits=["val", "test"]).evaluate(FakeGenerator(), SameValAndTest())


def test_a_missing_split_is_a_config_error():
    class NoVal(Quadrants):
        def val_dataloader(self):
            return []

    with pytest.raises(ConfigError, match="no val images"):
        FID(TinyFeatures(), num_samples=8, splits=["val"]).evaluate(FakeGenerator(), NoVal())

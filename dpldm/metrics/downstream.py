"""Downstream accuracy, "train on synthetic, test on real" (DPDM, Dockhorn et al., 2022; DP-LDM,
Lyu et al., 2023): a small CNN is trained on N labelled synthetic samples and its accuracy on
the real test split is the utility of the generator.

The same CNN, trained on a *public* labelled set and frozen, doubles as an offline feature
extractor (:class:`ClassifierFeatures`) for an FID-style distance when Inception weights are
unavailable. Everything is deterministic for a given seed on CPU.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dpldm.errors import ConfigError


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Conv 3x3 -> GroupNorm -> ReLU -> max-pool 2 (halves H and W); no BatchNorm, so DP-safe."""
    groups = 8 if c_out % 8 == 0 else 1
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU(),
                         nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    """Three conv blocks (width, 2 width, 4 width channels), global average pooling, dropout, linear.

    Any input side >= 8 px works (28, 32, 64, ...): the pooling after the last block is global.

    Args:
        in_channels: image channels C (1 or 3).
        num_classes: number of classes K.
        width: channels of the first block; the feature dimension is D = 4 * width.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width
        self.feature_dim = 4 * width
        self.body = nn.Sequential(_block(in_channels, width), _block(width, 2 * width),
                                  _block(2 * width, 4 * width))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, D]
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> logits [B, K]
        return self.head(self.dropout(self.features(x)))


def _translate(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Random translation by up to ``shift`` px per axis: replicate-pad, then one random crop per image."""
    B, C, H, W = x.shape
    padded = F.pad(x, (shift,) * 4, mode="replicate")  # [B, C, H + 2s, W + 2s]
    dy, dx = torch.randint(0, 2 * shift + 1, (2, B, 1), generator=generator).to(x.device)
    rows = dy + torch.arange(H, device=x.device)  # [B, H]
    cols = dx + torch.arange(W, device=x.device)  # [B, W]
    b = torch.arange(B, device=x.device)[:, None, None]
    return padded[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # [B, C, H, W]


def resize(images: Tensor, size: int) -> Tensor:
    """Images [N, C, H, W] in [-1, 1] resized to [N, C, size, size] (bilinear, antialiased; a no-op at that size)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(-1.0, 1.0)


def _check_labelled(images: Tensor, labels: Tensor, num_classes: int) -> None:
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        shapes = f"{tuple(images.shape)}, {tuple(labels.shape)}"
        raise ValueError(f"need images [N, C, H, W] and labels [N]; got {shapes}")
    present = labels.unique()
    if len(present) < 2:
        raise ValueError(f"the training labels hold {len(present)} class(es); a classifier needs at least 2")
    if present.min() < 0 or present.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {present.tolist()}")


@torch.enable_grad()  # callers may score under no_grad (e.g. a lazily trained FID extractor)
def train_classifier(
    images: Tensor, labels: Tensor, num_classes: int, epochs: int = 10, batch_size: int = 128,
    lr: float = 1e-3, width: int = 32, seed: int = 0, augment: bool = True, device: str = "cpu",
    progress: bool = False,
) -> SmallCNN:
    """Trains a :class:`SmallCNN` with Adam on cross-entropy; init, shuffling, dropout and augmentation
    all follow ``seed`` (the global RNG state is restored afterwards).

    Args:
        images: training images [N, C, H, W] in [-1, 1].
        labels: int64 class indices [N].
        num_classes: K.
        epochs: passes over the data.
        batch_size: examples per step.
        lr: Adam learning rate.
        width: channel width of the CNN.
        seed: seed of everything random in training.
        augment: random translations of up to 2 px per axis.
        device: where to train.
        progress: show a tqdm bar over epochs.

    Returns:
        The trained classifier, in eval mode.
    """
    _check_labelled(images, labels, num_classes)
    dev = torch.device(device)
    generator = torch.Generator().manual_seed(seed)  # shuffling and augmentation (CPU)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)  # init and dropout
        model = SmallCNN(images.shape[1], num_classes, width).to(dev)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        rounds: Iterable[int] = range(epochs)
        if progress:
            from tqdm.auto import tqdm

            rounds = tqdm(rounds, desc="classifier", unit="epoch", leave=False)
        for _ in rounds:
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), batch_size):
                idx = order[start:start + batch_size]
                x = images[idx].float()  # [b, C, H, W]
                if augment:
                    x = _translate(x, 2, generator)
                loss = F.cross_entropy(model(x.to(dev)), labels[idx].long().to(dev))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Top-1 classes [N] of ``model`` (run in eval mode) on images [N, C, H, W]."""
    model.eval()
    dev = next(model.parameters()).device
    preds = [torch.zeros(0, dtype=torch.long)]
    for start in range(0, len(images), batch_size):
        preds.append(model(images[start:start + batch_size].float().to(dev)).argmax(1).cpu())  # [b]
    return torch.cat(preds)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (run in eval mode) on (images [N, C, H, W], labels [N])."""
    return fraction_correct(predict(model, images, batch_size), labels)


def fraction_correct(predictions: Tensor, labels: Tensor) -> float:
    """The fraction of ``predictions`` [N] (:func:`predict`) equal to ``labels`` [N] (0 for N = 0)."""
    return int((predictions.cpu() == labels.cpu()).sum()) / max(len(labels), 1)


def per_class_accuracy(predictions: Tensor, labels: Tensor, num_classes: int) -> list[float]:
    """Top-1 accuracy on the images of each class k < ``num_classes`` (its recall; NaN for a class absent from
    ``labels``), from a classifier's ``predictions`` [N] (:func:`predict`) and the true ``labels`` [N]: where a
    synthetic-trained classifier fails, i.e. which classes the generator draws badly."""
    predictions, labels = predictions.cpu(), labels.cpu()
    hits = torch.bincount(labels[predictions == labels], minlength=num_classes).double()  # [K]
    counts = torch.bincount(labels, minlength=num_classes).double()  # [K]
    return (hits / counts).tolist()  # 0/0 = NaN: no images of that class


def downstream_accuracy(
    train_images: Tensor, train_labels: Tensor, test_images: Tensor, test_labels: Tensor,
    num_classes: int, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, width: int = 32, seed: int = 0,
    device: str = "cpu",
) -> float:
    """Accuracy on the real test set of a :class:`SmallCNN` trained on the (synthetic) train set.

    Args:
        train_images: synthetic images [N, C, H, W] in [-1, 1].
        train_labels: their labels [N].
        test_images: real test images [M, C, H, W] in [-1, 1].
        test_labels: their labels [M].
        num_classes: K.
        epochs, batch_size, lr, width, seed, device: training settings, as in :func:`train_classifier`.

    Returns:
        Test accuracy in [0, 1].
    """
    if train_images.ndim != 4 or test_images.ndim != 4 or train_images.shape[1:] != test_images.shape[1:]:
        raise ConfigError("downstream", (tuple(train_images.shape[1:]), tuple(test_images.shape[1:])),
                          "train and test images must share [C, H, W]")
    model = train_classifier(train_images, train_labels, num_classes, epochs=epochs, batch_size=batch_size,
                             lr=lr, width=width, seed=seed, device=device)
    return accuracy(model, test_images, test_labels)


class ClassifierFeatures(nn.Module):
    """A frozen :class:`SmallCNN` (trained on a public labelled set) as an FID feature extractor.

    Distances computed with these features are NOT comparable to Inception FID (or to FIDs
    computed with any other classifier): report them only against each other, under the same
    saved extractor.

    Args:
        classifier: the trained network; its penultimate features [B, D] are returned.
    """

    def __init__(self, classifier: SmallCNN):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)  # always eval: no dropout

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:  # [B, C, H, W] -> [B, D]
        dev = next(self.classifier.parameters()).device
        return self.classifier.features(images.float().to(dev)).float()

    @classmethod
    def fit(
        cls, images: Tensor, labels: Tensor, num_classes: int, epochs: int = 10, batch_size: int = 128,
        lr: float = 1e-3, width: int = 32, seed: int = 0, device: str = "cpu",
    ) -> ClassifierFeatures:
        """Trains a classifier with :func:`train_classifier` (same meanings) and wraps it."""
        return cls(train_classifier(images, labels, num_classes, epochs=epochs, batch_size=batch_size, lr=lr,
                                    width=width, seed=seed, device=device))

    def save(self, path: str, data: str | None = None) -> None:
        """Writes the constructor arguments and weights to one ``torch.save`` file.

        Args:
            path: the file.
            data: a fingerprint of the training data, checked by :meth:`load` (None: not recorded).
        """
        c = self.classifier
        args = {"in_channels": c.in_channels, "num_classes": c.num_classes, "width": c.width}
        torch.save({"args": args, "state_dict": c.state_dict(), "data": data}, path)

    @classmethod
    def load(cls, path: str, device: str = "cpu", expect_data: str | None = None) -> ClassifierFeatures:
        """Rebuilds an extractor written by :meth:`save`.

        Args:
            path: the file.
            device: where to put it.
            expect_data: if given, the training-data fingerprint the file must record (a file trained on
                other data is an error, not a silently different metric).
        """
        blob = torch.load(path, map_location=device, weights_only=True)
        if expect_data is not None and blob.get("data") != expect_data:
            raise ValueError(f"{path} holds a classifier trained on other data (fingerprint "
                             f"{str(blob.get('data'))[:16]}, expected {expect_data[:16]}): delete it or "
                             f"point `path` elsewhere")
        classifier = SmallCNN(**blob["args"])
        classifier.load_state_dict(blob["state_dict"])
        return cls(classifier.to(device))


def load_images(loader_or_dataset: Iterable, max_items: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Collects ``{"image", "label"}`` items (a Dataset) or batches (a DataLoader) into tensors
    (labels ``None`` for unlabelled data, e.g. image-caption pairs).

    Args:
        loader_or_dataset: a map-style Dataset of dicts, or any iterable of dict batches.
        max_items: keep at most this many images (None: all).

    Returns:
        (images [N, C, H, W] float, labels [N] int64 or None).
    """
    source = loader_or_dataset
    if hasattr(source, "__getitem__") and hasattr(source, "__len__") and not isinstance(source, DataLoader):
        source = map(source.__getitem__, range(len(source)))  # map-style: one item at a time
    images, labels, count = [], [], 0
    for item in source:
        x = torch.as_tensor(item["image"]).float()
        x = x[None] if x.ndim == 3 else x  # [b, C, H, W]
        images.append(x)
        if "label" in item:
            labels.append(torch.as_tensor(item["label"]).long().reshape(-1))  # [b]
        count += len(x)
        if max_items is not None and count >= max_items:
            break
    if not images:
        raise ValueError("load_images: the dataset or loader yielded no items")
    return torch.cat(images)[:max_items], (torch.cat(labels)[:max_items] if labels else None)

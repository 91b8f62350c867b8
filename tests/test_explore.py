"""The notebook's building blocks (dpldm.explore) against brute force."""

import numpy as np
import pytest
import torch

from dpldm.datamodules import DigitsDataModule
from dpldm.explore import heldout_images, nearest, privacy_curve, training_images
from dpldm.privacy import epsilon_for


def test_privacy_curve_is_the_accountant_over_the_first_t_steps():
    history = [(1.1, 0.05, 30), (0.9, 0.05, 20)]  # e.g. a resumed run with another sigma
    ckpt = {"privacy": {"accountant": {"kind": "rdp", "delta": 1e-5, "history": history}}}
    curve = privacy_curve(ckpt, points=11)
    assert curve["steps"][0] == 1 and curve["steps"][-1] == 50 and np.all(np.diff(curve["epsilon"]) > 0)
    i = int(np.where(curve["steps"] == 30)[0][0])
    assert curve["epsilon"][i] == pytest.approx(epsilon_for(1.1, 0.05, 30, 1e-5, "rdp"))
    from dpldm.privacy import PrivacyAccountant

    acc = PrivacyAccountant("rdp", 1e-5)
    acc.add(1.1, 0.05, 30)
    acc.add(0.9, 0.05, 20)
    assert curve["epsilon"][-1] == pytest.approx(acc.epsilon())
    assert len(privacy_curve({"state_dict": {}})["steps"]) == 0  # not a DP checkpoint
    prior = [(2.0, 0.05, 100)]  # declared releases: every point of the curve composes them, as the run reported
    ckpt["privacy"]["accountant"]["prior"] = prior
    with_prior = privacy_curve(ckpt, points=11)
    assert with_prior["epsilon"][-1] == pytest.approx(PrivacyAccountant("rdp", 1e-5, [*prior, *history]).epsilon())
    assert np.all(with_prior["epsilon"] > curve["epsilon"])


def test_nearest_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train, queries = torch.randn(50, 1, 4, 4, generator=g), torch.randn(7, 1, 4, 4, generator=g)
    queries[3] = train[17]  # a copy
    found = nearest(queries, train, k=2)
    for i, q in enumerate(queries):
        d = ((train - q) ** 2).flatten(1).sum(1).sqrt()
        order = d.argsort()[:2]
        assert found.indices[i].tolist() == order.tolist()
        torch.testing.assert_close(found.distances[i], d[order], rtol=1e-4, atol=1e-4)
    assert found.indices[3, 0] == 17 and found.distances[3, 0] < 1e-3


def test_training_and_heldout_images_are_the_private_split_and_another():
    dm = DigitsDataModule(image_size=8)
    train, test = training_images(dm), heldout_images(dm)
    assert len(train) == dm.num_train_samples and train.shape[1:] == (1, 8, 8)
    assert train.min() >= -1 and train.max() <= 1
    assert len(test) == len(dm.test_dataset) and len(test) > 0

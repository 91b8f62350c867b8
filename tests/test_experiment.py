"""The experiment's report from result files, the methods' overrides, and a UNet "from scratch"."""

import json

import pytest
import torch

from dpldm.experiment import METHODS, method_overrides
from dpldm.experiment_report import render
from dpldm.modules import build_unet, load_unet
from tests.conftest import TINY_UNET


def _row(method, eps, seed, acc, fid):
    row = {"method": method, "epsilon": eps, "seed": seed, "val/downstream_acc": acc, "val/fid_glyph": fid,
           "trained_fraction": 0.3, "seconds": 1.0}
    if eps is not None:
        row.update({"epsilon_spent": eps - 0.01, "delta": 1e-5, "noise_multiplier": 2.0 / eps,
                    "sample_rate": 128 / 60000, "steps": 300, "expected_batch_size": 128})
    return row


def test_report_tables_means_over_seeds_anchors_and_plot(tmp_path):
    rows = [_row("attention", 1.0, 0, 0.5, 20), _row("attention", 1.0, 1, 0.7, 30), _row("full", 1.0, 0, 0.4, 25),
            _row("nonprivate", None, 0, 0.9, 5)]
    record = {"size": "fashion", "label": "Fashion-MNIST", "rows": rows, "real_data_classifier": 0.93,
              "budget": ["--trainer.max_steps=300"], "minutes": 3.0, "command": "dpldm experiment --size fashion",
              "settings": {"privacy": {"max_grad_norm": 1.0}, "optimizer": {"class_path": "torch.optim.AdamW"},
                           "batch_size": 128, "metrics": []}}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "fashion.json").write_text(json.dumps(record))
    (tmp_path / "results" / "discussion.md").write_text("## Discussion\nhand-written")
    render(str(tmp_path / "results"), str(tmp_path / "results.md"))
    doc = (tmp_path / "results.md").read_text()
    assert "| DP fine-tune, attention only (DP-LDM) | 0.600 ± 0.141 |" in doc  # mean ± sd of the two seeds
    assert "| DP fine-tune, full UNet | 0.400 |" in doc and "(ε = ∞) | 0.900 |" in doc
    assert "86.2% at ε = 10" in doc and "N = 60000" in doc and "hand-written" in doc
    assert (tmp_path / "results" / "fashion.png").stat().st_size > 10_000


def test_each_method_changes_only_what_it_names():
    assert method_overrides("attention") == []
    assert "--model.init_args.privacy=null" in method_overrides("nonprivate")
    scratch = method_overrides("scratch")
    assert "--model.init_args.unet.init_args.weights=false" in scratch and any("kind=full" in a for a in scratch)
    assert set(METHODS) == {"attention", "full", "scratch", "nonprivate"}
    with pytest.raises(ValueError, match="unknown method"):
        method_overrides("ghost")


def test_unet_from_scratch_has_the_pretrained_architecture_and_fresh_weights(tmp_path):
    pretrained = build_unet(**TINY_UNET)
    pretrained.save_pretrained(tmp_path / "unet")
    torch.manual_seed(1)
    fresh = load_unet(str(tmp_path), subfolder="unet", weights=False)
    loaded = load_unet(str(tmp_path), subfolder="unet").config
    assert {k: v for k, v in fresh.config.items() if not k.startswith("_")} == {
        k: v for k, v in loaded.items() if not k.startswith("_")}
    same = [torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), pretrained.state_dict().values())
            if a.dim() > 1]
    assert same and not any(same)

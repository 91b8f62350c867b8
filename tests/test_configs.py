"""Every run config under configs/ instantiates (model, data, trainer), chained stage by stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dpldm.commands.lightning_cli import DPLDMCLI
from dpldm.modules.diffusion import check_data_compatible

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_configs() -> list[str]:
    """Complete run configs: everything outside ``_*`` folders and ``sweeps/``."""
    found = []
    for path in CONFIGS.rglob("*.yaml"):
        rel = path.relative_to(CONFIGS)
        if rel.parts[0] == "sweeps" or any(p.startswith("_") for p in rel.parts[:-1]):
            continue
        found.append(rel.as_posix())
    return sorted(found)


def files(stage: str | tuple[str, ...]) -> tuple[str, ...]:
    """A chain's stage: one config, or a config and the overlays laid over it, in order."""
    return (stage,) if isinstance(stage, str) else stage


def instantiate(rel: str | tuple[str, ...], *overrides: str) -> DPLDMCLI:
    """A stage's configs (see :func:`files`), instantiated without running."""
    configs = [x for r in files(rel) for x in ("--config", str(CONFIGS / r))]
    return DPLDMCLI(args=[*configs, *overrides], run=False)


AE_PATH = "--model.init_args.autoencoder.init_args.vae.init_args.path"
UNET_PATH = "--model.init_args.unet.init_args.path"
CHAINS = {
    "quickstart": ("quickstart/autoencoder.yaml", "quickstart/ldm.yaml", "quickstart/finetune.yaml"),
    "cifar10": ("cifar10/autoencoder.yaml", "cifar10/ldm.yaml", "cifar10/finetune.yaml"),
    # DPImageBench's benchmarks fine-tune the quickstart's public glyph stages (MNIST's with handwriting strokes)
    "mnist": (("quickstart/autoencoder.yaml", "mnist/public/autoencoder.yaml"),
              ("quickstart/ldm.yaml", "mnist/public/ldm.yaml"), "mnist/finetune.yaml"),
    "fashion": (("quickstart/autoencoder.yaml", "mnist/public/autoencoder.yaml"),
                ("quickstart/ldm.yaml", "mnist/public/ldm.yaml"), "fashion/finetune.yaml"),
}


# Configs whose public parts come pretrained (no stage 1-2 chain); instantiated by the tests below.
PRETRAINED = ("laion/tiny.yaml", "laion/finetune.yaml", "sd/finetune.yaml")
ARCH = str(CONFIGS / "laion" / "tiny-clip.json")
TEXT = "--model.init_args.conditioner.init_args"


def test_every_run_config_is_covered():
    covered = {c for chain in CHAINS.values() for stage in chain for c in files(stage)} | set(PRETRAINED)
    assert set(run_configs()) == covered, "add new run configs to CHAINS so they are instantiated"


def _mnist_family_root(name, tmp_path):
    from tests.datamodules.common import write_idx, write_mnist

    root = tmp_path / name
    root.mkdir()
    if name == "mnist":
        return write_mnist(root)
    for split, n in (("train", 50), ("t10k", 20)):
        write_idx(root / f"{split}-images-idx3-ubyte", np.random.default_rng(0).integers(0, 256, (n, 28, 28)), False)
        write_idx(root / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, False)
    return root


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_config_chain_instantiates(name, tmp_path, cifar_root, imagenet_root):
    data = {"cifar10": ["--data.init_args.root", str(imagenet_root), "--data.init_args.max_train_batches", "3"]}.get(name, [])
    ae_cfg, ldm_cfg, ft_cfg = CHAINS[name]

    cli = instantiate(ae_cfg, *data)
    assert cli.trainer.max_epochs >= 1
    if name in ("mnist", "fashion"):  # the overlay bends the public glyphs like handwriting and trains stage 1 longer
        assert cli.datamodule.elastic > 0 and cli.datamodule.max_stroke > 1.5 and cli.trainer.max_epochs > 1
    glyphs = {k: getattr(cli.datamodule, k, None) for k in ("elastic", "max_stroke")}
    cli.model.vae.save_pretrained(tmp_path / "ae")  # stands in for the stage's export

    cli = instantiate(ldm_cfg, *data, AE_PATH, str(tmp_path / "ae"))
    assert {k: getattr(cli.datamodule, k, None) for k in glyphs} == glyphs  # both stages see the same public images
    check_data_compatible(cli.model, cli.datamodule)
    cli.model.export_pretrained(str(tmp_path / "ldm"))

    src = "--data.init_args.source.init_args"
    ft_data = {"cifar10": [f"{src}.root", str(cifar_root), f"{src}.download", "false"]}.get(name, [])
    if name in ("mnist", "fashion"):  # files the test writes
        ft_data += [f"{src}.root", str(_mnist_family_root(name, tmp_path))]
    init = ["--model.init_args.conditioner.init_args.init_from", str(tmp_path / "ldm")] if name != "cifar10" else []
    cli = instantiate(ft_cfg, *ft_data, AE_PATH, str(tmp_path / "ae"), UNET_PATH, str(tmp_path / "ldm"), *init)
    check_data_compatible(cli.model, cli.datamodule)
    data = getattr(cli.datamodule, "source", cli.datamodule)  # a latent cache is built at fit time
    assert data.num_train_samples > 0


def test_laion_configs_instantiate(tmp_path):
    from tests.conftest import write_tiny_ldm_text

    tiny = instantiate("laion/tiny.yaml", f"{TEXT}.model_name", ARCH)
    check_data_compatible(tiny.model, tiny.datamodule)
    # finetune.yaml on a tiny stand-in of CompVis/ldm-text2im-large-256 (unet, vqvae, bert, tokenizer)
    ldm = str(write_tiny_ldm_text(tmp_path / "ldm"))
    cli = instantiate("laion/finetune.yaml", UNET_PATH, ldm, AE_PATH, ldm, f"{TEXT}.path", ldm,
                      "--data.init_args.source.init_args.image_size", "32")
    check_data_compatible(cli.model, cli.datamodule)
    assert cli.datamodule.flip_views and cli.model.privacy.epsilon == 10.0
    cond = cli.model.conditioner  # DP-LDM's text setting: the base model's LDMBert, frozen, nothing to train
    assert type(cond.text_model).__name__ == "LDMBertModel" and cond.trainable_modules() == []
    assert not any(p.requires_grad for p in cond.parameters())


def test_laion_finetune_offline_names_the_key_for_a_local_copy():
    from dpldm.modules.hub import PretrainedNotFoundError

    with pytest.raises((PretrainedNotFoundError, ValueError), match="model.init_args.unet.init_args.path"):  # jsonargparse wraps it
        instantiate("laion/finetune.yaml")


def _data_class(cfg: dict) -> type:
    """The data class a config trains on (a latent cache's source)."""
    import importlib

    data = cfg["data"]
    if data["class_path"].endswith("LatentCacheDataModule"):
        data = data["init_args"]["source"]
    module, name = data["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_every_config_on_private_data_is_dp():
    """A private stage without DP must be impossible to ship: every config whose data is not marked public (the
    fine-tunes, present and future) has a privacy block, keeps the Poisson sampler and logs no private loss."""
    import yaml

    private = []
    for rel in run_configs():
        cfg = yaml.safe_load((CONFIGS / rel).read_text())
        if "class_path" not in cfg.get("data", {}):  # an overlay of a public stage: it may reshape public data and
            assert set(cfg) <= {"data", "trainer", "model"} and "class_path" not in cfg["data"], rel  # the budget,
            model = cfg.get("model", {})  # never the model itself
            assert set(model) <= {"init_args"} and set(model.get("init_args", {})) <= {"optimizer"}, rel
            continue
        if getattr(_data_class(cfg), "public", False):
            continue
        private.append(rel)
        model, trainer = cfg["model"]["init_args"], cfg["trainer"]
        assert model.get("privacy", {}).get("class_path") == "dpldm.privacy.DifferentialPrivacy", rel
        assert not model.get("allow_non_private", False), rel
        assert trainer.get("use_distributed_sampler") is False, rel
        assert trainer.get("limit_val_batches") == 0, rel  # no validation loss of private data
        assert not model["privacy"].get("init_args", {}).get("log_private_metrics", False), rel
    assert {"quickstart/finetune.yaml", "cifar10/finetune.yaml", "laion/finetune.yaml", "mnist/finetune.yaml",
            "fashion/finetune.yaml"} <= set(private)
    assert not [r for r in private if "finetune" not in r and "tiny" not in r], "a non-fine-tune stage on private data"


def test_the_benchmark_recipe_takes_a_dp_step_on_its_configs(tmp_path):
    """A fast_dev_run of configs/fashion/finetune.yaml on 50 written images: one DP-SGD step at delta = 1e-5, with
    the recipe's EMA and solver. MNIST's config is the same recipe but for its numbers (B, T, lr); it instantiates
    above, and its reader takes nothing but MNIST's 70,000 images, minutes to encode here."""
    cli = instantiate("quickstart/autoencoder.yaml")
    cli.model.vae.save_pretrained(tmp_path / "ae")
    cli = instantiate("quickstart/ldm.yaml", AE_PATH, str(tmp_path / "ae"))
    cli.model.export_pretrained(str(tmp_path / "ldm"))
    src = "--data.init_args.source.init_args"
    cli = DPLDMCLI(args=["fit", "--config", str(CONFIGS / "fashion" / "finetune.yaml"), AE_PATH, str(tmp_path / "ae"),
                         UNET_PATH, str(tmp_path / "ldm"), "--model.init_args.conditioner.init_args.init_from",
                         str(tmp_path / "ldm"), f"{src}.root", str(_mnist_family_root("fashion", tmp_path)),
                         "--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.batch_size", "8",
                         "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.fast_dev_run", "1",
                         "--trainer.logger", "false"])
    assert cli.model.dp.accountant.steps == 1 and cli.model.dp.plan.delta == 1e-5
    assert cli.model.ema is not None and cli.model.solver == "dpm_solver++"

"""Relocatable runs (dpldm/runs.py): a run launched with relative paths, reloaded from other folders, moved, and
with its public stages deleted; the notebook executed where Jupyter starts its kernel (``notebooks/``)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from dpldm.commands import quickstart
from dpldm.cli import main
from dpldm.runs import load_run
from tests.conftest import REPO, tiny_args

ONE_STEP = ["--trainer.fast_dev_run=false", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
            "--trainer.callbacks=[]"]  # a real step, so the run keeps a checkpoint


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder holding ``notebooks/`` and ``runs/quickstart`` made by the tiny quickstart chain launched
    from it with the relative ``--out runs/quickstart`` (as `make quickstart` does)."""
    root = tmp_path_factory.mktemp("project")
    (root / "notebooks").mkdir()
    shutil.copy(os.path.join(REPO, "notebooks", "explore_samples.ipynb"), root / "notebooks")
    here = os.getcwd()
    os.chdir(root)
    try:
        quickstart.main([*tiny_args("runs/quickstart"), *(f"--override=finetune:{a}" for a in ONE_STEP)])
    finally:
        os.chdir(here)
    return root


def test_the_fit_leaves_what_reloads_it_beside_its_config(project):
    import yaml

    version = project / "runs" / "quickstart" / "finetune" / "logs" / "version_0"
    cfg = yaml.safe_load((version / "config.yaml").read_text())
    assert cfg["model"]["init_args"]["unet"]["init_args"]["path"] == "runs/quickstart/ldm/pretrained"  # relative
    for part in ("unet", "vae"):
        assert (version / "architecture" / part / "config.json").exists()
    assert (version / "launch.json").exists()


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_reloads_from_another_folder_moved_and_without_its_public_stages(project, tmp_path, monkeypatch):
    run = project / "runs" / "quickstart" / "finetune"
    monkeypatch.chdir(project)
    reference = _weights(load_run("runs/quickstart/finetune"))

    monkeypatch.chdir(tmp_path)  # another folder: the config's relative paths do not resolve from here
    assert not os.path.exists("runs/quickstart/ldm/pretrained")
    for k, v in _weights(load_run(str(run))).items():
        assert torch.equal(v, reference[k]), k

    moved = tmp_path / "elsewhere" / "my-dp-run"  # the run folder alone, renamed, its public stages deleted
    shutil.copytree(run, moved)
    gone = tmp_path / "gone"
    shutil.copytree(project / "runs", gone)  # restored below for the other tests of this module
    for stage in ("autoencoder", "ldm"):
        shutil.rmtree(project / "runs" / "quickstart" / stage)
    try:
        for k, v in _weights(load_run(str(moved))).items():
            assert torch.equal(v, reference[k]), k
        out = tmp_path / "samples"
        main(["sample", str(moved), "--labels", "1", "--repeat", "2", "--steps", "2", "--out", str(out)])
        assert np.load(out / "samples.npz")["images"].shape == (2, 32, 32, 1)
    finally:
        shutil.rmtree(project / "runs")
        shutil.copytree(gone, project / "runs")


def test_notebook_runs_where_jupyter_starts_its_kernel(project, monkeypatch):
    """The shipped notebook, unchanged, with its kernel in ``notebooks/`` and no DPLDM_RUN: its default
    ``../runs/quickstart/finetune`` is a run whose config holds paths relative to the project folder."""
    import nbclient
    import nbformat

    monkeypatch.delenv("DPLDM_RUN", raising=False)
    monkeypatch.setenv("DPLDM_STEPS", "2")
    nb = nbformat.read(project / "notebooks" / "explore_samples.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(project / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    figures = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert len(figures) == 5  # grid, epsilon curve, pixel and latent neighbours, distance histograms
    assert any("epsilon = " in o.get("text", "") for o in outputs)  # a DP run: the accountant's curve
    source = "".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "def " not in source and "class " not in source  # everything reusable lives in dpldm


def test_export_loads_with_diffusers_alone_and_samples_as_the_run_does(project, tmp_path, monkeypatch):
    """``dpldm export`` -> ``DiffusionPipeline.from_pretrained`` from another folder, the run deleted: the same
    images as the run's own sampler for the same seed, and a model card with the privacy record."""
    from diffusers import DiffusionPipeline

    run = project / "runs" / "quickstart" / "finetune"
    out = tmp_path / "my-dp-model"
    with pytest.raises(SystemExit, match="upload it later with `hf upload me/model"):  # offline: the export stays
        main(["export", str(run), str(out), "--push-to-hub", "me/model"])
    model = load_run(str(run))
    ckpt = torch.load(sorted(run.glob("checkpoints/*.ckpt"))[-1], map_location="cpu", weights_only=False)
    labels = [0, 3, 9]
    want = model.sample(torch.tensor(labels), num_steps=3, generator=torch.Generator().manual_seed(7))  # [B,C,H,W]

    saved = tmp_path / "saved-runs"
    shutil.move(project / "runs", saved)  # the run and its public stages gone
    monkeypatch.chdir(tmp_path)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
        assert type(pipe).__name__ == "DPLDMPipeline" and "dpldm" not in type(pipe).__module__
        got = pipe(class_labels=labels, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                   output_type="pt").images
        assert torch.allclose(got, want, atol=1e-5)
        pil = pipe(class_labels=[1], num_inference_steps=2).images
        assert len(pil) == 1 and pil[0].size == (32, 32)
        with pytest.raises(ValueError, match="0..9"):
            pipe(class_labels=[10])
    finally:
        shutil.move(saved, project / "runs")

    card = (out / "README.md").read_text()
    spent = ckpt["privacy"]
    assert f"ε = {spent['privacy/epsilon']:.3g}" in card and f"{spent['privacy/noise_multiplier']:.4g}" in card
    assert "Poisson" in card and "attention scope" in card and "N (private training images) | 1,437" in card
    assert "sha256" in card and "Hyperparameter selection" in card


def test_a_lora_run_exports_merged_into_a_plain_unet(project, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    from dpldm.commands.lightning_cli import DPLDMCLI
    from tests.conftest import TINY

    monkeypatch.chdir(project)
    chain = quickstart.stage_overrides("runs/quickstart", {"finetune": TINY["finetune"]})["finetune"]
    DPLDMCLI(args=["fit", "--config", os.path.join(quickstart.config_dir(), "finetune.yaml"), *chain, *ONE_STEP,
                   "--trainer.default_root_dir=runs/lora", "--model.init_args.scope.init_args.kind=lora"])
    ckpt = next((project / "runs" / "lora" / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    lora_b = [k for k in state["state_dict"] if "lora_B" in k]
    for k in lora_b:  # as if trained longer: adapters that move the samples (one tiny step barely does)
        state["state_dict"][k] = 0.3 * torch.randn_like(state["state_dict"][k])
    torch.save(state, ckpt)
    model = load_run("runs/lora")
    assert lora_b and getattr(model.unet, "_hf_peft_config_loaded", False)  # reloaded with its adapters
    main(["export", "runs/lora", str(tmp_path / "lora-model")])
    want = model.sample(torch.tensor([2, 5]), num_steps=2, generator=torch.Generator().manual_seed(1))
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "lora-model"), trust_remote_code=True)
    assert not any("lora" in k for k in pipe.unet.state_dict())  # merged: a UNet that loads without PEFT
    got = pipe(class_labels=[2, 5], num_inference_steps=2, generator=torch.Generator().manual_seed(1),
               output_type="pt").images
    assert torch.allclose(got, want, atol=1e-5)
    assert "lora scope" in (tmp_path / "lora-model" / "README.md").read_text()


def test_predict_samples_the_test_set_s_conditions_and_test_points_to_evaluate(project, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.chdir(project)
    run = project / "runs" / "quickstart" / "finetune"
    config = run / "logs" / "version_0" / "config.yaml"
    ckpt = sorted(run.glob("checkpoints/*.ckpt"))[-1]
    out = tmp_path / "predict"
    main(["predict", "--config", str(config), "--ckpt_path", str(ckpt), f"--trainer.default_root_dir={out}",
          "--trainer.limit_predict_batches=2", "--data.init_args.source.init_args.batch_size=4",
          "--trainer.logger=false"])
    saved = np.load(out / "predictions" / "samples.npz")
    assert saved["images"].shape == (8, 32, 32, 1) and saved["images"].std() > 0  # 2 batches of 4
    assert set(saved["labels"]) <= set(range(10)) and len(list((out / "predictions").glob("0*.png"))) == 8
    with pytest.raises(SystemExit) as err:
        main(["test", "--config", str(config)])
    assert err.value.code == 2 and "dpldm evaluate RUN" in capsys.readouterr().err

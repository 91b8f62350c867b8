"""``dpldm export RUN OUT``: a finished run as a self-contained diffusers pipeline folder with a model card.

A run on a base pipeline's own text encoder exports as that standard pipeline: a ``StableDiffusionPipeline``
(CLIP) or an ``LDMTextToImagePipeline`` (CompVis' LDMBert), an unconditional one as an ``LDMPipeline``, loadable
without custom code; an open_clip text run as dpldm's ``DPLDMTextPipeline`` (its tower converted to a
``CLIPTextModel``, :mod:`dpldm.export.open_clip_text`). A class-conditional run's OUT
holds ``model_index.json``, ``unet/`` (EMA weights when kept; LoRA adapters merged), ``vae/`` (its latent
scale factor the run's), ``scheduler/`` (the run's solver on its training schedule), ``conditioning/`` (the
class embedding), ``pipeline.py`` (:mod:`dpldm.export.pipeline`: torch and diffusers only) and ``README.md``
(:func:`dpldm.export.card.model_card`: (ε, δ), σ, q, T, C, K, scope, N, the public base model, what the
guarantee does not cover). It loads from any folder, without the run or dpldm:
``DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch

from dpldm.errors import ConfigError

PIPELINE = os.path.join(os.path.dirname(__file__), "pipeline.py")


def export_run(run_dir: str, out: str, checkpoint: str | None = None) -> str:
    """Write the run's model (its newest checkpoint, or ``checkpoint``) to the pipeline folder ``out``: a
    standard text-to-image pipeline for a run on a base pipeline's own text encoder (:func:`_text_to_image`),
    dpldm's class-conditional pipeline for a class embedder.

    Returns:
        ``out``.
    """
    from dpldm.export.card import model_card
    from dpldm.modules.pipeline_text import PipelineTextEncoder
    from dpldm.modules.conditioning import ClassEmbedder, OpenCLIPTextEncoder, Unconditional
    from dpldm.privacy.scope import merged_unet
    from dpldm.runs import load_run_and_data, saved_config

    model, _, path = load_run_and_data(run_dir, checkpoint)
    cond = model.conditioner
    if isinstance(cond, ClassEmbedder):
        write = _class_conditional
    elif isinstance(cond, Unconditional):
        write = _unconditional
    elif isinstance(cond, PipelineTextEncoder) and cond.projection is None and type(cond.text_model).__name__ in (
            "CLIPTextModel", "LDMBertModel"):
        write = _text_to_image
    elif isinstance(cond, OpenCLIPTextEncoder):
        write = _open_clip_text
    else:
        raise ConfigError("model.init_args.conditioner", type(cond).__name__,
                          "dpldm export writes class-conditional (ClassEmbedder), unconditional and open_clip runs "
                          "and runs on a base pipeline's own CLIPTextModel or LDMBert (PipelineTextEncoder, no "
                          "projection) so far")
    privacy = torch.load(path, map_location="cpu", weights_only=False).get("privacy")
    with model.ema_weights():  # the weights the run samples with
        unet = merged_unet(model.unet)
        unet.register_to_config(sample_size=model.latent_size)  # the size it was trained at: the pipeline's
        vae = model.autoencoder.vae
        vae.register_to_config(scaling_factor=model.autoencoder.scale_factor)  # the scale the run used
        write(model, unet, vae, out)
        _unet_code(unet, out)
    cfg, _ = saved_config(run_dir)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(model_card(os.path.basename(os.path.normpath(out)), model, privacy, cfg, run_dir))
    return out


def _class_conditional(model: object, unet: object, vae: object, out: str) -> None:
    """dpldm's pipeline (``pipeline.py``, torch + diffusers only) with the class embedding as a component."""
    from dpldm.export.pipeline import ClassEmbedding, DPLDMPipeline
    from dpldm.modules.sampling import solver_scheduler

    cond = model.conditioner
    embedding = ClassEmbedding(cond.num_classes, cond.embed_dim, cond.num_tokens)
    embedding.embedding.load_state_dict(cond.embedding.state_dict())
    DPLDMPipeline(unet=unet, vae=vae, scheduler=solver_scheduler(model.noise_scheduler, model.solver),
                  conditioning=embedding, num_inference_steps=model.sampling_steps,
                  guidance_scale=model.guidance_scale).save_pretrained(out)
    for folder in (out, os.path.join(out, "conditioning")):  # the pipeline's and the component's code
        shutil.copy(PIPELINE, os.path.join(folder, "pipeline.py"))
    _name_in_index(out, "_class_name", "pipeline", "DPLDMPipeline")  # diffusers loads both from pipeline.py
    _name_in_index(out, "conditioning", "pipeline", "ClassEmbedding")


def _open_clip_text(model: object, unet: object, vae: object, out: str) -> None:
    """dpldm's text pipeline (``pipeline.py``): the open_clip tower as a ``CLIPTextModel`` + ``CLIPTokenizer``
    (:mod:`dpldm.export.open_clip_text`, checked against the run's features before anything is written) and the
    run's learned projection."""
    from dpldm.export.open_clip_text import check_same_features, clip_text_model, clip_tokenizer
    from dpldm.export.pipeline import DPLDMTextPipeline, TextProjection
    from dpldm.modules.sampling import solver_scheduler

    cond = model.conditioner
    text_model, tokenizer = clip_text_model(cond), clip_tokenizer(cond.positional_embedding.shape[0])
    check_same_features(cond, text_model, tokenizer, ["a photograph of a dog on a beach", "A RED square, on white!"])
    projection = None
    if cond.projection is not None:
        projection = TextProjection(cond.projection.in_features, cond.projection.out_features)
        projection.linear.load_state_dict(cond.projection.state_dict())
    pipe = DPLDMTextPipeline(unet=unet, vae=vae, scheduler=solver_scheduler(model.noise_scheduler, model.solver),
                             text_encoder=text_model, tokenizer=tokenizer, projection=projection,
                             num_inference_steps=model.sampling_steps, guidance_scale=model.guidance_scale)
    pipe.save_pretrained(out)
    shutil.copy(PIPELINE, os.path.join(out, "pipeline.py"))
    _name_in_index(out, "_class_name", "pipeline", "DPLDMTextPipeline")
    if projection is not None:  # the component's code beside its weights
        shutil.copy(PIPELINE, os.path.join(out, "projection", "pipeline.py"))
        _name_in_index(out, "projection", "pipeline", "TextProjection")


def _name_in_index(out: str, component: str, module: str, cls: str) -> None:
    """Make ``model_index.json`` in ``out`` name ``module.cls`` (a file in the folder) for ``component``."""
    index_path = os.path.join(out, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index[component] = [module, cls]
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)


def _unet_code(unet: object, out: str) -> None:
    """A ``resblock_updown`` UNet (DP-LDM's) is not a diffusers class: its file (torch + diffusers only) goes
    into ``unet/`` and ``model_index.json`` names it, as the class embedding's does."""
    from dpldm.modules import unet_updown

    if not isinstance(unet, unet_updown.UpDownUNet2DConditionModel):
        return
    shutil.copy(unet_updown.__file__, os.path.join(out, "unet", "unet_updown.py"))
    _name_in_index(out, "unet", "unet_updown", "UpDownUNet2DConditionModel")


def _unconditional(model: object, unet: object, vae: object, out: str) -> None:
    """diffusers' standard ``LDMPipeline`` (an unconditional UNet2DModel, its autoencoder as ``vqvae``)."""
    from diffusers import LDMPipeline

    from dpldm.modules.sampling import solver_scheduler

    scheduler = solver_scheduler(model.noise_scheduler, model.solver)
    LDMPipeline(vqvae=vae, unet=unet, scheduler=scheduler).save_pretrained(out)


def _text_to_image(model: object, unet: object, vae: object, out: str) -> None:
    """The base model's standard pipeline class with its own text encoder and tokenizer and the run's solver:
    ``StableDiffusionPipeline`` (CLIP; no safety checker: none was part of the run) or ``LDMTextToImagePipeline``
    (CompVis' LDMBert)."""
    from diffusers import LDMTextToImagePipeline, StableDiffusionPipeline

    from dpldm.modules.sampling import solver_scheduler

    cond, scheduler = model.conditioner, solver_scheduler(model.noise_scheduler, model.solver)
    if type(cond.text_model).__name__ == "LDMBertModel":
        LDMTextToImagePipeline(vqvae=vae, bert=cond.text_model, tokenizer=cond.tokenizer, unet=unet,
                               scheduler=scheduler).save_pretrained(out)
        return
    if model.noise_scheduler.config.steps_offset != 1:
        print(f"note: StableDiffusionPipeline samples with steps_offset = 1; this run sampled with "
              f"{model.noise_scheduler.config.steps_offset} (its timesteps differ by one)")
    StableDiffusionPipeline(vae=vae, text_encoder=cond.text_model, tokenizer=cond.tokenizer, unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out)


def main(argv: list[str]) -> str:
    p = argparse.ArgumentParser(prog="dpldm export", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the run directory (trainer.default_root_dir), e.g. runs/quickstart/finetune")
    p.add_argument("out", help="the pipeline folder to write")
    p.add_argument("--ckpt", help="checkpoint file (default: the run's newest)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload OUT to this Hugging Face repo (needs a token)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = p.parse_args(argv)
    out = export_run(args.run, args.out, args.ckpt)
    print(f"exported {args.run} -> {out}/ (README.md: its privacy card)")
    if args.push_to_hub:
        push(out, args.push_to_hub, args.private)
    return out


def push(folder: str, repo: str, private: bool = False) -> str:
    """Upload an exported folder (its model card included) to the Hugging Face Hub repo ``repo``."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True)
        url = api.upload_folder(folder_path=folder, repo_id=repo, commit_message="dpldm export")
    except Exception as err:  # offline (HF_HUB_OFFLINE=1), no token, no permission
        raise SystemExit(f"--push-to-hub {repo}: the upload failed ({type(err).__name__}: {err}). The export is "
                         f"complete in {folder}/; upload it later with `hf upload {repo} {folder}`.") from err
    print(f"pushed {folder}/ -> {url}")
    return str(url)

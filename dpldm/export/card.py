"""The model card (``README.md``) of an exported DP model: what was guaranteed, with which settings, from which
public base model, and what the guarantee does not cover."""

from __future__ import annotations

import glob
import os

from dpldm.privacy.accounting import PrivacyAccountant
from dpldm.privacy.settings import prior_releases
from dpldm.runs import rebased
from dpldm.utils.files import files_digest

UNCONDITIONAL_USAGE = """```python
from diffusers import LDMPipeline

pipe = LDMPipeline.from_pretrained("{folder}")
images = pipe(batch_size=16, num_inference_steps={steps}).images
```"""

TEXT_USAGE = """```python
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained("{folder}")
images = pipe(["a photograph of a dog on a beach"], num_inference_steps={steps}).images
```"""

USAGE = """```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{folder}", trust_remote_code=True)  # pipeline.py: torch + diffusers
images = pipe(class_labels=list(range({classes})), num_inference_steps={steps}).images
```"""

OPEN_CLIP_USAGE = """```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{folder}", trust_remote_code=True)  # pipeline.py: torch + diffusers
images = pipe(["a photograph of a dog on a beach"], num_inference_steps={steps}).images
```
The run's open_clip text tower is stored as a transformers `CLIPTextModel` (checked to give the run's features)."""

CAVEATS = """## What the guarantee does not cover

- **The public base model and its data.** They are not private: anything the base model memorised from its own
  training data can appear in samples, and its licence applies.
- **Hyperparameter selection.** (ε, δ) covers one training run with the settings above. Settings chosen by
  comparing runs on the private data (a sweep scored on it) spend privacy that is not counted here.
- **One example, not one person.** The unit is one training image. A person with k images is covered at about
  kε (group privacy).
- **Everything outside training.** Metrics logged on private data (declared by `log_private_metrics`), and any
  evaluation on private test images, are not part of this guarantee."""


def _weights_hash(path: str, subfolder: str | None) -> str | None:
    """sha256 (first 16 hex digits) of a local diffusers model's weight files, or of a checkpoint file (CompVis
    layout), or None for a hub id."""
    if os.path.isfile(path):
        files = [path]
    else:
        folder = os.path.join(path, subfolder or "")
        files = sorted(f for ext in ("safetensors", "bin") for f in glob.glob(os.path.join(folder, f"*.{ext}")))
    return files_digest(files) if files else None


def base_models(cfg: dict, run_dir: str) -> list[str]:
    """One line per public part: where it came from (as configured) and, when it is on disk, its hash."""
    model = cfg["model"]["init_args"]
    parts = {"UNet": model.get("unet", {}),
             "autoencoder": model.get("autoencoder", {}).get("init_args", {}).get("vae", {})}
    conditioner = model.get("conditioner", {})
    if conditioner.get("class_path", "").endswith("PipelineTextEncoder"):  # the base pipeline's own text encoder
        args = conditioner["init_args"]
        parts["text encoder"] = {"init_args": {"path": args["path"], "config": args.get("config"),
                                               "subfolder": args.get("text_encoder") or "text_encoder"}}
    found_paths = rebased({name: part.get("init_args", {}).get("path") for name, part in parts.items()}, run_dir)
    lines = []
    for name, part in parts.items():
        args = part.get("init_args", {})
        path, subfolder = args.get("path"), args.get("subfolder")
        if path is None:
            lines.append(f"- {name}: built from its config ({part.get('class_path', '?')}), random initial weights")
            continue
        found = found_paths[name]
        single = os.path.isfile(found)  # a CompVis-layout checkpoint: its YAML, not a subfolder
        where = f"`{path}`" + (f" (config and tokenizer `{args['config']}`)" if single and args.get("config") else
                               f" (YAML `{args.get('original_config')}`)" if single else
                               f" (subfolder `{subfolder}`)" if subfolder else "")
        digest = _weights_hash(found, subfolder) if os.path.exists(found) else None
        start = "" if args.get("weights", True) else "; architecture only, random initial weights"
        lines.append(f"- {name}: {where}" + (f", weights sha256 {digest}…" if digest else "") + start)
    return lines


def model_card(name: str, model: object, privacy: dict | None, cfg: dict, run_dir: str) -> str:
    """``README.md`` of the exported folder ``name``.

    Args:
        name: the folder's name (the title).
        model: the run's :class:`~dpldm.modules.LatentDiffusion` (its settings: privacy, scope, K).
        privacy: the checkpoint's privacy record (``privacy/epsilon``, ``privacy/delta``, ...), None without DP.
        cfg: the run's config as saved (the public base model's paths).
        run_dir: the run folder (its launch folder resolves relative paths).
    """
    params = list(model.parameters())
    trained = sum(p.numel() for p in model.trainable_parameters()) / sum(p.numel() for p in params)
    scope = model.scope.kind if model.scope is not None else "everything"
    front = ["---", "library_name: diffusers", "tags: [differential-privacy, dp-sgd, latent-diffusion, dpldm]", "---", ""]
    if privacy is None or model.privacy is None:
        body = [f"# {name}: NOT differentially private", "",
                "This model was trained without DP-SGD (a declared non-private run). It carries **no privacy "
                "guarantee**: it may reproduce its training images.", ""]
    else:
        dp = model.privacy
        q, n_expected = privacy["privacy/sample_rate"], privacy["privacy/expected_batch_size"]
        rows = [("guarantee", f"(ε = {privacy['privacy/epsilon']:.3g}, δ = {privacy['privacy/delta']:.3g})-DP per "
                 "training image (add/remove one), over the steps actually taken"),
                ("accountant", f"{dp.accountant} (Opacus)"),
                ("noise multiplier σ", f"{privacy['privacy/noise_multiplier']:.4g}"),
                ("sampling", f"Poisson, rate q = {q:.4g} (expected batch B = {n_expected:g})"),
                ("N (private training images)", f"{round(n_expected / q):,}"),
                ("steps T", f"{int(privacy['privacy/steps']):,}"),
                ("clipping norm C", f"{dp.max_grad_norm:g}, each example's whole gradient"),
                ("noise draws K", f"{model.noise_draws} (the K losses of an example averaged, then clipped once)"),
                ("trained", f"{scope} scope: {trained:.1%} of the parameters (the rest frozen, public)")]
        if dp.prior:  # declared releases this model depends on (a search's runs): already inside ε above
            alone = PrivacyAccountant(dp.accountant, privacy["privacy/delta"], dp.prior_segments()).prior_epsilon()
            rows.insert(1, ("composed with", f"{prior_releases(len(dp.prior))} on the same images (ε = {alone:.3g} "
                            "alone; σ, q, T: " + ", ".join(f"({r.noise_multiplier:.4g}, {r.sample_rate:.4g}, "
                                                             f"{r.steps})" for r in dp.prior) + ")"))
        body = [f"# {name}: a differentially private latent diffusion model", "",
                "Fine-tuned by dpldm following DP-LDM (Lyu, Liu, Vinaroz, Park; TMLR 2024): "
                "a public latent diffusion model whose autoencoder stays frozen, trained with DP-SGD on private "
                "images.", "", "## Privacy", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    classes = getattr(model.conditioner, "num_classes", None)
    pipeline = "LDMTextToImagePipeline" if type(getattr(model.conditioner, "text_model", None)).__name__ == (
        "LDMBertModel") else "StableDiffusionPipeline"
    if classes:
        usage = USAGE.format(folder=name, classes=classes, steps=model.sampling_steps)
    elif model.conditioner.embed_dim is None:  # unconditional
        usage = UNCONDITIONAL_USAGE.format(folder=name, steps=model.sampling_steps)
    elif hasattr(model.conditioner, "model_name"):  # an open_clip tower: dpldm's text pipeline
        usage = OPEN_CLIP_USAGE.format(folder=name, steps=model.sampling_steps)
    else:
        usage = TEXT_USAGE.format(folder=name, steps=model.sampling_steps, pipeline=pipeline)
    body += ["## Public base model", "", *base_models(cfg, run_dir), "", "## Use", "", usage, "", CAVEATS, ""]
    return "\n".join(front + body)

"""Renders ``docs/results.md`` (tables, a plot per data set, the exact settings) from the result files that
``dpldm experiment`` writes, one per data size (``docs/results/<size>.json``)."""

from __future__ import annotations

import glob
import json
import os
from statistics import mean, stdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

METRICS = {"test/downstream_acc": ("downstream accuracy", "higher is better"),
           "test/fid_glyph": ("FID-style distance (glyph features)", "lower is better")}
LABELS = {"attention": "DP fine-tune, attention only (DP-LDM)",
          "lora": "DP fine-tune, LoRA on the attention projections (DP-LoRA)", "full": "DP fine-tune, full UNet",
          "scratch": "DP from scratch (no pretraining)", "nonprivate": "non-private fine-tune, attention (ceiling)",
          "public_model": "public LDM, no private step"}
PLAIN = FuncFormatter(lambda value, _: f"{value:g}")  # log-axis ticks as plain numbers
DP_METHODS = ("attention", "lora", "full", "scratch")
COLORS = {"attention": "tab:blue", "lora": "tab:orange", "full": "tab:green", "scratch": "tab:red"}
ORDER = ("mnist", "fashion", "digits")  # the report's sections
NAMES = {"mnist": "MNIST", "fashion": "Fashion-MNIST", "digits": "Digits"}
# DPImageBench (Chen et al., CCS 2025), Table 4: downstream accuracy (%) at epsilon = 1 and 10, delta = 1e-5. Their
# classifier: the mean of ResNet, WRN and ResNeXt trained on 60,000 samples at 28x28, tested on the real test set.
PUBLISHED = {
    "mnist": {"DP-LDM (their re-run)": (44.2, 95.5), "DP-LoRA": (82.2, 97.1), "DPDM": (89.2, 97.7),
              "PDP-Diffusion": (94.5, 97.4), "PrivImage": (94.0, 97.8), "DP-FETA": (95.6, 98.1)},
    "fashion": {"DP-LDM (their re-run)": (62.3, 86.3), "DP-LoRA": (63.5, 83.8), "DPDM": (76.4, 85.6),
                "PDP-Diffusion": (79.2, 85.4), "PrivImage": (79.9, 87.1), "DP-FETA": (81.7, 87.3)},
}
# Published anchors on Fashion-MNIST (DPDM, Dockhorn et al., TMLR 2023; pixel-space diffusion trained from
# scratch with DP-SGD, delta = 1e-5): epsilon -> (downstream CNN accuracy, FID). Not the same FID features.
DPDM_FASHION = {10.0: (0.862, 18.6), 1.0: (0.794, 37.8), 0.2: (0.723, 78.4)}


def upgrade(record: dict) -> dict:
    """A result file from before the metrics had ``splits`` (no ``splits`` in its metric settings) logged its
    test-split values as ``val/*``: read them as the ``test/*`` values they are.

    Args:
        record: a parsed ``docs/results/<size>.json``; its rows are changed in place.
    """
    if any("splits" in m for m in record.get("settings", {}).get("metrics", [])):
        return record
    for row in record["rows"]:
        for key in METRICS:
            legacy = "val/" + key.split("/", 1)[1]
            if key not in row and legacy in row:
                row[key] = row.pop(legacy)
    return record


def _cell(values: list[float], percent: bool = False) -> str:
    """Mean ± sd to 3 decimals; as a percentage, the same rounded figures times 100 (so 0.814 reads 81.4)."""
    if not values:
        return "–"

    def fmt(v: float) -> str:
        return f"{100 * float(f'{v:.3f}'):.1f}" if percent else f"{v:.3f}"

    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(mean(values))} ± {fmt(stdev(values))}"


def table(record: dict, key: str) -> list[str]:
    """Method x epsilon, mean ± sd over seeds."""
    rows = record["rows"]
    epsilons = sorted({r["epsilon"] for r in rows if r["epsilon"] is not None})
    lines = ["| method | " + " | ".join(f"ε = {e:g}" for e in epsilons) + " |",
             "|---|" + "---|" * len(epsilons)]
    for method in DP_METHODS:
        cells = [_cell([r[key] for r in rows if r["method"] == method and r["epsilon"] == e and key in r])
                 for e in epsilons]
        if any(c != "–" for c in cells):
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    ceiling = [r[key] for r in rows if r["method"] == "nonprivate" and key in r]
    if ceiling:
        lines.append(f"| {LABELS['nonprivate']} (ε = ∞) | " + " | ".join([_cell(ceiling)] * len(epsilons)) + " |")
    public = public_value(record, key)
    if public is not None:  # what the private steps add to
        lines.append(f"| {LABELS['public_model']} (ε = 0) | " + " | ".join([_cell([public])] * len(epsilons)) + " |")
    return lines


def plot(record: dict, path: str) -> None:
    """Both metrics against epsilon, a line per method (mean over seeds, each seed a dot)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    for ax, (key, (name, better)) in zip(axes, METRICS.items()):
        for method in DP_METHODS:
            pts = [(r["epsilon"], r[key]) for r in record["rows"] if r["method"] == method and key in r]
            if not pts:
                continue
            eps = sorted({e for e, _ in pts})
            line = ax.plot(eps, [mean(v for e2, v in pts if e2 == e) for e in eps], marker="o", label=LABELS[method],
                           color=COLORS[method])  # the same colour in every data set's plot
            ax.scatter(*zip(*pts), s=10, color=line[0].get_color(), alpha=0.5)
        ceiling = [r[key] for r in record["rows"] if r["method"] == "nonprivate" and key in r]
        if ceiling:
            ax.axhline(mean(ceiling), color="k", ls="--", lw=1, label=LABELS["nonprivate"])
        if public_value(record, key) is not None:
            ax.axhline(public_value(record, key), color="tab:brown", ls=":", lw=1, label=LABELS["public_model"])
        if key == "test/downstream_acc" and record.get("real_data_classifier"):
            ax.axhline(record["real_data_classifier"], color="grey", ls=":", lw=1, label="CNN on real training images")
        if key == "test/downstream_acc" and record.get("autoencoder_classifier"):
            ax.axhline(record["autoencoder_classifier"], color="grey", ls="-.", lw=1,
                       label="CNN on autoencoder reconstructions")
        if key == "test/downstream_acc" and published(record):  # DPImageBench's rows, dashed
            greys = plt.cm.Greys([.9, .8, .7, .6, .5, .4])
            for (method, (at1, at10)), color in zip(PUBLISHED[record["size"]].items(), greys):
                ax.plot([1, 10], [at1 / 100, at10 / 100], ls="--", lw=0.8, marker="x", color=color,
                        label=f"{method} (published)")
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["epsilon"] for r in record["rows"] if r["epsilon"] is not None}))  # the ε measured
        ax.xaxis.set_major_formatter(PLAIN)  # 1, 5, 10 rather than 10^0, 10^1
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ε")
        ax.set_title(f"{name} ({better})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[1].set_yscale("log")  # distances span 1-50: from-scratch rows would flatten the fine-tunes on a linear axis
    axes[1].yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1, 2, 5, 10, 20, 50
    axes[1].yaxis.set_major_formatter(PLAIN)
    axes[1].yaxis.set_minor_formatter(NullFormatter())
    handles, labels = axes[0].get_legend_handles_labels()  # below both panels: the curves stay visible
    rows = -(-len(labels) // 3)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(record["label"], fontsize=10)
    fig.tight_layout(rect=(0, 0.042 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def public_value(record: dict, key: str) -> float | None:
    """The public model's ``key`` before any private step (``None`` where the record has no such reference)."""
    return (record.get("public_model") or {}).get(key)


def published(record: dict) -> bool:
    """Whether the record was measured under DPImageBench's protocol (so its published rows can stand beside it)."""
    return record.get("protocol") == "dpimagebench" and record["size"] in PUBLISHED


def published_table(record: dict) -> list[str]:
    """Our downstream accuracy (%) at epsilon = 1 and 10 beside DPImageBench's published rows."""
    rows, key = record["rows"], "test/downstream_acc"
    lines = ["**Beside the published table** (DPImageBench, CCS 2025; downstream accuracy %, δ = 1e-5):", "",
             "| method | ε = 1 | ε = 10 |", "|---|---|---|"]
    for method in DP_METHODS:
        cells = [_cell([r[key] for r in rows if r["method"] == method and r["epsilon"] == e and key in r], percent=True)
                 for e in (1.0, 10.0)]
        if any(c != "–" for c in cells):
            lines.append(f"| **dpldm: {LABELS[method]}** | " + " | ".join(cells) + " |")
    public = public_value(record, key)
    if public is not None:
        cell = _cell([public], percent=True)
        lines.append(f"| dpldm: {LABELS['public_model']} (ε = 0) | {cell} | {cell} |")
    lines += [f"| {method} (published) | {at1:.1f} | {at10:.1f} |" for method, (at1, at10) in PUBLISHED[record["size"]].items()]
    return lines + ["", "Protocol differences: DPImageBench's classifier is the mean of ResNet, WRN and ResNeXt trained "
                    "on 60,000 samples; ours is one small CNN (3 conv blocks) trained on the number of samples in the "
                    "settings below, at 28x28 (samples downsampled from 32x32; the real test images resized 28 -> 32 "
                    "-> 28). Their methods train on GPUs for far more steps; the public data differ (see above).", ""]


def section(record: dict, image: str) -> list[str]:
    rows = [r for r in record["rows"] if r.get("steps")]
    s = record["settings"]
    sigmas = {r["epsilon"]: r["noise_multiplier"] for r in rows}
    counts = {}
    for r in record["rows"]:
        counts[r["method"]] = counts.get(r["method"], 0) + 1
    where = f"on {record['machine']}" if record.get("machine") else "on a CPU it did not record"  # before 2026-12-07
    lines = [f"## {record['label']}", "", f"`{record['command']}` ({record['minutes']} min {where}; public build "
             f"{record.get('public_build') or 'not recorded'}; runs: "
             + ", ".join(f"{m} {n}" for m, n in counts.items()) + ").", "", f"![results]({image})", ""]
    for key, (name, better) in METRICS.items():
        lines += [f"**{name}** ({better}; mean ± sd over seeds):", "", *table(record, key), ""]
    if published(record):
        lines += published_table(record)
    if record.get("real_data_classifier"):  # DPImageBench trains the reference on every real training image
        real, recon, note = (("the 60,000 real training images", "10,000 reconstructions",
                              "DPImageBench's reference row; not private") if published(record) else
                             ("as many real private training images as it gets samples", "their reconstructions",
                              "not private; a reference only"))
        lines += [f"The same CNN trained on {real} scores {record['real_data_classifier']:.3f} ({note})."
                  + (f" Trained on {recon} by the frozen public autoencoder, it scores "
                     f"{record['autoencoder_classifier']:.3f}: about the most any model in that latent space could "
                     "give." if record.get("autoencoder_classifier") else ""), ""]
    if record["size"] == "fashion" and not published(record):
        lines += ["Published anchor (DPDM, TMLR 2023: diffusion in pixel space, trained from scratch with DP-SGD for "
                  "far more steps, δ = 1e-5): downstream accuracy " + ", ".join(
                      f"{a:.1%} at ε = {e:g}" for e, (a, _) in DPDM_FASHION.items()) + "; Inception FID "
                  + ", ".join(f"{f:g}" for _, (_, f) in DPDM_FASHION.items()) + " (not comparable with the "
                  "glyph-feature distance here). Their classifier protocol differs: ours trains on 1,000 samples, and "
                  "on 1,000 real images it scores the real-data reference above.", ""]
    if rows:
        r0 = rows[0]
        lines += ["Settings: " + ", ".join(x for x in [
            f"N = {round(r0['expected_batch_size'] / r0['sample_rate'])}",
            f"expected batch B = {s['batch_size']} (q = {r0['sample_rate']:.4g})", f"{int(r0['steps'])} DP-SGD steps",
            f"δ = {r0['delta']:.2g}", clip_clause(s),
            "σ = " + ", ".join(f"{sigmas[e]:.3f} (ε = {e:g})" for e in sorted(sigmas)),
            f"optimizer {s['optimizer']['class_path'].rsplit('.', 1)[1]} {s['optimizer'].get('init_args', {})}",
            f"recipe {s['recipe']}" if s.get("recipe") else None,
            f"overrides {' '.join(record['budget'])}" if record["budget"] else None] if x) + ".", ""]
        cpu = {}
        for r in record["rows"]:
            if r.get("cpu_minutes") is not None:
                cpu.setdefault(r["method"], []).append(r["cpu_minutes"])
        if cpu:
            lines += ["CPU minutes per run (all threads; training and evaluation): " + ", ".join(
                f"{m} {mean(v):.1f}" for m, v in cpu.items()) + ".", ""]
        fractions = {r["method"]: r["trained_fraction"] for r in record["rows"] if r.get("trained_fraction")}
        lines += ["Trained share of the parameters: " + ", ".join(
            f"{m} {f:.1%}" for m, f in fractions.items()) + ".", ""]
    return lines


def clip_clause(settings: dict) -> str:
    """``C = 1.0``, or with per-method norms (``settings.clip_norms``): ``C = 0.1 (lora 0.005, full 0.7)``."""
    per_method = settings.get("clip_norms") or {}
    others = f" ({', '.join(f'{m} {c:g}' for m, c in per_method.items())}; public median gradient norms)"
    return f"C = {settings['privacy'].get('max_grad_norm')}" + (others if per_method else "")


def _leaves(tree: dict) -> dict:
    """``{field: value}`` of a config tree's leaves, named by their last key (class paths left out)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value))
        elif key != "class_path":
            out[key] = value
    return out


def overlay_clause(name: str, public: dict) -> str:
    """``; for NAME, the same stages with the overlays of `configs/X/` laid over them (stage: field = value, ...)``:
    a size whose public stages are the quickstart's with overlays (``settings.public`` of its result file)."""
    stages = "; ".join(f"{stage}: " + ", ".join(f"{f} = {v}" for f, v in _leaves(tree).items())
                       for stage, tree in public.items() if stage != "config")
    return (f"; for {name}, the same stages with the overlays of `configs/{public['config']}/` laid over them "
            f"({stages}; see `GlyphsDataModule`)")


def render(results_dir: str, doc: str) -> dict:
    """Write ``doc`` and one plot per data size from ``results_dir/*.json``; returns the records."""
    records = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            record = upgrade(json.load(f))
        records[record["size"]] = record
    def names(protocol: str) -> str:  # the data sets whose result file was measured under this protocol
        return " and ".join(NAMES[k] for k in ORDER if k in records
                            and (records[k].get("protocol") or "quickstart") == protocol)

    overlays = {k: records[k]["settings"]["public"] for k in ORDER
                if "public" in records.get(k, {}).get("settings", {})}
    lines = ["# Results: attention-only DP fine-tuning against the alternatives", "",
             "Generated by `dpldm experiment --size mnist`, `--size fashion` and `--size digits` (re-render with "
             "`dpldm experiment --report-only`); do not edit by hand.", "",
             "Public pretraining for every pretrained method: the quickstart's autoencoder and class-conditional LDM, "
             "trained on rendered font glyphs (0-9, A-Z; `configs/quickstart/{autoencoder,ldm}.yaml`)"
             + "".join(overlay_clause(NAMES[k], p) for k, p in overlays.items())
             + ". The private data never reach them. Within a data set every run has the same recipe, step budget "
             "and metrics (its `configs/<size>/finetune.yaml`); only what is trained (and from where) differs, and "
             "where the settings give per-method C, each method's clipping norm (chosen on public glyphs). The FID-style distance uses the public glyph classifier's features (offline), not Inception.", "",
             f"- **{names('dpimagebench') or 'none yet'}: DPImageBench's protocol** (Chen et al., CCS 2025), fixed "
             "before any run: δ = 1e-5, 10,000 class-balanced samples scored at 28x28 by a CNN trained on them alone "
             "and tested on the 10,000 real test images; the same CNN on the 60,000 real training images is the "
             "reference row.",
             f"- **{names('quickstart') or 'none'}: the quickstart's protocol**: a CNN trained on 1,000 samples, "
             "tested on the real test split; δ = 1/(10N).", ""]
    for size in ORDER:
        if size in records:
            image = os.path.join(results_dir, f"{size}.png")  # beside its result file, linked relative to the doc
            plot(records[size], image)
            lines += section(records[size], os.path.relpath(image, os.path.dirname(os.path.abspath(doc))))
    discussion = os.path.join(results_dir, "discussion.md")  # hand-written reading of the numbers, if any
    if os.path.exists(discussion):
        with open(discussion) as f:
            lines += [f.read().strip(), ""]
    os.makedirs(os.path.dirname(doc) or ".", exist_ok=True)
    with open(doc, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {doc}")
    return records

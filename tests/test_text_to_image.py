"""The LAION workflow end to end on the tiny config: shards -> latent cache -> DP fine-tune -> samples."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpldm.cli import main
from dpldm.commands.cache import main as cache
from dpldm.datamodules.cache_writer import CacheMismatchError
from dpldm.runs import load_run
from tests.shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
CONFIG, ARCH = ROOT / "configs/laion/tiny.yaml", ROOT / "configs/laion/tiny-clip.json"


@pytest.fixture
def tiny_args(tmp_path):
    # 12 records in 2 shards: one corrupt image and one missing caption are skipped -> N = 10
    write_shards(tmp_path / "shards", num_shards=2, per_shard=6, corrupt=["000003"], no_caption=["000008"])
    return ["--config", str(CONFIG),
            "--data.init_args.source.init_args.train_shards", str(tmp_path / "shards/shard-{00000..00001}.tar"),
            "--data.init_args.source.init_args.max_bad_fraction", "0.2",
            "--data.init_args.cache_dir", str(tmp_path / "cache"),
            "--trainer.default_root_dir", str(tmp_path / "run"),
            "--model.init_args.conditioner.init_args.model_name", str(ARCH),
            "--trainer.callbacks=[{class_path: dpldm.callbacks.CLIPScore, init_args: {prompts: [a photo, a red square], "
            f"model_name: {ARCH}, pretrained: null, num_samples: 4, sampling: {{num_steps: 2}}}}}}]"]


def test_tiny_text_to_image_pipeline(tiny_args, tmp_path):
    meta = cache(tiny_args)
    assert meta["num_records"] == 10 and meta["views"] == 2
    assert meta["fields"]["moments"] == [10, 2, 8, 8, 8] and meta["fields"]["text_features"] == [10, 16, 24]
    assert "labels" not in meta["fields"]
    assert meta["source_report"] and "undecodable_image" in meta["source_report"]

    main(["fit", *tiny_args])  # the cache is up to date: fit reads it, Poisson over N = 10
    assert json.loads((tmp_path / "cache/meta.json").read_text())["encode_seconds"] == meta["encode_seconds"]
    report = json.loads(next((tmp_path / "run").rglob("privacy.json")).read_text())
    assert report["privacy/steps"] == 4 and report["privacy/sample_rate"] == pytest.approx(4 / 10)
    assert 0 < report["privacy/epsilon"] <= 10.0
    rows = (next((tmp_path / "run").rglob("metrics.csv"))).read_text()
    assert "prompts/clip_score" in rows.splitlines()[0]  # scored at the end of fit, logged next to privacy/*

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of item 1\n\na red square\n")
    main(["sample", str(tmp_path / "run"), "--prompts", str(prompts), "--repeat", "2", "--steps", "3",
          "--out", str(tmp_path / "samples")])
    out = tmp_path / "samples"
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:05d}.png" for i in range(4)]
    assert (out / "grid.png").stat().st_size > 0
    saved = np.load(out / "samples.npz")
    assert saved["images"].shape == (4, 32, 32, 3) and saved["images"].dtype == np.uint8
    assert list(saved["prompts"]) == ["a photo of item 1"] * 2 + ["a red square"] * 2

    # exported: the open_clip tower as a CLIPTextModel, loadable without dpldm or open_clip, the run's images
    main(["export", str(tmp_path / "run"), str(tmp_path / "exported")])
    want = load_run(str(tmp_path / "run")).sample(["a photo of item 1", "A red SQUARE!"], num_steps=2,
                                                  generator=torch.Generator().manual_seed(0))
    index = json.loads((tmp_path / "exported" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "DPLDMTextPipeline"] and index["text_encoder"][1] == "CLIPTextModel"
    assert "trust_remote_code=True" in (tmp_path / "exported" / "README.md").read_text()
    without = ("import sys, torch; sys.modules['dpldm'] = sys.modules['open_clip'] = None\n"  # imports now fail
               "from diffusers import DiffusionPipeline\n"
               f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'exported')!r}, trust_remote_code=True)\n"
               "x = pipe(['a photo of item 1', 'A red SQUARE!'], num_inference_steps=2, output_type='pt', "
               "generator=torch.Generator().manual_seed(0)).images\n"
               f"torch.save(x, {str(tmp_path / 'got.pt')!r})")
    done = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "got.pt"), want, atol=1e-5, rtol=0)


def test_the_cache_refuses_another_text_encoder(tiny_args, tmp_path):
    cache(tiny_args)
    other = tmp_path / "other-clip.json"
    other.write_text(ARCH.read_text().replace('"layers": 1}\n}', '"layers": 2}\n}'))
    with pytest.raises(CacheMismatchError, match="text_encoder"):
        cache([*tiny_args, "--model.init_args.conditioner.init_args.model_name", str(other)])


def test_a_dp_stage_on_a_stream_points_at_the_cache(tiny_args):
    from dpldm.commands.lightning_cli import DPLDMCLI
    from dpldm.errors import ConfigError

    cli = DPLDMCLI(args=tiny_args, run=False)
    with pytest.raises(ConfigError, match="latent cache"):  # no known N: Poisson sampling is impossible
        cli.trainer.fit(cli.model, cli.datamodule.source)

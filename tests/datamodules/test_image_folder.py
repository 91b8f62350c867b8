"""Your own images (dpldm/datamodules/image_folder.py): both layouts, bad records, and a DP fine-tune on each
through the latent cache, on folders the tests write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpldm.cli import main
from dpldm.datamodules import ImageFolderDataModule
from dpldm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TEXT, ARCH = ROOT / "configs/laion/tiny.yaml", ROOT / "configs/laion/tiny-clip.json"


def _image(path: Path, seed: int, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def class_folder(tmp_path):
    for i in range(9):
        _image(tmp_path / "train" / ("cat", "dog", "eel")[i % 3] / f"{i}.png", i)
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored: not an image")
    return tmp_path / "train"


@pytest.fixture
def caption_folder(tmp_path):
    rows = []
    for i in range(10):
        _image(tmp_path / "imgs" / f"{i}.jpg", i)
        rows.append({"file": f"{i}.jpg", "caption": f"a photo of item {i}" if i != 4 else ""})
    rows.append({"file": "missing.jpg", "caption": "gone"})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_class_subfolders_are_sorted_classes_and_bad_files_are_skipped(class_folder, capsys):
    dm = ImageFolderDataModule(str(class_folder), image_size=16, max_bad_fraction=0.2)
    assert dm.classes == ["cat", "dog", "eel"] and dm.num_classes == 3
    assert dm.num_train_samples == 9  # the undecodable file skipped, the .txt never a record
    assert "1 undecodable_image" in capsys.readouterr().out
    item = dm.train_dataset[1]
    assert item["image"].shape == (3, 16, 16) and item["label"] == 0  # cat/3.png: records in class order
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    grey = ImageFolderDataModule(str(class_folder), image_size=16, channels=1, max_bad_fraction=0.2)
    assert grey.cache_dataset()[0]["image"].shape == (1, 16, 16)


def test_captions_file_and_its_bad_records(caption_folder, capsys):
    dm = ImageFolderDataModule(str(caption_folder / "imgs"), captions=str(caption_folder / "captions.jsonl"),
                               image_size=16, max_bad_fraction=0.2)
    assert dm.num_classes is None and dm.num_train_samples == 9  # 11 listed: no caption, no file
    assert "1 missing_image, 1 missing_caption" in capsys.readouterr().out
    item = dm.train_dataset[0]
    assert item["caption"] == "a photo of item 0" and item["key"] == "0" and item["image"].shape == (3, 16, 16)
    csv = caption_folder / "captions.csv"
    csv.write_text("file,caption\n0.jpg,first\n1.jpg,second\n")
    assert ImageFolderDataModule(str(caption_folder / "imgs"), captions=str(csv)).num_train_samples == 2


@pytest.mark.parametrize("kwargs, field", [
    ({"root": "/no/such/folder"}, "data.init_args.root"),
    ({"channels": 2}, "data.init_args.channels"),
    ({"max_bad_fraction": 0.05}, "max_bad_fraction.*10.00% of the 10 records"),  # raised when the split is built
])
def test_bad_settings_name_the_field(class_folder, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ImageFolderDataModule(**{"root": str(class_folder), "image_size": 16, **kwargs}).setup("fit")


def test_dp_fine_tunes_on_a_class_folder(class_folder, tmp_path):
    """The tiny text config's models with a class embedder, Poisson over the folder's N = 9."""
    main(["fit", "--config", str(TEXT), f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=2",
          "--trainer.callbacks=[]", "--model.init_args.conditioner=dpldm.modules.ClassEmbedder",
          "--model.init_args.conditioner.init_args.num_classes=3", "--model.init_args.conditioner.init_args.embed_dim=16",
          "--data.init_args.source=dpldm.datamodules.ImageFolderDataModule",
          f"--data.init_args.source.init_args.root={class_folder}", "--data.init_args.source.init_args.image_size=32",
          "--data.init_args.source.init_args.max_bad_fraction=0.2", f"--data.init_args.cache_dir={tmp_path / 'cache'}"])
    report = json.loads(next((tmp_path / "run").rglob("privacy.json")).read_text())
    assert report["privacy/steps"] == 2 and report["privacy/sample_rate"] == pytest.approx(4 / 9)


def test_dp_fine_tunes_on_images_with_captions(caption_folder, tmp_path):
    """The tiny text-to-image config on a captions file instead of shards: N = 9 records, 2 flip views."""
    main(["fit", "--config", str(TEXT), f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=2",
          "--trainer.callbacks=[]", f"--model.init_args.conditioner.init_args.model_name={ARCH}",
          "--data.init_args.source=dpldm.datamodules.ImageFolderDataModule",
          f"--data.init_args.source.init_args.root={caption_folder / 'imgs'}",
          f"--data.init_args.source.init_args.captions={caption_folder / 'captions.jsonl'}",
          "--data.init_args.source.init_args.image_size=32", "--data.init_args.source.init_args.max_bad_fraction=0.2",
          f"--data.init_args.cache_dir={tmp_path / 'cache'}"])
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["num_records"] == 9 and meta["fields"]["text_features"][0] == 9
    report = json.loads(next((tmp_path / "run").rglob("privacy.json")).read_text())
    assert report["privacy/sample_rate"] == pytest.approx(4 / 9)

"""LaionDataModule / WebImageTextDataset: crop and scaling, skip and loss counting across workers,
order and shuffle, shard expansion, node splitting and the cache pass."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dpldm.datamodules import LaionDataModule, WebImageTextDataset
from dpldm.datamodules import laion
from dpldm.datamodules.laion import SkipStats, expand_urls
from dpldm.errors import ConfigError
from tests.shards import caption, encode, truncate, write_shards

ALL_KEYS = [f"{i:06d}" for i in range(12)]  # write_shards' default: 2 shards x 6


def keys(dataset) -> list[str]:
    return [item["key"] for item in dataset]


def write_tar(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_items_are_scaled_center_crops_with_captions(tmp_path):
    # Wide 20x40 image: black 6-column bands left and right, white middle; tall 40x20 likewise
    # with bands top and bottom. The shorter side becomes 10, and only the centre 10x10 (source
    # columns/rows 10..30) is kept: all white. A left/top-aligned crop or a squash would show black.
    wide = np.full((20, 40, 3), 255, np.uint8)
    wide[:, :6] = wide[:, -6:] = 0
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
    solid = np.broadcast_to(np.array([51, 102, 204], np.uint8), (24, 30, 3)).copy()
    shard = write_tar(tmp_path / "pattern.tar", {
        "wide.png": encode(wide, "png"), "wide.txt": b"  a wide one \n",
        "tall.png": encode(tall, "png"), "tall.txt": b"tall",
        "solid.png": encode(solid, "png"), "solid.txt": b"solid",
    })
    items = list(WebImageTextDataset([shard], image_size=10))
    assert [(i["key"], i["caption"]) for i in items] == [("wide", "a wide one"), ("tall", "tall"), ("solid", "solid")]
    for item in items:
        assert item["image"].shape == (3, 10, 10) and item["image"].dtype == torch.float32
    for item in items[:2]:
        assert torch.allclose(item["image"], torch.ones(3, 10, 10), atol=0.02)
    # Fixed affine x / 127.5 - 1 per channel, whatever the image statistics.
    expected = torch.tensor([51, 102, 204]) / 127.5 - 1
    assert torch.allclose(items[2]["image"], expected[:, None, None].expand(3, 10, 10), atol=1e-6)
    # Random images (jpg and png, 40x48): range [-1, 1] from the fixed affine map, captions kept.
    items = list(WebImageTextDataset(write_shards(tmp_path / "s"), image_size=16))
    assert [i["caption"] for i in items] == [caption(k) for k in range(12)]
    images = torch.stack([i["image"] for i in items])
    assert images.shape == (12, 3, 16, 16) and images.min() >= -1 and images.max() <= 1


def test_bad_records_and_shards_are_skipped_and_counted(tmp_path):
    shards = write_shards(tmp_path, corrupt=["000003"], no_caption=["000007"], empty_shard=True)
    # cut inside the image of the second record: the first one was never yielded either (a sample is
    # complete only once the next key starts), so the whole shard is lost
    truncated = truncate(shards[0], tmp_path / "truncated.tar", member=3)
    no_image = write_tar(tmp_path / "no_image.tar", {"x.txt": b"caption only", "x.json": b"{}"})
    ds = WebImageTextDataset(shards + [truncated, str(tmp_path / "missing.tar"), no_image],
                             image_size=8, max_bad_fraction=0.7)
    assert keys(ds) == [k for k in ALL_KEYS if k not in ("000003", "000007")]
    assert ds.stats.counts == {"missing_image": 1, "undecodable_image": 1, "missing_caption": 1,
                               "empty_shard": 1, "unreadable_shard": 2, "short_shard": 0}
    # 6 records lost per unreadable shard: the median size of the shards read whole (6, 6 and 1;
    # the empty one holds none), minus the 0 samples each yielded
    assert (ds.stats.good, ds.stats.seen, ds.stats.lost, ds.stats.expected) == (10, 13, 12, 25)
    assert ds.stats.bad_fraction == pytest.approx((3 + 12) / 25)
    summary = ds.stats.summary()
    assert "10 of 25 records used" in summary and "1 undecodable_image" in summary
    assert "lost: 12 in 2 unreadable shards (12 estimated from the median shard size)" in summary
    assert "1 empty shard" in summary
    ds.stats.reset()
    assert ds.stats.seen == ds.stats.lost == 0 and sum(ds.stats.counts.values()) == 0


def garbage(path) -> str:
    path.write_bytes(b"<html>403 Forbidden</html>" * 40)  # e.g. an error page saved as a shard
    return str(path)


def test_records_of_an_unreadable_shard_count_against_the_bound(tmp_path):
    shards = write_shards(tmp_path, num_shards=3, per_shard=4)
    garbage(Path(shards[0]))  # first, so its size is estimated from shards read after it
    with pytest.raises(ConfigError) as info:  # 4 of 12 expected records lost = 33.33% > 20%
        list(WebImageTextDataset(shards, image_size=8, max_bad_fraction=0.2))
    message = str(info.value)
    assert info.value.field == "data.init_args.max_bad_fraction" and "33.33%" in message
    assert "8 of 12 records used; skipped: none; lost: 4 in 1 unreadable shard" in message
    ds = WebImageTextDataset(shards, image_size=8, max_bad_fraction=0.4)
    assert keys(ds) == ALL_KEYS[4:] and ds.stats.bad_fraction == pytest.approx(1 / 3)


def test_img2dataset_stats_json_gives_the_exact_loss_and_reveals_a_short_shard(tmp_path):
    shards = write_shards(tmp_path, stats_json=True)  # shard-0000N.tar + shard-0000N_stats.json: 6 successes each
    # inside record 3: records 0-1 yielded, then an error (record 2 was still waiting for the next key)
    truncate(shards[0], Path(shards[0]), member=9)
    truncate(shards[1], Path(shards[1]), member=12, inside=False)  # before record 10: ends early, no error
    ds = WebImageTextDataset(shards, image_size=8, max_bad_fraction=0.5)
    assert keys(ds) == ALL_KEYS[:2] + ALL_KEYS[6:10]
    assert (ds.stats.good, ds.stats.lost, ds.stats.expected) == (6, 6, 12)
    assert ds.stats.counts["unreadable_shard"] == 1 and ds.stats.counts["short_shard"] == 1
    summary = ds.stats.summary()
    assert "6 of 12 records used" in summary and "lost: 6 in 1 unreadable and 1 short shards;" in summary
    assert "estimated" not in summary
    # Without the sidecars the short shard looks whole, and its 4 records are the median size.
    for shard in shards:
        Path(shard[:-len(".tar")] + "_stats.json").unlink()
    ds = WebImageTextDataset(shards, image_size=8, max_bad_fraction=0.5)
    assert keys(ds) == ALL_KEYS[:2] + ALL_KEYS[6:10] and (ds.stats.lost, ds.stats.expected) == (2, 8)
    assert "lost: 2 in 1 unreadable shard (2 estimated from the median shard size)" in ds.stats.summary()


def test_loss_estimate_rules():
    stats = SkipStats(num_shards=4)
    stats.shard_read(0, 5, failed=True)  # 5 yielded, then an error
    assert stats.lost == 1  # no shard size known yet: at least one record was lost
    stats.shard_read(1, 4, failed=False)
    stats.shard_read(2, 4, failed=False)
    assert stats.lost == 1  # the median size 4 is below the 5 read: still at least one
    stats.shard_read(3, 0, failed=True)
    assert stats.lost == 1 + 4 and stats.counts["unreadable_shard"] == 2
    stats.shard_read(3, 2, failed=True)  # another pass fails on shard 3 again: 4 - 2 more
    stats.shard_read(1, 3, failed=True, expected=4)  # with a sidecar: exactly 4 - 3
    assert stats.lost == 1 + 4 + 2 + 1
    stats.shard_read(2, 4, failed=False, expected=4)  # whole, as its sidecar says: nothing lost
    assert stats.lost == 8 and stats.counts["short_shard"] == 0
    stats.shard_read(2, 3, failed=False, expected=4)  # ends early without an error: short by one
    assert stats.lost == 9 and stats.counts["short_shard"] == 1
    stats.reset()
    assert stats.lost == 0 and stats.summary().startswith("0 of 0 records used; skipped: none; lost: none")
    stats.shard_read(0, 0, failed=True)
    assert stats.lost == 1


def test_errors_name_the_key_under_a_latent_cache(tmp_path):
    from dpldm.datamodules import LatentCacheDataModule

    write_shards(tmp_path, corrupt=["000000", "000001"])  # 2 of 12 bad: more than 10%
    alone = LaionDataModule(train_shards=f"{tmp_path}/*.tar", image_size=8, max_bad_fraction=0.1)
    with pytest.raises(ConfigError) as info:
        list(alone.cache_dataset())
    assert info.value.field == "data.init_args.max_bad_fraction"
    source = LaionDataModule(train_shards=f"{tmp_path}/*.tar", image_size=8, max_bad_fraction=0.1)
    LatentCacheDataModule(source=source, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as info:
        list(source.cache_dataset())
    assert info.value.field == "data.init_args.source.init_args.max_bad_fraction"
    assert str(info.value).startswith("data.init_args.source.init_args.max_bad_fraction = 0.1: exceeded")
    source.train_shards = f"{tmp_path}/none-*.tar"
    with pytest.raises(ConfigError) as info:
        source.cache_dataset()
    assert info.value.field == "data.init_args.source.init_args.train_shards"


def test_check_names_the_bound_and_fails_on_no_good_record(tmp_path):
    shards = write_shards(tmp_path, corrupt=["000000"], no_caption=["000001"])
    with pytest.raises(ConfigError) as info:  # 2 of 12 bad = 16.67% > 10%
        list(WebImageTextDataset(shards, image_size=8, max_bad_fraction=0.1))
    message = str(info.value)
    assert "data.init_args.max_bad_fraction" in message and "16.67%" in message
    assert "1 undecodable_image" in message and "1 missing_caption" in message
    assert len(list(WebImageTextDataset(shards, image_size=8, max_bad_fraction=0.2))) == 10
    # Only empty/unreadable shards: no record is bad, but none is good either.
    empty = write_shards(tmp_path / "e", num_shards=0, empty_shard=True)
    with pytest.raises(ValueError, match="no usable image-caption record") as info:
        list(WebImageTextDataset(empty + [str(tmp_path / "gone.tar")], image_size=8))
    assert "gone.tar" in str(info.value)
    stats = SkipStats()
    stats.add("good", 99)
    stats.add("missing_caption")
    stats.check(0.01)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        stats.check(0.0)


def test_fails_mid_stream_once_enough_records_were_bad(tmp_path, monkeypatch):
    # 3 of 12 bad (25%) passes a 0.5 bound at the end, but the first 3 records are all bad.
    shards = write_shards(tmp_path, corrupt=["000000", "000001", "000002"])
    assert len(list(WebImageTextDataset(shards, image_size=8, max_bad_fraction=0.5))) == 9
    monkeypatch.setattr(laion, "EARLY_CHECK_RECORDS", 3)
    stream = iter(WebImageTextDataset(shards, image_size=8, max_bad_fraction=0.5))
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        next(stream)


@pytest.mark.parametrize("shuffle_buffer", [0, 3])
def test_two_workers_see_each_good_record_once_and_share_counts(tmp_path, shuffle_buffer):
    s0, s1, s2, empty = write_shards(tmp_path, num_shards=3, per_shard=4, corrupt=["000002"],
                                     no_caption=["000009"], empty_shard=True)
    # Unshuffled, worker 1 gets only the empty and the missing shard: its stream ends first
    # with no good record, which must not fail while worker 0 is still reading.
    urls = [s0, empty, s1, str(tmp_path / "missing.tar"), s2]
    ds = WebImageTextDataset(urls, image_size=8, shuffle_buffer=shuffle_buffer, max_bad_fraction=0.5)
    loader = DataLoader(ds, batch_size=3, num_workers=2)
    seen = [k for batch in loader for k in batch["key"]]
    assert sorted(seen) == [f"{i:06d}" for i in range(12) if i not in (2, 9)]
    # Counted in the worker processes, read in the main one.
    assert ds.stats.counts == {"missing_image": 0, "undecodable_image": 1, "missing_caption": 1,
                               "empty_shard": 1, "unreadable_shard": 1, "short_shard": 0}
    assert ds.stats.good == 10 and ds.stats.seen == 12
    # the missing shard was read in a worker, the whole ones in either: its 4 lost records still come
    # from the median size
    assert ds.stats.lost == 4 and "10 of 16 records used" in ds.stats.summary()


def test_order_is_fixed_without_shuffle_and_seeded_with_it(tmp_path):
    shards = write_shards(tmp_path)
    ordered = WebImageTextDataset(shards, image_size=8)
    assert keys(ordered) == keys(ordered) == ALL_KEYS
    shuffled = WebImageTextDataset(shards, image_size=8, shuffle_buffer=5, seed=1)
    first, second = keys(shuffled), keys(shuffled)
    assert sorted(first) == sorted(second) == ALL_KEYS
    assert first != ALL_KEYS and second != first  # a new order each epoch
    again = WebImageTextDataset(shards, image_size=8, shuffle_buffer=5, seed=1)
    assert keys(again) == first  # reproducible from seed + epoch
    again.set_epoch(1)
    assert keys(again) == second


def test_expand_urls(tmp_path):
    shards = write_shards(tmp_path, num_shards=3, per_shard=1)
    assert expand_urls(f"{tmp_path}/shard-{{00000..00002}}.tar") == shards
    assert expand_urls(f"{tmp_path}/*.tar") == shards
    assert expand_urls(f"{shards[2]}::{shards[0]}") == [shards[2], shards[0]]
    assert expand_urls([shards[1], f"{tmp_path}/shard-0000[02].tar"]) == [shards[1], shards[0], shards[2]]
    assert expand_urls("s3://bucket/{0..1}.tar") == ["s3://bucket/0.tar", "s3://bucket/1.tar"]
    assert expand_urls("pipe:curl -s https://host/a.tar") == ["pipe:curl -s https://host/a.tar"]
    with pytest.raises(ConfigError, match=r"data.init_args.val_shards .*nothing-\*\.tar.* matches no file"):
        expand_urls(f"{tmp_path}/nothing-*.tar", "data.init_args.val_shards")
    with pytest.raises(ConfigError, match="shard-00003.tar"):  # one of the braces is missing
        expand_urls(f"{tmp_path}/shard-{{00000..00003}}.tar")


def test_reads_pipe_and_fsspec_urls(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    shards = write_shards(tmp_path, per_shard=2)
    with fsspec.open("memory://laion-test/shard-1.tar", "wb") as f:
        f.write(Path(shards[1]).read_bytes())
    ds = WebImageTextDataset([f"pipe:cat {shards[0]}", "memory://laion-test/shard-1.tar"], image_size=8)
    assert keys(ds) == ALL_KEYS[:4]


def test_cache_dataset_ignores_node_splitting(tmp_path, monkeypatch):
    shards = write_shards(tmp_path, num_shards=4, per_shard=2)
    dm = LaionDataModule(train_shards=f"{tmp_path}/*.tar", image_size=8, shuffle_buffer=0)
    monkeypatch.setenv("RANK", "1")  # webdataset reads the rank from these
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm.setup("fit")
    assert keys(dm.train_dataset) == ["000002", "000003", "000006", "000007"]  # shards 1 and 3
    cache = dm.cache_dataset()
    assert cache.shuffle_buffer == 0 and not cache.split_by_node
    assert keys(cache) == [f"{i:06d}" for i in range(8)]


def test_datamodule_from_yaml_without_files_then_loaders(tmp_path):
    jsonargparse = pytest.importorskip("jsonargparse")
    import lightning.pytorch as pl

    parser = jsonargparse.ArgumentParser()
    parser.add_subclass_arguments(pl.LightningDataModule, "data")
    cfg = parser.parse_string(f"""
data:
  class_path: dpldm.datamodules.LaionDataModule
  init_args:
    train_shards: {tmp_path}/shard-{{00000..00001}}.tar
    val_shards: {tmp_path}/shard-00001.tar
    image_size: 16
    batch_size: 4
    shuffle_buffer: 4
""")
    dm = parser.instantiate(cfg).data  # the shards do not exist yet
    assert isinstance(dm, LaionDataModule) and (dm.channels, dm.image_size) == (3, 16)
    assert not hasattr(dm, "num_train_samples")
    with pytest.raises(ConfigError, match="data.init_args.train_shards"):
        dm.setup("fit")
    write_shards(tmp_path)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert isinstance(batch["caption"], list) and all(isinstance(c, str) for c in batch["caption"])
    assert len(batch["key"]) == 4
    assert [k for b in dm.val_dataloader() for k in b["key"]] == ALL_KEYS[6:]
    assert LaionDataModule(train_shards="x.tar").val_dataloader() == []


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("num_workers", -1), ("image_size", 4),
                                          ("max_bad_fraction", 1.0), ("max_bad_fraction", -0.1),
                                          ("shuffle_buffer", -1)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"data.init_args.{field}"):
        LaionDataModule(train_shards="x.tar", **{field: value})

"""``dpldm cache --config FIT.yaml [overrides]``: build (or resume, or check) the latent cache of a fit config."""

from __future__ import annotations

from dpldm.commands.lightning_cli import DPLDMCLI


USAGE = """usage: dpldm cache --config FIT.yaml [--KEY=VALUE ...]

Build (or resume, or check) the latent cache that a fit config trains on (its data: a LatentCacheDataModule),
with that config's frozen autoencoder and text encoder: the private images are encoded once, and every DP
step reads N records of known size. Overrides are `dpldm fit`'s (`dpldm fit --help` lists them)."""


def main(argv: list[str]) -> dict | None:
    """``dpldm cache --config FIT.yaml [overrides]``: build (or resume, or check) the latent cache that
    a fit config trains on, with that config's frozen autoencoder and text encoder."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    from dpldm.datamodules import LatentCacheDataModule
    from dpldm.errors import ConfigError

    cli = DPLDMCLI(args=argv, run=False)
    dm = cli.datamodule
    if not isinstance(dm, LatentCacheDataModule):
        raise ConfigError("data.class_path", type(dm).__name__, "must be dpldm.datamodules.LatentCacheDataModule")
    cli.model.preflight(dm)  # shapes before hours of encoding
    meta = dm.build(cli.model)
    print(f"latent cache {dm.cache_dir}: {meta['num_records']:,} records x {meta['views']} view(s); "
          + ", ".join(f"{k} {tuple(v)}" for k, v in meta["fields"].items()))
    if meta.get("source_report"):
        print(f"source: {meta['source_report']}")
    return meta

"""Lightning callbacks: exporting stages, sample grids."""

from dpldm.callbacks.export import ExportPretrained
from dpldm.callbacks.samples import SampleGrid

__all__ = ["ExportPretrained", "SampleGrid"]

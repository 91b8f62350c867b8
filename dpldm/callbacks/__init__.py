"""Lightning callbacks: exporting stages, sample grids."""

from dpldm.callbacks.export import ExportPretrained
from dpldm.callbacks.privacy import PrivacyMonitor
from dpldm.callbacks.samples import SampleGrid

__all__ = ["ExportPretrained", "PrivacyMonitor", "SampleGrid"]

"""Lightning callbacks: resumable checkpoints, exporting stages, sample grids, privacy monitoring, sample-based metrics."""

from dpldm.callbacks.checkpoint import ResumableCheckpoint
from dpldm.callbacks.evaluation import FID, CLIPScore, DownstreamAccuracy, SampleMetric, SampleSettings
from dpldm.callbacks.export import ExportPretrained
from dpldm.callbacks.privacy import PrivacyMonitor
from dpldm.callbacks.samples import SampleGrid, SampleWriter

__all__ = ["CLIPScore", "DownstreamAccuracy", "ExportPretrained", "FID", "PrivacyMonitor", "ResumableCheckpoint",
           "SampleGrid", "SampleMetric", "SampleSettings", "SampleWriter"]

"""Lightning callbacks: resumable checkpoints, progress lines, exporting stages, sample grids, privacy monitoring,
sample-based metrics."""

from dpldm.callbacks.checkpoint import ResumableCheckpoint
from dpldm.callbacks.evaluation import FID, CLIPScore, DownstreamAccuracy, SampleMetric, SampleSettings
from dpldm.callbacks.export import ExportPretrained
from dpldm.callbacks.privacy import PrivacyMonitor
from dpldm.callbacks.progress import LineProgress
from dpldm.callbacks.samples import SampleGrid, SampleWriter

__all__ = ["CLIPScore", "DownstreamAccuracy", "ExportPretrained", "FID", "LineProgress", "PrivacyMonitor",
           "ResumableCheckpoint", "SampleGrid", "SampleMetric", "SampleSettings", "SampleWriter"]

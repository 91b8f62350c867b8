"""Differential privacy for fine-tuning: trainable scope, DP-SGD engine, Poisson sampling, accounting."""

from dpldm.privacy.accounting import PrivacyAccountant, calibrate_noise, epsilon_for, max_steps_within
from dpldm.privacy.engine import DPSGDEngine
from dpldm.privacy.scope import TrainableScope
from dpldm.privacy.settings import DifferentialPrivacy, PriorRelease

__all__ = ["DPSGDEngine", "DifferentialPrivacy", "PriorRelease", "PrivacyAccountant", "TrainableScope",
           "calibrate_noise", "epsilon_for", "max_steps_within"]

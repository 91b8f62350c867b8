"""dpldm."""

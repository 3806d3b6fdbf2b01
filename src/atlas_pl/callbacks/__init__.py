"""Lightning callbacks of atlas-pl (usable in other Lightning projects)."""

from atlas_pl.callbacks.progress import FederatedProgress
from atlas_pl.callbacks.results import FederatedResults
from atlas_pl.callbacks.round_checkpoint import RoundCheckpoint

__all__ = ["FederatedProgress", "FederatedResults", "RoundCheckpoint"]

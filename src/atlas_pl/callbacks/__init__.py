"""Lightning callbacks of atlas-pl (usable in other Lightning projects)."""

from atlas_pl.callbacks.progress import FederatedProgress
from atlas_pl.callbacks.results import FederatedResults

__all__ = ["FederatedProgress", "FederatedResults"]

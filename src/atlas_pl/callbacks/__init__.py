"""Lightning callbacks of atlas-pl: the ATLAS phases, round checkpoints, results and progress.

``TaskClustering`` (phase 1), ``RankAllocation`` (phase 2) and ``ClusterAggregation`` (phase 4) drive a federation;
``GraphAggregation`` is the MIRA baseline (personalized adapters mixed over a task-similarity graph);
``RoundCheckpoint`` writes a resumable ``last.ckpt`` after every round in any Lightning project; ``FaultInjection``
makes chosen clients fail, to test a federation's fault tolerance.
"""

from atlas_pl.callbacks.cluster_aggregation import ClusterAggregation
from atlas_pl.callbacks.fault_injection import FaultInjection
from atlas_pl.callbacks.graph_aggregation import GraphAggregation
from atlas_pl.callbacks.progress import FederatedProgress
from atlas_pl.callbacks.rank_allocation import RankAllocation
from atlas_pl.callbacks.results import FederatedResults
from atlas_pl.callbacks.round_checkpoint import RoundCheckpoint
from atlas_pl.callbacks.task_clustering import TaskClustering

__all__ = [
    "ClusterAggregation",
    "FaultInjection",
    "FederatedProgress",
    "FederatedResults",
    "GraphAggregation",
    "RankAllocation",
    "RoundCheckpoint",
    "TaskClustering",
]

"""The pure core of ATLAS (torch / numpy / scikit-learn only, never Lightning): one module per phase."""

from atlas_pl.algorithms.aggregation import (
    METHODS,
    AggregationMethod,
    AggregationReport,
    DenseSVD,
    Exact,
    FedAvg,
    FLoRA,
    ZeroPad,
    aggregate_lora,
    aggregation_method,
    merge_lora_states,
)
from atlas_pl.algorithms.clustering import (
    ClusterResult,
    chance_silhouette,
    cluster_clients,
    clustering_scores,
    embed_2d,
)
from atlas_pl.algorithms.fingerprint import fingerprint_bytes, lora_gradients, project_gradients
from atlas_pl.algorithms.importance import cluster_importance, module_importance, normalize_importance
from atlas_pl.algorithms.merge import FactoredUpdate, dense_svd_merge, fedavg, merge_lora, normalize_weights
from atlas_pl.algorithms.privacy import (
    DPSGD,
    clip_to_norm,
    dp_epsilon,
    keep_probability,
    privatize,
    randomized_response,
)
from atlas_pl.algorithms.rank_allocation import Allocation, RankAllocator, rank_pattern, scale_ranks

__all__ = [
    "AggregationMethod",
    "AggregationReport",
    "Allocation",
    "ClusterResult",
    "DPSGD",
    "DenseSVD",
    "Exact",
    "FLoRA",
    "FactoredUpdate",
    "FedAvg",
    "METHODS",
    "RankAllocator",
    "ZeroPad",
    "aggregate_lora",
    "aggregation_method",
    "chance_silhouette",
    "clip_to_norm",
    "cluster_clients",
    "cluster_importance",
    "clustering_scores",
    "dense_svd_merge",
    "dp_epsilon",
    "embed_2d",
    "fedavg",
    "fingerprint_bytes",
    "keep_probability",
    "lora_gradients",
    "merge_lora",
    "merge_lora_states",
    "module_importance",
    "normalize_importance",
    "normalize_weights",
    "privatize",
    "project_gradients",
    "randomized_response",
    "rank_pattern",
    "scale_ranks",
]

"""parallel/tensor: tensor parallelism and ZeRO-1 optimizer sharding inside one host.

Megatron-style column/row-parallel layers applied to the dense reference model from outside
(``parallelize_tp``), a sharded AdamW (``ZeroAdamW``), a launcher for the local ranks
(``launch_tp_group``, ``start_tp_group``) and a stage runner driven by rank 0
(``TPStageRunner``, ``TPStageHost``). See README.md in this folder.
"""

from shoal.parallel.tensor.comm import TPComm, copy_to_tp, reduce_from_tp
from shoal.parallel.tensor.config import LaunchConfig
from shoal.parallel.tensor.launch import (
    RankContext,
    TPGroup,
    TPGroupError,
    launch_tp_group,
    start_tp_group,
)
from shoal.parallel.tensor.layers import (
    TPMLP,
    ColumnParallelLinear,
    RowParallelLinear,
    TPAttention,
    tp_shard_dim,
)
from shoal.parallel.tensor.parallelize import (
    clip_grad_norm_tp,
    gather_dense_grads,
    gather_dense_state,
    parallelize_tp,
)
from shoal.parallel.tensor.runner import TPStageRunner
from shoal.parallel.tensor.serve import StageSpec, TPStageHost, build_tp_stage, follow_stage
from shoal.parallel.tensor.zero import ZeroAdamW

__all__ = [
    "TPMLP",
    "ColumnParallelLinear",
    "LaunchConfig",
    "RankContext",
    "RowParallelLinear",
    "StageSpec",
    "TPAttention",
    "TPComm",
    "TPGroup",
    "TPGroupError",
    "TPStageHost",
    "TPStageRunner",
    "ZeroAdamW",
    "build_tp_stage",
    "clip_grad_norm_tp",
    "copy_to_tp",
    "follow_stage",
    "gather_dense_grads",
    "gather_dense_state",
    "launch_tp_group",
    "parallelize_tp",
    "reduce_from_tp",
    "start_tp_group",
    "tp_shard_dim",
]

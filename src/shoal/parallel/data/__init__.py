"""Data-parallel averaging: partition, aggregation, matchmaking, butterfly all-reduce."""

from shoal.parallel.data.allreduce import AllReduceConfig, RoundResult, RoundStatus
from shoal.parallel.data.averager import Averager, GroupSpec

__all__ = ["AllReduceConfig", "Averager", "GroupSpec", "RoundResult", "RoundStatus"]

"""The embedded data set and the byte-window batch streams (see corpus.py, windows.py)."""

from shoal.models.data.corpus import Corpus, is_validation, load_corpus, stdlib_dir
from shoal.models.data.windows import TrainWindows, shard_bounds, val_batches

__all__ = [
    "Corpus",
    "TrainWindows",
    "is_validation",
    "load_corpus",
    "shard_bounds",
    "stdlib_dir",
    "val_batches",
]

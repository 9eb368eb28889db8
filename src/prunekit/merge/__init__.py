"""Delta pruning and model merging: DARE, DAREx-q, TIES, dare_ties, task arithmetic, linear.

`merge(config, out)` streams safetensors checkpoints tensor by tensor; `merge_state_dicts` does the same in memory;
`ops` holds the per-tensor rules, `darex_q` tunes DARE's rescale on one unlabelled batch.
"""

from .cli import register
from .config import METHODS, MergeConfig, ModelEntry, config_from_dict, load_config
from .darex import DarexResult, darex_q
from .engine import MergeResult, merge, merge_state_dicts, merge_tensor
from .ops import dare, magnitude_trim

__all__ = [
    "METHODS", "MergeConfig", "ModelEntry", "config_from_dict", "load_config", "DarexResult", "darex_q",
    "MergeResult", "merge", "merge_state_dicts", "merge_tensor", "dare", "magnitude_trim", "register",
]

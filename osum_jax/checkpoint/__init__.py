"""The one on-disk checkpoint layout (:mod:`.layout`), its streaming writer (:mod:`.store`), a training run's
checkpointer (:mod:`.run`) and flat access to a model's variables (:mod:`.tree`).

``osum_jax.train`` and ``osum_jax.convert`` both use this package and never import each other.
"""

from .layout import (CONVERTER_ITEMS, MODEL_ITEMS, WEIGHTS, CheckpointError, LazyLeaf, abstract_model,
                     check_leaves, find_layout, flatten, is_run_step, item_store_format, lazy_leaves, leaf_metadata,
                     load_model, model_shapes, open_leaf, read_config, read_layout, read_prompts, resolve,
                     restore_extras, restore_params, steps, weights_item)
from .run import RUN_ITEMS, RunCheckpointer, data_state_file
from .store import LAYOUT_FORMAT, StreamedArray, atomic_output, nest, write_checkpoint
from .tree import CheckpointMismatch, flat_variables, load_flat, path_str

__all__ = [
    "CONVERTER_ITEMS", "LAYOUT_FORMAT", "MODEL_ITEMS", "RUN_ITEMS", "WEIGHTS", "CheckpointError",
    "CheckpointMismatch", "LazyLeaf", "RunCheckpointer", "StreamedArray", "abstract_model", "atomic_output",
    "check_leaves", "data_state_file", "find_layout", "flatten", "flat_variables", "is_run_step",
    "item_store_format", "lazy_leaves", "leaf_metadata", "load_flat", "load_model", "model_shapes", "nest",
    "open_leaf", "path_str", "read_config", "read_layout", "read_prompts", "resolve", "restore_extras", "restore_params", "steps",
    "weights_item", "write_checkpoint",
]

"""transformers glue: find the decoder blocks, their linear layers and the model's length limit.

transformers is imported inside functions, so `import prunekit` works without it.
Nothing here hard-codes an attribute path such as `model.model.layers` (it breaks on new architectures).
"""

from __future__ import annotations

import numbers
from typing import Any

from torch import nn

from prunekit.errors import ArgumentError, ModelError

# Config fields that hold the longest sequence a model was built for, in the order architectures use them.
_LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx", "max_seq_len")


def _parameter_count(module: nn.Module) -> int:
    """Number of parameter elements (works on meta tensors too)."""
    return sum(parameter.numel() for parameter in module.parameters())


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Qualified name and list of the repeated decoder blocks: the heaviest ModuleList of one block class.

    Static (no forward pass); `prunekit.calibration.capture_block_inputs` then checks that every block is
    really called, once and in order, and raises ModelError otherwise.
    """
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        size = _parameter_count(module)
        if size == 0:
            continue
        # One class of child first (the blocks repeat), then the most weights: this picks the decoder stack
        # over expert lists inside a block (lighter) and over lists of mixed helper modules.
        candidates.append((len(classes) == 1, size, len(module), name, module))
    if not candidates:
        raise ModelError(
            f"{type(model).__name__} has no nn.ModuleList of decoder blocks; "
            "block-by-block calibration needs the blocks in an nn.ModuleList"
        )
    homogeneous, _, _, name, blocks = max(candidates, key=lambda item: item[:3])
    if not homogeneous:
        raise ModelError(
            f"{type(model).__name__}: the largest nn.ModuleList {name!r} mixes block classes "
            f"{sorted({type(child).__name__ for child in blocks})}; expected one repeated decoder block class"
        )
    return name, blocks


def _causal_lm_class_names() -> set[str]:
    """Class names transformers registers as causal LMs."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (tuple, list)) else [value])
    return names


def is_causal_lm(model: Any) -> bool:
    """True for a transformers causal language model (next-token logits from an output head)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # without transformers nothing can be a transformers causal LM
        return False
    if not isinstance(model, PreTrainedModel):
        return False
    if type(model).__name__ in _causal_lm_class_names():
        return True
    # Subclasses and unregistered architectures: a generation-capable model with an output head.
    from transformers import GenerationMixin

    return isinstance(model, GenerationMixin) and model.get_output_embeddings() is not None


def check_causal_lm(model: Any) -> None:
    """Raise ModelError, naming the class, unless `model` is a transformers causal LM."""
    if not is_causal_lm(model):
        raise ModelError(
            f"{type(model).__name__} is not a causal language model; LLM pruning needs a transformers "
            "*ForCausalLM model (load it with AutoModelForCausalLM or prunekit.zoo.load_causal_lm)"
        )


def check_calibration_model(model: Any) -> None:
    """Raise ModelError unless `model` is a transformers causal LM or encoder (BERT-style): a model whose repeated
    blocks the calibration engine can run one at a time on token ids."""
    if is_causal_lm(model):
        return
    try:
        from transformers import PreTrainedModel
    except ImportError:
        PreTrainedModel = ()  # type: ignore[assignment]
    if not (PreTrainedModel and isinstance(model, PreTrainedModel)) or getattr(model.config, "is_decoder", False):
        raise ModelError(
            f"{type(model).__name__} is neither a transformers causal language model nor a transformers encoder; "
            "calibration-based pruning (wanda, sparsegpt, owl) needs one (load it with AutoModelForCausalLM, "
            "AutoModel, or prunekit.zoo.load_causal_lm)"
        )


def _linear_types() -> tuple[type, ...]:
    """nn.Linear plus GPT-2's transposed transformers Conv1D when transformers is installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def linear_layers_of(block: nn.Module) -> dict[str, nn.Module]:
    """The Linear (and transformers Conv1D) layers inside `block`, by qualified name, in definition order."""
    types = _linear_types()
    return {name: module for name, module in block.named_modules() if name and isinstance(module, types)}


def max_sequence_length(model: Any) -> int | None:
    """Longest sequence the model's config supports, or None when the config does not say."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    # Multimodal configs keep the language model's limit in a text sub-config.
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.insert(0, config.get_text_config())
    for candidate in configs:
        for field in _LENGTH_FIELDS:
            value = getattr(candidate, field, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_sequence_length(model: Any, seq_len: Any, argument: str = "seq_len") -> int:
    """Validate a user's calibration length against what the model supports; never picks one."""
    limit = max_sequence_length(model)
    allowed = f"an integer from 1 to {limit} (the model's maximum sequence length)" if limit else "a positive integer"
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1:
        raise ArgumentError(argument, seq_len, allowed)
    seq_len = int(seq_len)
    if limit is not None and seq_len > limit:
        raise ArgumentError(argument, seq_len, allowed, hint="longer sequences need more memory and break positions")
    return seq_len

"""Released checkpoints from local Hugging Face directories, one module per family.

* :mod:`~mmdiff.checkpoints.formats`: text diffusion LLMs (LLaDA, Dream, mmdiff-decoder) into a
  :class:`~mmdiff.decoder.Decoder`; shards, weight checks and memory-frugal loading shared by all;
* :mod:`~mmdiff.checkpoints.tokenizers`: released tokenizers under mmdiff's special-token names;
* :mod:`~mmdiff.checkpoints.llada_v`: LLaDA-V into a :class:`~mmdiff.model.MultimodalDiffusionLM`;
* :mod:`~mmdiff.checkpoints.lavida`: LaViDa (LLaDA and Dream variants), likewise;
* :mod:`~mmdiff.checkpoints.convert`: ``mmdiff convert``.

:func:`mmdiff.load` (:mod:`mmdiff.loading`) dispatches over all of them.
"""
from .convert import add_arguments, convert, run, save_decoder
from .formats import (
    DECODER_NAMES,
    DREAM_WEIGHTS,
    DTYPES,
    FORMATS,
    LLADA_WEIGHTS,
    SPECIAL_TOKENS_NAME,
    TOKENIZER_FILES,
    CheckpointFormat,
    LoadedCheckpoint,
    assert_materialised,
    check_weights,
    detect_format,
    dream_decoder_config,
    expand_names,
    is_lavida,
    is_llada_v,
    llada_decoder_config,
    load_checkpoint,
    load_pretrained,
    load_tokenizer_if_present,
    open_checkpoint,
    read_weights,
    shard_index,
    special_ids_from_configs,
    tokenizer_files,
)
from .lavida import (
    DREAM_MASK_TOKEN,
    LAVIDA_SYSTEM_PROMPT,
    LAVIDA_UNUSED,
    LAVIDA_VARIANTS,
    lavida_model_config,
    lavida_variant,
    load_lavida,
)
from .llada_v import (
    LLADA_V_SYSTEM_PROMPT,
    LLADA_V_UNUSED,
    llada_v_model_config,
    load_llada_v,
)
from .tokenizers import LLADA_MASK_TOKEN, ReleasedTokenizer, require_tokenizer

__all__ = [
    "DECODER_NAMES", "DREAM_MASK_TOKEN", "DREAM_WEIGHTS", "DTYPES", "FORMATS", "LAVIDA_SYSTEM_PROMPT", "LAVIDA_UNUSED",
    "LAVIDA_VARIANTS", "LLADA_MASK_TOKEN", "LLADA_V_SYSTEM_PROMPT",
    "LLADA_V_UNUSED", "LLADA_WEIGHTS", "SPECIAL_TOKENS_NAME", "TOKENIZER_FILES", "CheckpointFormat",
    "LoadedCheckpoint", "ReleasedTokenizer", "add_arguments", "assert_materialised", "check_weights", "convert",
    "detect_format", "dream_decoder_config", "expand_names", "is_lavida", "is_llada_v", "lavida_model_config",
    "lavida_variant", "llada_decoder_config",
    "llada_v_model_config", "load_checkpoint", "load_lavida", "load_llada_v", "load_pretrained", "load_tokenizer_if_present",
    "open_checkpoint", "read_weights", "require_tokenizer", "run", "save_decoder", "shard_index", "special_ids_from_configs",
    "tokenizer_files",
]

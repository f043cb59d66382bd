"""Released checkpoints from local Hugging Face directories, one module per family.

* :mod:`~mmdiff.checkpoints.formats`: text diffusion LLMs (LLaDA, Dream, mmdiff-decoder) into a
  :class:`~mmdiff.decoder.Decoder`; shards, weight checks and memory-frugal loading shared by all;
* :mod:`~mmdiff.checkpoints.tokenizers`: released tokenizers under mmdiff's special-token names;
* :mod:`~mmdiff.checkpoints.llada_v`: LLaDA-V into a :class:`~mmdiff.model.MultimodalDiffusionLM`;
* :mod:`~mmdiff.checkpoints.lavida`: LaViDa (LLaDA and Dream variants) likewise;
* :mod:`~mmdiff.checkpoints.dimple`: Dimple (Dream with M-RoPE + Qwen2.5-VL tower) likewise;
* :mod:`~mmdiff.checkpoints.diffa`: DIFFA (LLaDA + Whisper + dual adapter) likewise;
* :mod:`~mmdiff.checkpoints.mmada`: MMaDA (LLaDA + MAGVIT-v2 image tokens) likewise;
* :mod:`~mmdiff.checkpoints.convert`: ``mmdiff convert``;
* :mod:`~mmdiff.checkpoints.whisper_ct2`: ``mmdiff convert-whisper`` (CTranslate2 Whisper -> transformers Whisper);
* :mod:`~mmdiff.checkpoints.timm_cnn`: ``mmdiff convert-timm-cnn`` (a released CNN state dict -> timm names).

:func:`mmdiff.load` (:mod:`mmdiff.loading`) dispatches over all of them.
"""
from .convert import add_arguments, convert, run, save_decoder
from .diffa import (
    DIFFA_SYSTEM_PROMPT,
    DIFFA_TAPS,
    DiffaTokenizer,
    diffa_model_config,
    is_diffa,
    load_diffa,
)
from .dimple import DIMPLE_MEDIA_FORMAT, dimple_model_config, dimple_weight_names, is_dimple, load_dimple
from .formats import (
    CODE_TOKENIZER_CLASSES,
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
    llama_decoder_config,
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
from .mmada import (
    MMADA_RESERVED_IDS,
    VQ_SUBDIR,
    is_mmada,
    load_mmada,
    magvit2_name,
    mmada_model_config,
)
from .tokenizers import LLADA_MASK_TOKEN, MEDIA_LAYOUTS, ReleasedTokenizer, require_tokenizer
from .timm_cnn import convert_timm_cnn
from .whisper_ct2 import convert_whisper, read_ct2_model

__all__ = [
    "DIMPLE_MEDIA_FORMAT", "dimple_model_config", "dimple_weight_names", "is_dimple", "load_dimple",
    "DIFFA_SYSTEM_PROMPT", "DIFFA_TAPS", "DiffaTokenizer", "diffa_model_config", "is_diffa", "load_diffa",
    "CODE_TOKENIZER_CLASSES", "DECODER_NAMES", "DREAM_WEIGHTS", "DTYPES", "FORMATS", "LLADA_MASK_TOKEN", "LLADA_V_SYSTEM_PROMPT",
    "LLADA_V_UNUSED", "LLADA_WEIGHTS", "MEDIA_LAYOUTS", "MMADA_RESERVED_IDS", "SPECIAL_TOKENS_NAME", "TOKENIZER_FILES", "VQ_SUBDIR", "CheckpointFormat",
    "LoadedCheckpoint", "ReleasedTokenizer", "add_arguments", "assert_materialised", "check_weights", "convert",
    "detect_format", "dream_decoder_config", "expand_names", "is_lavida", "is_llada_v", "is_mmada", "llada_decoder_config",
    "llama_decoder_config",
    "llada_v_model_config", "load_checkpoint", "load_llada_v", "load_mmada", "load_pretrained", "magvit2_name",
    "mmada_model_config", "load_tokenizer_if_present",
    "convert_whisper", "read_ct2_model", "convert_timm_cnn",
    "DREAM_MASK_TOKEN", "LAVIDA_SYSTEM_PROMPT", "LAVIDA_UNUSED", "LAVIDA_VARIANTS", "lavida_model_config",
    "lavida_variant", "load_lavida",
    "open_checkpoint", "read_weights", "require_tokenizer", "run", "save_decoder", "shard_index", "special_ids_from_configs",
    "tokenizer_files",
]

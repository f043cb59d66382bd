"""mmdiff's own byte-level BPE tokenizer, trained with ``tokenizers`` and loaded through transformers.

Byte-level BPE (GPT-2 style) represents any UTF-8 text, so a question with a word never seen in
training still tokenizes; the merges learned from the synthetic world make its frequent words
single tokens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from . import special_tokens as st


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 512, min_frequency: int = 2):
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: an iterator of training strings.
        vocab_size: total vocabulary size, special tokens and the 256 byte symbols included.
        min_frequency: minimum count for a merge.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with mmdiff's special tokens and chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(st.ALL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok):
    """Wrap a raw ``tokenizers.Tokenizer`` with mmdiff's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=st.BOS,
        eos_token=st.EOS,
        pad_token=st.PAD,
        mask_token=st.MASK,
        additional_special_tokens=[st.IMAGE, st.AUDIO, st.USER, st.ASSISTANT, st.SYSTEM, st.END_TURN],
        padding_side="left",
    )
    fast.chat_template = st.CHAT_TEMPLATE
    return fast


def save_tokenizer(tok, directory: str | Path) -> None:
    """Write ``tokenizer.json`` (the only file needed to reload) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.save(str(directory / "tokenizer.json"))


def load_tokenizer(directory: str | Path):
    """Load ``tokenizer.json`` from ``directory`` as a ``PreTrainedTokenizerFast``.

    Raises:
        FileNotFoundError: when ``directory/tokenizer.json`` does not exist.
    """
    from tokenizers import Tokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    return wrap_tokenizer(Tokenizer.from_file(str(path)))

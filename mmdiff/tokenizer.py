"""mmdiff's own byte-level BPE tokenizer, trained with ``tokenizers`` and loaded through transformers.

Byte-level BPE (GPT-2 style) represents any UTF-8 text, so a question with a word never seen in
training still tokenizes. Unlike GPT-2 it does not split at spaces: merges may span words, so the
templated phrases of the synthetic world become few tokens (a 6-object JSON caption is ~49 tokens
instead of ~150), which makes a CPU-trainable model possible. One split is kept: the value of a
JSON string field (``"color": "red"``) is its own pre-token, so the JSON skeleton
(``", "color": "``) and the values never share a token; structure-prior templates rely on this.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from . import special_tokens as st

#: a JSON string value following ``": "`` (lower-case words), isolated as its own pre-token
JSON_VALUE = r'(?<=: ")[a-z0-9]+(?: [a-z0-9]+)*(?=")'
#: GPT-2's word pattern: a word with its leading space, a number, a punctuation run, spaces
WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 512, min_frequency: int = 2,
                    max_token_length: int = 24, split_words: bool = False):
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: an iterator of training strings.
        vocab_size: total vocabulary size, special tokens and the 256 byte symbols included.
        min_frequency: minimum count for a merge.
        max_token_length: longest token, in characters.
        split_words: split at spaces and punctuation first (GPT-2 style): merges stay inside words,
            so a word is the same token in a question and in an answer, at the cost of longer sequences.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with mmdiff's special tokens and chat template.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    pattern = JSON_VALUE + "|" + WORDS if split_words else JSON_VALUE
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(st.ALL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        max_token_length=max_token_length,
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

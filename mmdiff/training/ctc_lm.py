"""The CTC beam's inference language model, fitted by the trainer and saved as ``ctc_lm.json``."""
from __future__ import annotations

from ..adapters.ctc import TokenNGram
from ..data.dataset import SPOKEN_TYPES
from ..data.questions import world_texts
from ..model import MultimodalDiffusionLM
from .recipe import TrainConfig


def fit_ctc_lm(model: MultimodalDiffusionLM, cfg: TrainConfig) -> TokenNGram:
    """The inference LM of the CTC beam (``ctc_lm.json``): token n-grams of order ``cfg.ctc_lm_order``
    over ``cfg.ctc_lm_texts`` training-split questions of the spoken families, tokenised as the CTC
    targets are. Depends only on the config and the tokenizer, never on weights."""
    texts = world_texts(cfg.ctc_lm_texts, seed=f"ctc-lm-{cfg.seed}", types=SPOKEN_TYPES, answers=False)
    tok = model.tokenizer
    return TokenNGram.fit((tok(t, add_special_tokens=False)["input_ids"] for t in texts), order=cfg.ctc_lm_order,
                          vocab_size=model.cfg.decoder.vocab_size)

"""The training recipe as data: a committed JSON file read into :class:`TrainConfig`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..io import JsonConfig, config_from_dict, read_json

STAGE_KINDS = ("cells", "asr", "ar", "diffusion")


@dataclass
class StageConfig(JsonConfig):
    """One training stage.

    ``cells`` pretrains the vision encoder on the scene generator's per-cell labels (the grounding
    our tiny model cannot inherit from CLIP); ``asr`` pretrains the speech encoder with CTC on the
    transcripts of the spoken questions (the alignment a pretrained Whisper would bring); ``ar`` is
    phase 1 of Dimple's recipe (causal mask, next-token loss); ``diffusion`` is phase 2
    (masked-diffusion ELBO under ``attn_mode``).

    ``audio_top_layers`` = k > 0 (``asr`` stages) fine-tunes the top k layers of a pretrained speech
    encoder (and its final layer norm) with the adapter, the lower layers frozen: their output is
    computed once and cached across epochs, so a step runs only the k layers and the adapter
    (:meth:`~mmdiff.encoders.audio.AudioEncoder.forward_from`). ``train`` must then not name ``audio``
    (that trains the whole encoder, from its log-mels).
    """

    name: str
    kind: str  # cells | asr | ar | diffusion
    steps: int
    lr: float = 1e-3
    batch_size: int = 128
    train: list[str] = field(default_factory=lambda: ["vision_adapter", "decoder"])  # parts with gradients
    attn_mode: str = "prefix"  # diffusion stages: bidirectional | prefix
    complementary: bool = False  # LaViDa complementary masking
    warmup: int = 100
    weight_decay: float = 0.01
    long_fraction: float = 0.15  # fraction of batches holding long answers (captions)
    audio_fraction: float = 0.0  # fraction of batches with spoken questions (spoken VQA and ASR)
    save_as: str | None = None  # also export the model at the end of this stage to this directory
    audio_top_layers: int = 0  # asr stages: also fine-tune the speech encoder's top k layers (0: encoder as ``train`` says)
    audio_top_lr: float = 1e-4  # their peak AdamW learning rate (same warmup and cosine decay as ``lr``)

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stage {self.name!r}: kind {self.kind!r} not in {STAGE_KINDS}")
        if self.audio_top_layers < 0 or (self.audio_top_layers and (self.kind != "asr" or "audio" in self.train)):
            raise ValueError(f"stage {self.name!r}: audio_top_layers {self.audio_top_layers} must be >= 0, and > 0 "
                             f"only in an asr stage whose train list does not name the whole encoder ('audio')")


def _range(name: str, value, rule: str, *, zero_ok: bool) -> tuple[float, float]:
    """A config's ``[lo, hi]`` (JSON gives a list) as a tuple, checked: 0 < lo <= hi (0 <= lo with ``zero_ok``)."""
    lo_hi = tuple(float(v) for v in value)
    if len(lo_hi) != 2 or not (0 <= lo_hi[0] if zero_ok else 0 < lo_hi[0]) or lo_hi[0] > lo_hi[1]:
        raise ValueError(f"{name} {list(value)} must be [lo, hi] {rule}")
    return lo_hi


@dataclass
class TrainConfig(JsonConfig):
    """Everything a training run needs; see ``configs/mmdiff-tiny.json``."""

    out: str  # output model directory
    model: dict  # ModelConfig sections (decoder, vision, vision_adapter, ...); decoder vocab set from tokenizer
    stages: list[StageConfig]
    #: start from this trained model directory: its tokenizer, CTC LM and the weights of ``init_parts`` (whose
    #: configs must equal the recipe's); every other part is built anew from the recipe. None = from scratch
    init: str | None = None
    init_parts: list[str] = field(default_factory=lambda: ["vision", "vision_adapter", "decoder"])
    log: str | None = None  # the JSONL training log (default: beside ``out``, named ``<out>.train_log.jsonl``)
    fp16_parts: list[str] = field(default_factory=list)  # parts saved in float16 (e.g. a released fp16 encoder)
    seed: int = 0
    vocab_size: int = 768  # tokenizer size
    tokenizer_texts: int = 20000  # generated texts used to train the tokenizer
    split_words: bool = False  # tokenizer merges stay inside words (see mmdiff.tokenizer.train_tokenizer)
    bank_images: int = 20000  # training scenes rendered and encoded once
    val_images: int = 300  # validation scenes
    short_length: int = 8  # response canvas for short answers
    long_length: int = 96  # longest response canvas (captions)
    type_weights: dict[str, float] = field(default_factory=dict)  # question type -> sampling weight
    speech_clips: int = 0  # spoken questions synthesised for training (0 = no audio path)
    speech_val_clips: int = 100  # spoken questions for validation
    spec_augment: bool = False  # SpecAugment frequency / time masking in the ASR stage
    #: speed perturbation of the training clips (lo, hi): each resampled a ~ U(lo, hi) times faster, tempo, pitch
    #: and formants together (SpeechBank.build); None = off
    speed_perturb: tuple[float, float] | None = None
    #: seconds of noisy silence (lo, hi) drawn for the start and the end of each training clip (SpeechBank.build):
    #: espeak-ng speaks from the first 40 ms, other engines and microphones do not; None = none
    pad_silence: tuple[float, float] | None = None
    #: [n, share] or [n, share, k]: n synthetic English accents (mmdiff.data.speech.write_accent, each with up to k
    #: consonant processes; k = 0 when left out) speak that share of the training clips (SpeechBank.build); None =
    #: the training voices only
    synthetic_accents: tuple[int, float] | tuple[int, float, int] | None = None
    asr_fraction: float = 0.3  # share of ASR ("transcribe the audio.") items in spoken batches
    ctc_lm_order: int = 0  # n of the token n-gram LM saved as ctc_lm.json for the CTC beam at inference (0 = none)
    ctc_lm_texts: int = 20000  # training-split questions of the spoken families it is fitted on
    ground_weight: float = 1.0  # weight of the grounding loss on image-token states (0 = off)
    ground_groups: int = 3  # focus groups the grounding loss predicts (2: leave out the relation region)
    rank_weight: float = 0.0  # weight of the per-cell object-rank loss on image-token states (0 = off)
    ground_layer: int = -1  # residual-stream index it reads (-1: the middle of the decoder)
    readout_weight: float = 0.0  # weight of the answer-cell readout loss on the last prompt state (0 = off)
    readout_layer: int = -1  # residual-stream index the readout reads (-1: two blocks before the output)
    relate_weight: float = 0.0  # weight of the comparison readout (row / column / count order of groups 1 and 2; 0 = off)
    relate_layer: int = -1  # residual-stream index it reads (-1: one block before the output)
    readout_at_response: bool = False  # diffusion stages: readouts also at the first response position (where it decodes)
    eval_every: int = 500  # validation interval in steps (0: never)
    save_every: int = 250
    threads: int = 0  # torch threads (0 = torch default)

    def __post_init__(self) -> None:
        if self.speed_perturb is not None:
            self.speed_perturb = _range("speed_perturb", self.speed_perturb, "with 0 < lo <= hi (e.g. [0.9, 1.1])",
                                        zero_ok=False)
        if self.synthetic_accents is not None:
            value = list(self.synthetic_accents)
            n, share, k = value + [0] if len(value) == 2 else value if len(value) == 3 else (0, 0, 0)
            if not (isinstance(n, int) and n >= 1 and isinstance(share, (int, float)) and 0 < share <= 1
                    and isinstance(k, int) and k >= 0):
                raise ValueError(f"synthetic_accents {value} must be [n, share] or [n, share, k] with integers "
                                 "n >= 1 and k >= 0 and 0 < share <= 1 (e.g. [200, 0.5] or [200, 0.5, 2])")
            self.synthetic_accents = (n, float(share)) if len(value) == 2 else (n, float(share), k)
        if self.pad_silence is not None:
            self.pad_silence = _range("pad_silence", self.pad_silence, "seconds with 0 <= lo <= hi (e.g. [0.0, 0.5])",
                                      zero_ok=True)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        data = dict(read_json(path))
        data["stages"] = [config_from_dict(StageConfig, s, source=f"{path}: stage") for s in data.get("stages", [])]
        return config_from_dict(cls, data, source=str(path))


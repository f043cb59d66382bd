"""Audio tower: waveform -> Whisper log-mel -> Whisper encoder states (transformers' ``WhisperEncoder``).

Whisper (Radford et al. 2022) is trained on 30 s windows and ``WhisperEncoder.forward`` insists on
3000 mel frames. Two ways to run it (``AudioEncoderConfig.pad_to_window``):

* ``False`` (default): a batch is padded only to its longest clip and a mask is kept;
  :meth:`AudioEncoder.forward` runs Whisper's stages itself (conv1 -> conv2 -> the first T'
  positional embeddings -> layers with a key-padding mask -> layer norm), so a clip gives the same
  states alone or padded in a batch, and a 2 s clip costs 100 frames, not 1500.
* ``True``: every clip is zero-padded to the full window (``max_source_positions`` states: 30 s)
  and the encoder attends over the padding, exactly as Whisper and DIFFA (Zhou et al. 2025,
  ``WhisperFeatureExtractor`` then ``WhisperEncoder``) run it. ``window_positions`` shortens the
  window (e.g. 500 states: 10 s of speech and silence, the first 500 positional embeddings), which
  costs about a third of the full window's FLOPs for the linear layers and a ninth for attention.

Log-mel is ``WhisperFeatureExtractor``'s maths: 400-point Hann STFT, hop 160 at 16 kHz (100
frames/s, last frame dropped), its Slaney mel filters (``transformers.audio_utils.mel_filter_bank``,
``num_mel_bins`` of them) up to 8 kHz, ``log10(max(mel, 1e-10))`` floored at ``max - 8`` and mapped
by ``(x + 4) / 4``. Unpadded, the max is the clip's (Whisper takes it over the padded window, which
is the same for any clip that is not silent).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io import (
    WEIGHTS_NAME,
    JsonConfig,
    config_from_dict,
    drop_retired_keys,
    load_safetensors,
    load_state_checked,
    read_json,
)
from ..media import load_audio
from ..registry import Registry

logger = logging.getLogger("mmdiff")

AUDIO_ENCODERS: Registry[type["AudioEncoder"]] = Registry("audio encoder")

SAMPLE_RATE = 16000  # Whisper's input rate
N_FFT = 400  # 25 ms window
HOP = 160  # 10 ms hop: 100 mel frames per second; the encoder halves this to 50 states per second

#: Fields that fix the encoder's shape; they must agree with a checkpoint's config.json.
SHAPE_FIELDS: tuple[str, ...] = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                                 "num_mel_bins", "max_source_positions")


@dataclass
class AudioEncoderConfig(JsonConfig):
    """A Whisper encoder's shape (defaults: Whisper-tiny) and what it returns. Saved as JSON."""

    kind: str = "whisper"  # registry name
    d_model: int = 384  # state width
    encoder_layers: int = 4  # transformer layers
    encoder_attention_heads: int = 6  # attention heads
    encoder_ffn_dim: int = 1536  # MLP hidden width
    num_mel_bins: int = 80  # mel channels (128 for large-v3)
    max_source_positions: int = 1500  # encoder positions: 30 s at 50 states per second
    checkpoint: str | None = None  # local Whisper directory (config.json + model.safetensors); never downloaded
    max_seconds: float = 30.0  # longer clips are rejected by preprocess
    output_layers: tuple[int, ...] = (-1,)  # hidden states returned in AudioFeatures.layers (see AudioEncoder)
    #: a clip recorded below 16 kHz gets its empty upper band filled with white noise this many dB below its
    #: power (media.fill_empty_band; None = left empty). 17 dB: mmdiff-tiny, trained on full-band speech with
    #: 15-35 dB SNR noise, mishears 8 kHz clips (WER 0.75) unless filled (0.17; 16 kHz: 0.08); an encoder that
    #: heard narrow-band speech (a real Whisper checkpoint) wants None
    narrowband_fill_db: float | None = 17.0
    #: pad every clip to the full window (max_source_positions states; Whisper's 30 s) and attend over the
    #: padding, as Whisper and DIFFA do; False: run a batch at its longest clip, padded frames masked out
    pad_to_window: bool = False
    #: states in the padded window (None: max_source_positions, Whisper's own 30 s); only with pad_to_window
    window_positions: int | None = None

    def __post_init__(self) -> None:
        self.output_layers = tuple(self.output_layers)  # JSON gives a list
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by encoder_attention_heads "
                             f"{self.encoder_attention_heads}")
        if self.window_positions is not None:
            if not self.pad_to_window:
                raise ValueError("window_positions is set but pad_to_window is false: set pad_to_window true")
            if not 1 <= self.window_positions <= self.max_source_positions:
                raise ValueError(f"window_positions {self.window_positions} must be in [1, max_source_positions "
                                 f"{self.max_source_positions}]")
        states, field = ((self.window_positions, "the window of window_positions") if self.window_positions
                         else (self.max_source_positions, "max_source_positions"))
        limit = states * 2 * HOP / SAMPLE_RATE
        if self.max_seconds > limit:
            raise ValueError(f"max_seconds {self.max_seconds} exceeds the {limit:g} s that {field} {states} can hold")
        n_states = self.encoder_layers + 1
        bad = [i for i in self.output_layers if not -n_states <= i < n_states]
        if bad or not self.output_layers:
            raise ValueError(f"output_layers {self.output_layers} must be non-empty indices into the "
                             f"{n_states} hidden states (embeddings + {self.encoder_layers} layers)")

    @property
    def window_states(self) -> int:
        """Encoder states in the padded window: ``window_positions``, else ``max_source_positions``."""
        return self.window_positions or self.max_source_positions

    @property
    def window_samples(self) -> int:
        """Samples in the padded window: ``window_states`` states of 2 mel frames."""
        return self.window_states * 2 * HOP

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "audio encoder config") -> "AudioEncoderConfig":
        """Read a saved config; ``mean_norm``, a removed experiment, is accepted only off (and dropped)."""
        data = drop_retired_keys(data, {"mean_norm": False}, source=source,
                                 why="per-clip log-mel mean normalisation was an experiment and was removed: it "
                                     "did not help (bench/sweeps/asr-stage)")
        return config_from_dict(cls, data, source=source)

    @classmethod
    def from_whisper_checkpoint(cls, directory: str | Path, **overrides) -> "AudioEncoderConfig":
        """The shape of the Whisper checkpoint in ``directory`` (its config.json), loading from it; no
        narrow-band fill (Whisper was trained on narrow-band speech too)."""
        hf = read_json(Path(directory) / "config.json")
        return cls(**{k: hf[k] for k in SHAPE_FIELDS if k in hf}, checkpoint=str(directory),
                   **{"narrowband_fill_db": None, **overrides})


@dataclass
class AudioFeatures:
    """Encoder output for a batch. Unpadded encoders (``pad_to_window`` False) zero every tensor at
    padded frames; window encoders return Whisper's states over the whole window (the padding was
    attended to) and ``mask`` marks each clip's own frames."""

    last: torch.Tensor  # (B, T', D) final states (after the encoder's layer norm)
    layers: list[torch.Tensor]  # output_layers' states, each (B, T', D)
    mask: torch.Tensor  # (B, T') bool, True at real frames
    window: bool = False  # the states cover the encoder's whole window, padding included (pad_to_window)


def build_audio_encoder(cfg: AudioEncoderConfig) -> "AudioEncoder":
    """Build the encoder registered under ``cfg.kind``."""
    return AUDIO_ENCODERS.get(cfg.kind)(cfg)


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> torch.Tensor:
    """``WhisperFeatureExtractor``'s Slaney mel filter bank (librosa's), (n_mels, N_FFT // 2 + 1) float32."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                         max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney",
                         mel_scale="slaney")  # (F, n_mels) float64
    return torch.from_numpy(fb).float().T.contiguous()


def log_mel(samples: np.ndarray, *, n_mels: int = 80, n_samples: int | None = None) -> torch.Tensor:
    """Whisper log-mel spectrogram of a 16 kHz clip -> (n_mels, n // HOP) float32.

    Args:
        samples: the clip, mono at 16 kHz.
        n_mels: mel channels.
        n_samples: zero-pad the clip to this many samples first (Whisper's window: 480000), as
            ``WhisperFeatureExtractor`` does; None pads only clips shorter than one STFT window (N_FFT).
    """
    wav = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    target = max(N_FFT, n_samples or 0)
    if wav.shape[0] < target:
        wav = F.pad(wav, (0, target - wav.shape[0]))
    stft = torch.stft(wav, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)  # (F, n//HOP + 1)
    power = stft[:, :-1].abs() ** 2  # (F, T): Whisper drops the last frame
    log_spec = (mel_filters(n_mels) @ power).clamp(min=1e-10).log10()  # (n_mels, T)
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


@AUDIO_ENCODERS.register("whisper")
class AudioEncoder(nn.Module):
    """Whisper encoder over variable-length clips.

    Hidden states are numbered like transformers' ``output_hidden_states``: 0 = embeddings,
    i = after layer i, and the last (``encoder_layers``) is after the final layer norm; negative
    indices count from the end. ``out_dim`` is ``d_model``. With ``cfg.pad_to_window`` every clip
    fills Whisper's whole window (see the module docstring).
    """

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.cfg = cfg
        self.out_dim = cfg.d_model
        self.encoder = WhisperEncoder(WhisperConfig(**{k: getattr(cfg, k) for k in SHAPE_FIELDS}))
        if cfg.checkpoint is not None:
            load_whisper_encoder(self.encoder, cfg.checkpoint, cfg)
        source = f"loaded weights from {cfg.checkpoint}" if cfg.checkpoint else "random init"
        logger.info("audio encoder %s: %s", cfg.kind, source)

    def load(self, clip: str | Path | tuple[np.ndarray, int]) -> np.ndarray:
        """A clip as this encoder reads it: mono float32 at 16 kHz, its length limit checked and the
        empty band of a narrow-band clip filled (:func:`mmdiff.media.load_audio`)."""
        return load_audio(clip, target_sr=SAMPLE_RATE, max_seconds=self.cfg.max_seconds,
                          fill_db=self.cfg.narrowband_fill_db)

    def preprocess(self, clips: Sequence[str | Path | tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Load clips and compute log-mels.

        Unpadded, the log-mels are padded with zeros to the batch's longest clip, each clip's frame
        count rounded up to even (the encoder's stride-2 conv then never reads past it), so a clip
        gives identical features alone or in a batch. With ``pad_to_window`` each waveform is
        zero-padded to the window first, exactly as ``WhisperFeatureExtractor`` does, and the mask
        counts the clip's states as ``WhisperEncoder._get_feat_extract_output_lengths`` does.

        Returns:
            features (B, n_mels, T) float32 and frame_mask (B, T // 2) bool over encoder states.
        """
        if not clips:
            raise ValueError("preprocess needs at least one clip")
        waves = [self.load(c) for c in clips]
        if not self.cfg.pad_to_window:
            return self.batch_mels([log_mel(w, n_mels=self.cfg.num_mel_bins) for w in waves])
        n = self.cfg.window_samples
        features = torch.stack([log_mel(w, n_mels=self.cfg.num_mel_bins, n_samples=n) for w in waves])
        frames = torch.tensor([-(-len(w) // HOP) for w in waves])  # ceil(n / HOP) mel frames with audio
        frame_mask = torch.arange(n // HOP // 2)[None, :] < ((frames - 1) // 2 + 1)[:, None]  # (B, T//2)
        return features, frame_mask

    def batch_mels(self, mels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad per-clip log-mels (n_mels, T_i) into a batch: (B, n_mels, T) and frame_mask (B, T // 2).

        With ``pad_to_window`` the mels are padded to the window with the value Whisper gives silence
        (the clip's floor, ``max - 2`` after the ``(x + 4) / 4`` map); only the clip's last two frames
        then differ from :meth:`preprocess` (its STFT reads zeros past the clip, not a reflection).
        """
        lengths = [m.shape[1] + m.shape[1] % 2 for m in mels]  # even frame counts
        if self.cfg.pad_to_window:
            T = self.cfg.window_states * 2
            if max(lengths) > T:
                raise ValueError(f"a clip of {max(lengths)} mel frames exceeds the encoder's window of {T}")
            features = torch.stack([F.pad(m.float(), (0, T - m.shape[1]), value=float(m.max()) - 2.0)
                                    for m in mels])  # (B, n_mels, T)
        else:
            T = max(lengths)
            features = torch.stack([F.pad(m.float(), (0, T - m.shape[1])) for m in mels])  # (B, n_mels, T)
        frame_mask = torch.arange(T // 2)[None, :] < torch.tensor(lengths)[:, None] // 2  # (B, T//2)
        return features, frame_mask

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor) -> AudioFeatures:
        """Whisper's encoder stages: unpadded at the batch's own length with padded frames masked out,
        or (``pad_to_window``) over the whole window with no mask, as ``WhisperEncoder.forward``.

        Args:
            features: (B, n_mels, T) log-mels, T even (T = 2 * ``cfg.window_states`` with ``pad_to_window``).
            frame_mask: (B, T // 2) bool, True at the clips' own encoder frames.
        """
        return self.forward_from(self.embed(features, frame_mask), frame_mask, start=0)

    def embed(self, features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Hidden state 0: conv1 -> GELU -> conv2 (stride 2) -> GELU -> + the first T/2 positional
        embeddings; (B, T/2, D) in the encoder's dtype. Arguments as :meth:`forward`."""
        enc = self.encoder
        T2 = features.shape[-1] // 2
        if features.shape[-1] % 2 or frame_mask.shape != (features.shape[0], T2):
            raise ValueError(f"features {tuple(features.shape)} need an even frame count and a frame_mask of "
                             f"shape {(features.shape[0], T2)}, got {tuple(frame_mask.shape)}")
        if T2 > enc.config.max_source_positions:
            raise ValueError(f"{T2} encoder frames exceed max_source_positions {enc.config.max_source_positions}")
        if self.cfg.pad_to_window and T2 != self.cfg.window_states:
            raise ValueError(f"pad_to_window: features must fill the window of {2 * self.cfg.window_states} "
                             f"mel frames, got {features.shape[-1]}")
        x = F.gelu(enc.conv1(features.to(enc.conv1.weight.dtype)))  # (B, D, T), in the encoder's dtype
        x = F.gelu(enc.conv2(x)).transpose(1, 2)  # (B, T/2, D)
        return x + enc.embed_positions.weight[:T2]

    def hidden_state(self, features: torch.Tensor, frame_mask: torch.Tensor, index: int) -> torch.Tensor:
        """Hidden state ``index`` (0 = embeddings, i = after layer i; ``0 <= index < encoder_layers``, before
        the final layer norm): what a frozen lower part hands the layers above it. Arguments as :meth:`forward`.

        Returns:
            (B, T/2, D) states; :meth:`forward_from` with ``start=index`` completes them to :meth:`forward`'s output.
        """
        if not 0 <= index < len(self.encoder.layers):
            raise ValueError(f"hidden_state index {index} must be in [0, {len(self.encoder.layers)})")
        x = self.embed(features, frame_mask)
        bias = self._attention_bias(x, frame_mask)
        for layer in self.encoder.layers[:index]:
            x = layer(x, bias)
        return x

    def forward_from(self, x: torch.Tensor, frame_mask: torch.Tensor, *, start: int) -> AudioFeatures:
        """The encoder from hidden state ``start`` on: layers ``start + 1 .. encoder_layers``, then the final
        layer norm. ``forward_from(hidden_state(f, m, k), m, start=k)`` is ``forward(f, m)``, so a frozen
        lower part's states can be computed once and only the top layers run (top-layer fine-tuning).

        Args:
            x: (B, T/2, D) hidden state ``start`` (:meth:`embed` for 0, else :meth:`hidden_state`).
            frame_mask: (B, T/2) bool, True at the clips' own encoder frames.
            start: which hidden state ``x`` is; every index in ``cfg.output_layers`` must be >= it.
        """
        n = len(self.encoder.layers)
        wanted = [i % (n + 1) for i in self.cfg.output_layers]  # non-negative hidden-state indices
        if not 0 <= start < n or min(wanted) < start:
            raise ValueError(f"forward_from: start {start} must be in [0, {n}) and at most every output layer "
                             f"{self.cfg.output_layers} (as non-negative indices {wanted})")
        bias = self._attention_bias(x, frame_mask)
        states = {start: x}
        for i, layer in enumerate(self.encoder.layers[start:], start + 1):
            x = layer(x, bias)
            states[i] = x
        states[n] = self.encoder.layer_norm(x)
        if self.cfg.pad_to_window:
            return AudioFeatures(last=states[n], layers=[states[i] for i in wanted], mask=frame_mask, window=True)
        zero_pad = frame_mask[..., None].to(x.dtype)  # (B, T/2, 1)
        return AudioFeatures(last=states[n] * zero_pad, layers=[states[i] * zero_pad for i in wanted], mask=frame_mask)

    def _attention_bias(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, 1, T/2) additive key-padding bias for unpadded batches; None over the window (Whisper
        attends to every frame, padding included)."""
        if self.cfg.pad_to_window:
            return None
        keep = frame_mask[:, None, None, :]  # (B, 1, 1, T/2)
        return torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)

    def top_layers(self, k: int) -> list[nn.Module]:
        """The modules fine-tuned when the top ``k`` layers are: the last ``k`` layers and the final layer norm
        (``1 <= k <= encoder_layers``); the rest stays frozen and :meth:`hidden_state` ``encoder_layers - k``
        can be cached."""
        n = len(self.encoder.layers)
        if not 1 <= k <= n:
            raise ValueError(f"top_layers: k {k} must be in [1, {n}] (the encoder's layers)")
        return [*self.encoder.layers[n - k:], self.encoder.layer_norm]


def load_whisper_encoder(encoder: nn.Module, directory: str | Path, cfg: AudioEncoderConfig) -> None:
    """Load the encoder weights of the Whisper checkpoint in ``directory`` into ``encoder``, strictly.

    Accepts ``WhisperForConditionalGeneration`` (``model.encoder.*``), ``WhisperModel`` (``encoder.*``)
    and bare encoder state dicts; the checkpoint's config.json, when present, must match ``cfg``'s shape.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"Whisper checkpoint {directory}: not a directory (weights are never downloaded)")
    if (directory / "config.json").is_file():
        hf = read_json(directory / "config.json")
        diff = [f"{k}: checkpoint {hf[k]} vs config {getattr(cfg, k)}"
                for k in SHAPE_FIELDS if k in hf and hf[k] != getattr(cfg, k)]
        if diff:
            raise ValueError(f"Whisper checkpoint {directory}: shape differs from AudioEncoderConfig "
                             f"({'; '.join(diff)}); use AudioEncoderConfig.from_whisper_checkpoint")
    state = load_safetensors(directory / WEIGHTS_NAME)
    prefix = next((p for p in ("model.encoder.", "encoder.") if any(k.startswith(p) for k in state)), "")
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    load_state_checked(encoder, encoder_state, source=str(directory / WEIGHTS_NAME))

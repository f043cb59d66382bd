"""What training draws from the synthetic world once: rendered scenes and spoken questions.

Scenes are rendered and preprocessed once, and encoded once by the frozen vision encoder after the
grounding stage; spoken questions are synthesised once (espeak-ng), their log-mels kept, and their
frozen speech-encoder states cached (a frozen pretrained encoder's before the ASR stage; the frozen
lower part's alone when its top layers are fine-tuned).
"""
from __future__ import annotations

import random
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.dataset import SPOKEN_TYPES
from ..data.questions import ask
from ..data.scenes import cell_labels, render, sample_scene
from ..data.speech import TRAIN_VARIANTS, accent_folder, resample, speak, write_accent
from ..encoders.audio import SAMPLE_RATE, AudioFeatures, log_mel
from ..media import load_audio
from ..model import MultimodalDiffusionLM
from .augment import spec_augment, state_augment


@dataclass
class SceneBank:
    """Scenes with preprocessed pixels, per-cell labels and (later) frozen encoder features."""

    scenes: list
    pixels: torch.Tensor  # (N, 3, H, W) float16
    labels: dict[str, torch.Tensor]  # name -> (N, 9) long
    features: torch.Tensor | None = None  # (N, n_patches, C) float16

    @classmethod
    def build(cls, model: MultimodalDiffusionLM, *, split: str, n: int, seed: int, desc: str,
              progress: bool = True) -> "SceneBank":
        """Render ``n`` scenes of ``split`` and preprocess them for ``model``'s vision encoder."""
        rng = random.Random(f"{split}-{seed}")
        scenes, pixels, labels = [], [], {"shape": [], "colour": [], "size": []}
        chunk = 256
        bar = tqdm(total=n, desc=desc, unit="img", leave=False, disable=not progress)
        for start in range(0, n, chunk):
            batch = [sample_scene(rng, split) for _ in range(min(chunk, n - start))]
            bar.update(len(batch))
            images = [render(s, rng) for s in batch]
            pixels.append(model.vision.preprocess(images).half())
            for s in batch:
                lab = cell_labels(s)
                for k in labels:
                    labels[k].append(lab[k])
            scenes += batch
        return cls(scenes, torch.cat(pixels), {k: torch.tensor(v) for k, v in labels.items()})

    @torch.no_grad()
    def encode(self, model: MultimodalDiffusionLM, batch_size: int = 256) -> None:
        """Run the (frozen) vision encoder once over every image."""
        model.vision.eval()
        self.features = frozen_features(model.vision, self.pixels, batch_size)


@torch.no_grad()
def frozen_features(vision: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, n_patches, C) float16 states of ``vision`` over preprocessed ``pixels``, ``batch_size`` at a time."""
    return torch.cat([vision(pixels[i:i + batch_size].float()).half() for i in range(0, len(pixels), batch_size)])


@dataclass
class SpeechBank:
    """Spoken questions about bank scenes (the question text is the transcript)."""

    scene: list[int]  # bank scene each question is about
    qas: list  # QA whose question was spoken
    mels: list[torch.Tensor]  # (n_mels, T_i) float16 log-mels
    features: list[torch.Tensor] | None = None  # (T'_i, D) float16 frozen encoder states
    hidden: list[torch.Tensor] | None = None  # (T'_i, D) hidden state ``hidden_index`` of a frozen lower part (encode_lower)
    hidden_index: int = 0  # which hidden state ``hidden`` holds (AudioEncoder.hidden_state)

    def __len__(self) -> int:
        return len(self.qas)

    @classmethod
    def build(cls, model: MultimodalDiffusionLM, bank: SceneBank, *, n: int, split: str, seed: int, desc: str,
              workers: int = 2, progress: bool = True, speed_range: tuple[float, float] | None = None,
              silence_range: tuple[float, float] | None = None,
              accents: tuple[int, float] | tuple[int, float, int] | None = None) -> "SpeechBank":
        """Draw ``n`` (scene, question) pairs, speak them with ``split``'s voices (espeak-ng, in a
        thread pool: the work is in the subprocess) and compute log-mels.

        ``speed_range`` (lo, hi): speed perturbation (Ko et al. 2015), each clip resampled as if played
        ``a ~ U(lo, hi)`` times faster: tempo, pitch and formants all scale by ``a``, a change of vocal
        tract that espeak's own speed and pitch settings never make. None: clips as synthesised.

        ``silence_range`` (lo, hi): seconds of noisy silence drawn from U(lo, hi) for each clip's start and
        end (:func:`~mmdiff.data.speech.synthesize`): espeak-ng speaks from the first 40 ms, so a recogniser
        trained on its clips alone may hear words in another engine's or a microphone's leading silence.
        None: none added.

        ``accents`` (n, share[, k]): n synthetic English accents (:func:`~mmdiff.data.speech.write_accent`, drawn
        from ``seed``, each with up to k consonant processes, 0 if k is left out), each clip spoken with probability
        ``share`` by one of them with a training variant instead of by ``split``'s voice (speed, pitch and SNR
        drawn as ever). None: ``split``'s voices only."""
        rng = random.Random(f"speech-{split}-{seed}")
        items = []
        while len(items) < n:
            i = rng.randrange(len(bank.scenes))
            qa = ask(bank.scenes[i], rng, rng.choice(SPOKEN_TYPES))
            if qa is not None:
                items.append((i, qa, rng.getrandbits(32)))
        n_mels = model.cfg.audio.num_mel_bins
        with tempfile.TemporaryDirectory(prefix="mmdiff-speech-") as tmp, accent_folder() as acc:
            voices = []
            if accents is not None:
                a_rng = random.Random(f"accents-{split}-{seed}")
                k = accents[2] if len(accents) > 2 else 0
                voices = [str(write_accent(Path(acc) / f"a{j}", a_rng, consonants=k)) for j in range(accents[0])]

            def one(k: int) -> torch.Tensor:
                _, qa, s = items[k]
                voice = None
                if voices:
                    r = random.Random(s ^ 0xACCE)
                    if r.random() < accents[1]:
                        variant = r.choice(TRAIN_VARIANTS)
                        voice = r.choice(voices) + (f"+{variant}" if variant else "")
                silence = (0.0, 0.0)
                if silence_range is not None:
                    r = random.Random(s ^ 0x51E7)
                    silence = (r.uniform(*silence_range), r.uniform(*silence_range))
                path, _ = speak(qa.question, Path(tmp) / f"{k}.wav", split=split, rng=random.Random(s),
                                silence=silence, voice=voice)
                wave = load_audio(path)
                if speed_range is not None:
                    a = random.Random(s ^ 0x5EED).uniform(*speed_range)
                    wave = resample(wave, round(SAMPLE_RATE * a), SAMPLE_RATE)  # a times faster
                mel = log_mel(wave, n_mels=n_mels).half()
                path.unlink()
                return mel

            with ThreadPoolExecutor(workers) as ex:
                mels = list(tqdm(ex.map(one, range(n)), total=n, desc=desc, unit="clip", leave=False,
                                 disable=not progress))
        return cls([i for i, _, _ in items], [qa for _, qa, _ in items], mels)

    @torch.no_grad()
    def encode(self, model: MultimodalDiffusionLM, batch_size: int = 64) -> None:
        """Run the (frozen) speech encoder once over every clip."""
        model.audio.eval()
        self.features = []
        for i in range(0, len(self), batch_size):
            feats, mask = model.audio.batch_mels(self.mels[i:i + batch_size])
            out = model.audio(feats, mask)
            self.features += [h[m].half() for h, m in zip(out.last, out.mask)]

    @torch.no_grad()
    def encode_lower(self, model: MultimodalDiffusionLM, index: int, batch_size: int = 64,
                     dtype: torch.dtype = torch.float16) -> None:
        """Run the frozen lower part of the speech encoder once over every clip: hidden state ``index``
        (:meth:`~mmdiff.encoders.audio.AudioEncoder.hidden_state`), the input of the fine-tuned top layers,
        stored in ``dtype`` (float16 like :meth:`encode`'s cache: half the memory; float32 keeps
        :meth:`audio_features` equal to the whole encoder's output up to float rounding).

        Raises:
            ValueError: the encoder runs over Whisper's padded window (``pad_to_window``): its top layers
                attend to the padding, which a per-clip cache does not keep.
        """
        if model.audio.cfg.pad_to_window:
            raise ValueError("top-layer fine-tuning caches each clip's own frames, but pad_to_window attends over "
                             "the padding too: use pad_to_window false")
        model.audio.eval()
        self.hidden, self.hidden_index = [], index
        for i in range(0, len(self), batch_size):
            feats, mask = model.audio.batch_mels(self.mels[i:i + batch_size])
            h = model.audio.hidden_state(feats, mask, index)  # (B, T', D)
            self.hidden += [x[m].to(dtype) for x, m in zip(h, mask)]

    def audio_features(self, model: MultimodalDiffusionLM, idx: list[int], *,
                       augment: random.Random | None = None) -> AudioFeatures:
        """The speech encoder's output for clips ``idx``: the cached final states (a frozen encoder), the
        top layers over the cached lower part's states (:meth:`encode_lower`), or the whole encoder
        over the log-mels, in that order of preference.

        Args:
            model: the model whose ``audio`` encoder runs (with gradients where it has them).
            idx: clip indices.
            augment: random source of training augmentation (None: none): SpecAugment on the log-mels when
                the whole encoder runs, else :func:`~mmdiff.training.augment.state_augment` on the final
                states (the adapter's input, cached or not).
        """
        if self.features is not None:
            out = audio_batch([self.features[i] for i in idx])
        elif self.hidden is not None:
            x = audio_batch([self.hidden[i] for i in idx])  # (B, T', D) zero-padded
            out = model.audio.forward_from(x.last.to(next(model.audio.parameters()).dtype), x.mask,
                                           start=self.hidden_index)
        else:
            feats, mask = model.audio.batch_mels([self.mels[i] for i in idx])
            return model.audio(spec_augment(feats, augment) if augment else feats, mask)
        if augment:
            out.last = state_augment(out.last, augment)
        return out


def audio_batch(features: list[torch.Tensor]) -> AudioFeatures:
    """Pad cached encoder states into an :class:`AudioFeatures` batch for the adapter."""
    T = max(f.shape[0] for f in features)
    last = torch.stack([F.pad(f.float(), (0, 0, 0, T - f.shape[0])) for f in features])  # (B, T, D)
    mask = torch.arange(T)[None, :] < torch.tensor([f.shape[0] for f in features])[:, None]  # (B, T)
    return AudioFeatures(last=last, layers=[last], mask=mask)

"""Staged training: encoder grounding, speech-encoder CTC, phase 1 (AR), phase 2 (masked diffusion).

One :class:`Trainer` runs the stages of a :class:`~mmdiff.training.recipe.TrainConfig` in order,
with a progress bar (loss, tokens/s), periodic validation (:mod:`~mmdiff.training.validation`),
atomic resumable checkpoints (:mod:`~mmdiff.training.state`) and a NaN guard. Data parallel over
``torch.distributed`` (gloo on CPU, nccl on GPU) by all-reducing gradients
(:mod:`~mmdiff.training.distributed`); launch with ``torchrun --nproc_per_node N -m mmdiff train``.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..data.questions import world_texts
from ..data.scenes import COLOURS, SHAPES, SIZES
from ..io import read_json
from ..losses import ar_loss, diffusion_loss, forward_mask
from ..model import PARTS, ModelConfig, MultimodalDiffusionLM
from ..tokenizer import train_tokenizer
from .banks import SceneBank, SpeechBank
from .batches import Batcher, Example, embed_batch
from .ctc_lm import fit_ctc_lm
from .distributed import allreduce_grads, dist_info, sync_params
from .heads import CellHead, CTCHead, GroundHead
from .recipe import StageConfig, TrainConfig
from .state import STATE_NAME, append_log, check_same_run, load_optimizer, save_state, warmup_cosine
from .validation import asr_eval, cell_accuracy, quick_eval

log = logging.getLogger("mmdiff")


class Trainer:
    """Runs a :class:`TrainConfig`.

    Args:
        cfg: the recipe.
        resume: continue from ``<out>/train_state`` when it exists.
        progress: show tqdm progress bars (rank 0 only).
    """

    def __init__(self, cfg: TrainConfig, *, resume: bool = True, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.rank, self.world = dist_info()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        self.state_dir = self.out.with_name(self.out.name + ".train_state")
        self.log_path = Path(cfg.log) if cfg.log else self.out.with_name(self.out.name + ".train_log.jsonl")
        self.state = {"stage": 0, "step": 0}
        if not resume and self.rank == 0 and self.log_path.exists():
            self.log_path.unlink()  # a fresh run starts a fresh log
        torch.manual_seed(cfg.seed)
        self.recipe = cfg.to_dict()  # saved with the state: another recipe never resumes it
        if resume and (self.state_dir / STATE_NAME).exists():
            self.state = read_json(self.state_dir / STATE_NAME)
            check_same_run(self.state_dir, self.state, self.recipe, legacy_ok=True,
                           other="of another recipe (two recipes with the same out share it)")
            self.model = MultimodalDiffusionLM.from_pretrained(self.state_dir)
            log.info("resuming from %s at stage %d step %d", self.state_dir, self.state["stage"], self.state["step"])
        elif cfg.init:
            self.model = self._from_init(cfg.init)
        else:
            tok = self._tokenizer()
            mcfg = ModelConfig.from_dict({"model_type": "mmdiff", **cfg.model}, source="the recipe's model section")
            mcfg.decoder.vocab_size = len(tok)
            self.model = MultimodalDiffusionLM(mcfg, tok)
        self.model.train()
        self.bank: SceneBank | None = None
        self.val: SceneBank | None = None
        self.speech: SpeechBank | None = None
        self.val_speech: SpeechBank | None = None
        self.batcher = Batcher(self.model, cfg)
        if cfg.ctc_lm_order > 0 and getattr(self.model.audio_adapter, "lm", False) is None:
            self.model.audio_adapter.lm = fit_ctc_lm(self.model, cfg)
        self.parts: dict[str, float] = {}  # loss components of the last step, for the log

    # -- pieces -----------------------------------------------------------------------------------
    def _from_init(self, directory: str) -> MultimodalDiffusionLM:
        """The recipe's model, started from the trained model in ``directory``: its tokenizer and LM, and the
        weights of ``init_parts``; the other parts are built anew from the recipe.

        Raises:
            ValueError: an unknown part, or one whose config differs between the recipe and ``directory``.
        """
        base = MultimodalDiffusionLM.from_pretrained(directory)
        mcfg = ModelConfig.from_dict({"model_type": "mmdiff", **self.cfg.model}, source="the recipe's model section")
        mcfg.decoder.vocab_size = base.cfg.decoder.vocab_size
        model = MultimodalDiffusionLM(mcfg, base.tokenizer)
        for part in self.cfg.init_parts:
            if part not in PARTS:
                raise ValueError(f"init_parts: unknown part {part!r}; known: {PARTS}")
            if getattr(model.cfg, part) != getattr(base.cfg, part):
                raise ValueError(f"init_parts: {part} of {directory} has another config than the recipe's "
                                 f"({getattr(base.cfg, part)} vs {getattr(model.cfg, part)})")
            getattr(model, part).load_state_dict(getattr(base, part).state_dict())
        if hasattr(model.audio_adapter, "lm"):
            model.audio_adapter.lm = getattr(base.audio_adapter, "lm", None)
        log.info("started from %s: kept %s, built anew the others", directory, self.cfg.init_parts)
        return model

    def _tokenizer(self):
        return train_tokenizer(world_texts(self.cfg.tokenizer_texts, seed=self.cfg.seed), vocab_size=self.cfg.vocab_size,
                               split_words=self.cfg.split_words)

    def _banks(self, stage: StageConfig) -> None:
        """Render (and, once the encoders are trained, encode) the scene and speech banks."""
        cfg = self.cfg
        if self.bank is None:
            self.bank = SceneBank.build(self.model, split="train", n=cfg.bank_images, seed=cfg.seed + 1000 * self.rank,
                                        desc="rendering train scenes", progress=self.progress)
            self.val = SceneBank.build(self.model, split="val", n=cfg.val_images, seed=cfg.seed, desc="rendering val scenes",
                                       progress=self.progress)
        uses_speech = cfg.speech_clips > 0 and stage.kind in ("asr", "ar", "diffusion")
        if uses_speech and self.speech is None:
            if self.model.audio is None:
                raise ValueError("speech_clips > 0 but the model config has no audio encoder")
            self.speech = SpeechBank.build(self.model, self.bank, n=cfg.speech_clips, split="train",
                                           seed=cfg.seed + 1000 * self.rank, desc="speaking train questions",
                                           progress=self.progress, speed_range=cfg.speed_perturb,
                                           silence_range=cfg.pad_silence, accents=cfg.synthetic_accents)
            self.val_speech = SpeechBank.build(self.model, self.val, n=cfg.speech_val_clips, split="val",
                                               seed=cfg.seed, desc="speaking val questions", progress=self.progress)
        if stage.kind == "asr" and stage.audio_top_layers:  # the frozen lower layers run once, not every epoch
            index = self.model.cfg.audio.encoder_layers - stage.audio_top_layers
            self.model.audio.top_layers(stage.audio_top_layers)  # checks k against the encoder's depth
            self.speech.features = self.val_speech.features = None
            for bank in (self.speech, self.val_speech):
                if bank.hidden is None or bank.hidden_index != index:
                    bank.encode_lower(self.model, index)
        elif stage.kind == "asr" and "audio" not in stage.train and self.speech.features is None:
            self.speech.encode(self.model)  # a frozen encoder: its states are computed once, not every epoch
            self.val_speech.encode(self.model)
        if stage.kind in ("ar", "diffusion"):
            if self.bank.features is None:
                self.bank.encode(self.model)
                self.val.encode(self.model)
            if self.speech is not None and self.speech.features is None:
                self.speech.encode(self.model)
                self.val_speech.encode(self.model)

    def _head(self, stage: StageConfig) -> nn.Module | None:
        """The stage's training head: per-cell classifiers (``cells``), a CTC head (``asr``), the
        decoder probes when any of their weights is set (``ar``, ``diffusion``), else None."""
        model, cfg = self.model, self.cfg
        if stage.kind == "cells":
            return CellHead(model.vision.out_dim, model.vision.grid,
                            n_classes={"shape": len(SHAPES) + 1, "colour": len(COLOURS) + 1, "size": len(SIZES) + 1})
        if stage.kind == "asr":  # CTC head over the tokenizer's vocabulary plus a blank
            # the audio_ctc adapter itself (kept: inference compresses with it), else a training-only linear head
            if hasattr(model.audio_adapter, "logits"):
                return model.audio_adapter
            return CTCHead(nn.Linear(model.audio.out_dim, len(model.tokenizer) + 1))
        if cfg.ground_weight > 0 or cfg.rank_weight > 0 or cfg.readout_weight > 0 or cfg.relate_weight > 0:
            return GroundHead(model.cfg.decoder.d_model, n_groups=cfg.ground_groups, readout=cfg.readout_weight > 0,
                              relate=cfg.relate_weight > 0)  # probes on the decoder's states
        return None

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            append_log(self.log_path, record)

    def _lr(self, stage: StageConfig, step: int) -> float:
        return warmup_cosine(step, stage.lr, warmup=stage.warmup, total=stage.steps, floor=0.1)

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> MultimodalDiffusionLM:
        """Run every remaining stage, then write the final model to ``cfg.out``."""
        for si, stage in enumerate(self.cfg.stages):
            if si < self.state["stage"]:
                continue
            self._run_stage(si, stage)
            self.state = {"stage": si + 1, "step": 0}
            if self.rank == 0:
                save_state(self.state_dir, self.model, None, {**self.state, "config": self.recipe})
                if stage.save_as:
                    self.model.save_pretrained(stage.save_as, fp16_parts=self.cfg.fp16_parts)
        if self.rank == 0:
            self.model.eval()
            self.model.save_pretrained(self.out, fp16_parts=self.cfg.fp16_parts)
            log.info("wrote %s", self.out)
        if self.world > 1:  # every replica leaves together: no rank exits while gloo still talks to it
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return self.model

    def _run_stage(self, si: int, stage: StageConfig) -> None:
        model, cfg = self.model, self.cfg
        self._banks(stage)
        model.freeze(["vision", "vision_adapter", "audio", "audio_adapter", "decoder"])
        model.freeze(stage.train, frozen=False)
        top = [p for m in (model.audio.top_layers(stage.audio_top_layers) if stage.audio_top_layers else [])
               for p in m.parameters()]  # fine-tuned top layers of the speech encoder, at their own learning rate
        for p in top:
            p.requires_grad_(True)
        head = self._head(stage)
        tuned = {id(p) for p in top}
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in tuned]
        owned = {id(p) for p in params}  # the audio_ctc head is part of the model: not listed twice
        params += [p for p in ([] if head is None else head.parameters()) if id(p) not in owned]
        if head is not None:
            head.requires_grad_(True)
        groups = [{"params": params}] + ([{"params": top, "lr_scale": stage.audio_top_lr / stage.lr}] if top else [])
        params = params + top
        sync_params(params, self.world)
        opt = torch.optim.AdamW(groups, lr=stage.lr, betas=(0.9, 0.98), weight_decay=stage.weight_decay)
        start = self.state["step"] if self.state["stage"] == si else 0
        if start and stage.kind in ("ar", "diffusion"):
            load_optimizer(self.state_dir, model, opt, self.state.get("adam_steps", {}))
        bar = tqdm(range(start, stage.steps), desc=f"[{stage.name}]", disable=not self.progress or self.rank > 0,
                   initial=start, total=stage.steps, dynamic_ncols=True)
        t_last, tokens_since = time.perf_counter(), 0
        for step in bar:
            rng = random.Random(f"{cfg.seed}-{self.rank}-{si}-{step}")
            for g in opt.param_groups:
                g["lr"] = self._lr(stage, step) * g.get("lr_scale", 1.0)
            loss, n_tokens = self._loss(stage, head, rng)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss ({loss.item()}) at stage {stage.name!r} step {step}, lr "
                                   f"{opt.param_groups[0]['lr']:.2e}; last checkpoint: {self.state_dir}. Lower the "
                                   "learning rate or resume from the checkpoint.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            allreduce_grads(params, self.world)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            tokens_since += n_tokens
            if step % 10 == 0:
                now = time.perf_counter()
                bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens_since / (now - t_last):.0f}")
                self._log({"stage": stage.name, "step": step, "loss": loss.item(), **self.parts,
                           "lr": opt.param_groups[0]["lr"], "tok_s": tokens_since / (now - t_last), "time": time.time()})
                t_last, tokens_since = now, 0
            last = step == stage.steps - 1
            if self.rank == 0 and cfg.eval_every > 0 and ((step + 1) % cfg.eval_every == 0 or last):
                self._validate(stage, head, step + 1)
            if stage.kind in ("ar", "diffusion") and self.rank == 0 and (step + 1) % cfg.save_every == 0 and not last:
                save_state(self.state_dir, model, opt, {"stage": si, "step": step + 1, "config": self.recipe})
        if stage.kind == "cells":
            self.bank.features = None  # encoder changed: features are recomputed when needed
        if stage.kind == "asr" and ("audio" in stage.train or stage.audio_top_layers):
            self.speech.features = None  # the encoder changed: its states are recomputed when needed
            self.speech.hidden = self.val_speech.hidden = None

    def _validate(self, stage: StageConfig, head: nn.Module | None, step: int) -> None:
        if stage.kind == "cells":
            acc, key = cell_accuracy(self.model, head, self.val), "val_cell_acc"
        elif stage.kind == "asr":
            acc, key = asr_eval(self.model, head, self.val_speech), "val_asr"
        else:
            acc, key = quick_eval(self.model, self.val, self.batcher, mode=stage.kind, seed=step,
                                  speech=self.val_speech), "val_acc"
        tqdm.write(f"[{stage.name}] step {step} {key} " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
        self._log({"stage": stage.name, "step": step, key: acc})

    # -- losses -----------------------------------------------------------------------------------
    def _loss(self, stage: StageConfig, head: nn.Module | None, rng: random.Random) -> tuple[torch.Tensor, int]:
        """The stage's loss on one batch drawn with ``rng``, and the tokens it covered; the answer
        loss and the probe losses it sums are kept in ``self.parts`` for the log."""
        model, bank = self.model, self.bank
        if stage.kind == "cells":
            idx = torch.tensor([rng.randrange(len(bank.scenes)) for _ in range(stage.batch_size)])
            logits = head(model.vision(bank.pixels[idx].float()))
            loss = sum(F.cross_entropy(v.reshape(-1, v.shape[-1]), bank.labels[k][idx].reshape(-1)) for k, v in logits.items())
            return loss, stage.batch_size * model.vision.num_tokens
        if stage.kind == "asr":
            return self._ctc_loss(head, [rng.randrange(len(self.speech)) for _ in range(stage.batch_size)])
        if self.speech is not None and rng.random() < stage.audio_fraction:
            items = self.batcher.spoken(self.speech, rng, stage.batch_size // 2)
        else:
            long = rng.random() < stage.long_fraction and bool(self.batcher.long_types)
            items = self.batcher.typed(bank, rng, stage.batch_size // 4 if long else stage.batch_size, long)
        batch = self.batcher.make(items, eos_fill=stage.kind == "diffusion", rng=rng)
        embeds, valid, kinds = embed_batch(model, bank, batch, self.speech)
        response = batch["response"].to(model.device)
        P = embeds.shape[1]
        if stage.kind == "ar":
            targets, noisy = response, response  # teacher forcing under the causal mask
            mode = "causal"
        else:
            g = torch.Generator().manual_seed(rng.randrange(2**31))
            targets, masked, t = forward_mask(response, generator=g, complementary=stage.complementary)
            if stage.complementary:
                embeds, valid, kinds = torch.cat([embeds, embeds]), torch.cat([valid, valid]), torch.cat([kinds, kinds])
                items = items + items
            noisy = targets.masked_fill(masked, model.special.mask)
            mode = stage.attn_mode
        logits, out = model.decoder.forward_response(embeds, valid, noisy, attn_mode=mode,
                                                     output_hidden_states=head is not None)  # (B, L, V)
        n_tokens = int(valid.sum()) + noisy.numel()
        if stage.kind == "ar":
            loss = ar_loss(out.logits, targets.masked_fill(~batch["loss_mask"].to(targets.device), -100), P)
        else:
            loss = diffusion_loss(logits, targets, masked, t)
        self.parts = {"answer": loss.item()}
        if head is not None:
            for term in self._probe_losses(stage, head, out.hidden_states, kinds, items, P):
                loss = loss + term
        return loss, n_tokens

    def _probe_losses(self, stage: StageConfig, head: GroundHead, hidden: list[torch.Tensor], kinds: torch.Tensor,
                      items: list[Example], P: int) -> list[torch.Tensor]:
        """The decoder probes' weighted losses (:class:`~mmdiff.training.heads.GroundHead`), in the
        order they are added to the answer loss; each unweighted value is kept in ``self.parts``."""
        cfg = self.cfg
        ground, rank = head.ground_loss(hidden, kinds, items, self.bank, layer=cfg.ground_layer)
        self.parts["ground"], self.parts["rank"] = ground.item(), rank.item()
        terms = [cfg.ground_weight * ground, cfg.rank_weight * rank]
        # where the first answer token is decoded: the last prompt position under AR (next-token),
        # also the first response position under diffusion when readout_at_response is set
        read_at = [P - 1, P] if stage.kind == "diffusion" and cfg.readout_at_response else [P - 1]
        if head.readout is not None:
            readout = sum(head.readout_loss(hidden, pos, items, self.bank, layer=cfg.readout_layer)
                          for pos in read_at) / len(read_at)
            self.parts["readout"] = readout.item()
            terms.append(cfg.readout_weight * readout)
        if head.relate is not None:
            relate = sum(head.relate_loss(hidden, pos, items, self.bank, layer=cfg.relate_layer)
                         for pos in read_at) / len(read_at)
            self.parts["relate"] = relate.item()
            terms.append(cfg.relate_weight * relate)
        return terms

    def _ctc_loss(self, head: nn.Module, idx: list[int]) -> tuple[torch.Tensor, int]:
        """CTC loss of the speech encoder + head on the transcripts of training clips ``idx``."""
        speech = self.speech
        augment = random.Random(idx[0] * 7919 + len(idx)) if self.cfg.spec_augment else None
        out = speech.audio_features(self.model, idx, augment=augment)
        mask = out.mask
        logp = head.logits(out).float().log_softmax(-1)  # (B, T', V+1)
        targets = [torch.tensor(self.batcher.answer_ids(speech.qas[i].question)) for i in idx]
        loss = F.ctc_loss(logp.transpose(0, 1), torch.cat(targets), mask.sum(-1), torch.tensor([len(t) for t in targets]),
                          blank=logp.shape[-1] - 1, zero_infinity=True)
        return loss, int(mask.sum())

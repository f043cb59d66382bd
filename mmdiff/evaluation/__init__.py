"""Evaluation: VQA metrics, the resumable / sharded batch runner (``mmdiff eval``) and an
lmms-eval model plugin (``lmms_eval_plugin``, imported only on demand)."""
from __future__ import annotations

from .metrics import exact_match, normalize_answer, stats, summarize, vqa_accuracy
from .runner import Shard, answer_batch, evaluate, load_items, merge_shards

__all__ = ["Shard", "answer_batch", "evaluate", "exact_match", "load_items", "merge_shards", "normalize_answer",
           "stats", "summarize", "vqa_accuracy"]

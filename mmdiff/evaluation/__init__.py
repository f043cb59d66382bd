"""Evaluation: VQA metrics, a response canvas per question type, the resumable / sharded batch runner
(``mmdiff eval``) and an lmms-eval model plugin (``lmms_eval_plugin``, imported only on demand)."""
from __future__ import annotations

from .canvas import Canvas, canvas_per_type, choose_canvases
from .metrics import exact_match, normalize_answer, stats, summarize, vqa_accuracy
from .runner import Shard, answer_batch, evaluate, load_items, merge_shards

__all__ = ["Canvas", "Shard", "answer_batch", "canvas_per_type", "choose_canvases", "evaluate", "exact_match",
           "load_items", "merge_shards", "normalize_answer", "stats", "summarize", "vqa_accuracy"]

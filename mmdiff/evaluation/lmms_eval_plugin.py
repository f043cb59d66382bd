"""lmms-eval model plugin: ``--model mmdiff`` answers lmms-eval's generation tasks with mmdiff's
sampler (through :meth:`MultimodalDiffusionLM.generate`; nothing here samples).

lmms-eval is optional: this module imports without it (the class then works against any object
with lmms-eval's request interface), and :func:`register` / :func:`manifest` / :func:`main` say
clearly that it is missing.

How lmms-eval finds the model. The class carries lmms-eval's ``@register_model("mmdiff")``
(enough for versions that resolve ``--model`` through ``lmms_eval.api.registry``). lmms-eval 0.6+
resolves names through its model registry v2 instead, fed by the ``lmms_eval.models`` entry-point
group. Three ways to use it:

* command line, no install step::

      python -m mmdiff.evaluation.lmms_eval_plugin --model mmdiff \\
          --model_args pretrained=checkpoints/mmdiff-tiny,gen_length=8 --tasks vqav2_val_lite --batch_size 8

  (:func:`main` registers the model, then runs lmms-eval's own command line);
* Python: ``register()`` then ``lmms_eval.evaluator.simple_evaluate(model="mmdiff", ...)``, or pass
  ``MMDiffLMMS(pretrained=...)`` itself as ``model``;
* ``lmms-eval --model mmdiff`` (or ``python -m lmms_eval``) when mmdiff is installed: pyproject.toml
  declares the entry point ``[project.entry-points."lmms_eval.models"] mmdiff =
  "mmdiff.evaluation.lmms_eval_plugin:manifest"``.

``model_args``: ``pretrained`` (any directory :func:`mmdiff.load` reads: mmdiff's own, a released
LLaDA / Dream / LLaDA-V checkpoint, ...), ``device``, ``dtype`` (``auto``: float32 on the CPU, the
checkpoint's own on a GPU), ``batch_size``, and any option of
:class:`~mmdiff.sampling.DecodeConfig` by its flat name, the flag's without dashes (``gen_length=8``,
``steps=4``, ``transfer=threshold``, ``cache=prefix``, ``prune=fastv``, ``keep_ratio=0.5``,
``search=best_of_n``; lists with ``;`` as lmms-eval splits ``model_args`` at commas:
``skip_layers=3;4``). The decode settings come from ``model_args`` only, so a
run is reproducible from them: of the task's ``gen_kwargs`` only ``until`` (stop strings, cut
from the answer) is used; ``max_new_tokens`` etc. are ignored (logged once).

``pretrained`` is any directory :func:`mmdiff.load` reads: mmdiff's own models and released
checkpoints (LLaDA-V; LLaDA / Dream as text-only models). ``dtype`` (``float32``, ``bfloat16``,
``float16``) defaults to float32 on CPU and to the checkpoint's own dtype on a GPU.

Offline runs. Neither this plugin nor lmms-eval's import and evaluation opens a connection for a
local task (tests/test_lmms_eval_plugin.py runs one with ``socket.connect`` refused): a task YAML
whose ``dataset_path`` is a directory written by ``DatasetDict.save_to_disk``, with
``dataset_kwargs: {load_from_disk: true}`` (lmms-eval's offline mechanism), ``doc_to_visual`` naming
an ``Image`` column, loaded with ``--include_path`` (``TaskManager(include_path=...)``). Set
``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``: a task that names a hub dataset then fails with
``OfflineModeIsEnabled`` (after lmms-eval's 5 download attempts, 2 s apart) instead of reaching for
the network. ``import lmms_eval.evaluator`` takes about 5 s of CPU (it imports ``evaluate``, which
imports transformers' pipelines).

lmms-eval 0.7.3 with filelock >= 4: its ``simple_evaluate`` first patches filelock's singleton
metaclass through ``filelock._api``, a module filelock 4 no longer has, so every run stops with
``ModuleNotFoundError: No module named 'filelock._api'`` (whatever the model). That patch only
matters for several ranks sharing a lock file; this plugin runs in one process, so creating
:class:`MMDiffLMMS` marks it as applied when filelock has no ``_api`` (:func:`_skip_rank_lock_patch`).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import DEFAULT_MODEL_DIR
from ..loading import DTYPE_CHOICES, load
from ..model import NO_HEARING, NO_VISION, MultimodalDiffusionLM
from ..sampling import DecodeConfig
from .runner import answer_batch

log = logging.getLogger("mmdiff")

try:
    from lmms_eval.api.model import lmms as _LMMSBase
    from lmms_eval.api.registry import register_model
except ImportError as e:  # lmms-eval is an optional extra
    _MISSING: ImportError | None = e

    class _LMMSBase:  # the parts of lmms_eval.api.model.lmms that the class relies on
        def __init__(self) -> None:
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

    def register_model(*names: str):
        return lambda cls: cls
else:
    _MISSING = None

NAME = "mmdiff"
CLASS_PATH = "mmdiff.evaluation.lmms_eval_plugin.MMDiffLMMS"  # importable path, also under python -m


def _require_lmms_eval() -> None:
    if _MISSING is not None:
        raise ImportError(f"lmms-eval is not importable ({_MISSING}); install it with `pip install lmms-eval` "
                          "to run mmdiff through lmms-eval (mmdiff's own evaluator is `mmdiff eval`)")


def _skip_rank_lock_patch() -> None:
    """Let lmms-eval 0.7.3's ``simple_evaluate`` run with filelock >= 4 (see the module docstring):
    its cross-rank lock patch imports ``filelock._api``; without that module the patch is marked as
    applied (one process has no other rank to share a lock with)."""
    if _MISSING is not None or importlib.util.find_spec("filelock._api") is not None:
        return
    from lmms_eval import evaluator

    patch = getattr(evaluator, "_enable_reentrant_filelocks", None)
    if patch is not None:
        patch._patched = True


@register_model(NAME)
class MMDiffLMMS(_LMMSBase):
    """An lmms-eval "simple" model (``doc_to_visual`` + text context) backed by an mmdiff model.

    Args:
        pretrained: model directory (:func:`mmdiff.load`).
        device: where the model runs (default: cuda if available, else cpu).
        dtype: parameter dtype (``auto``, ``float32``, ``bfloat16``, ``float16``; default auto).
        batch_size: requests per ``generate`` call.
        max_batch_size: passed by lmms-eval's evaluator; unused.
        **options: :class:`~mmdiff.sampling.DecodeConfig` options by key (text values are
            converted); unknown names are an error.
    """

    is_simple = True

    def __init__(self, pretrained: str = DEFAULT_MODEL_DIR, device: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, dtype: str = "auto", **options: Any) -> None:
        super().__init__()
        _skip_rank_lock_patch()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("the mmdiff lmms-eval plugin runs in one process; "
                             "for multi-GPU evaluation use `torchrun -m mmdiff eval`")
        known = {o.key for o in DecodeConfig.options()}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown mmdiff model_args {unknown}; known: pretrained, device, dtype, batch_size, "
                             f"{', '.join(sorted(known))}")
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"unknown mmdiff model_args dtype={dtype!r}; known: {', '.join(DTYPE_CHOICES)}")
        self.decode = DecodeConfig().with_values(options, parse=True)  # lmms-eval passes text ("None", "0.5")
        self.model: MultimodalDiffusionLM = load(Path(pretrained), dtype=dtype, device=device or "auto")
        self.batch_size = int(batch_size)
        self._ignored: set[str] = set()

    # -- requests -----------------------------------------------------------------------------------
    def _media(self, doc_to_visual, doc_id: Any, task: str, split: str) -> tuple[Any, Any]:
        """(image, audio) of a request's doc: PIL images / paths, and audio as
        ``{"array", "sampling_rate"}`` dicts (Hugging Face ``Audio``) -> ``(array, rate)``."""
        if doc_to_visual is None:
            return None, None
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        images = [v for v in visuals if v is not None and not isinstance(v, dict)]
        audios = [(v["array"], v["sampling_rate"]) for v in visuals if isinstance(v, dict)]
        if len(images) > 1 or len(audios) > 1:
            raise ValueError(f"{task} doc {doc_id}: {len(images)} images and {len(audios)} clips; "
                             "mmdiff answers about at most one image and one clip")
        for given, reader, refusal in ((images, self.model.vision, NO_VISION), (audios, self.model.audio, NO_HEARING)):
            if given and reader is None:  # the whole task needs a medium this model lacks: stop, do not score ""
                raise ValueError(f"{task} doc {doc_id}: {refusal}; {task} is not a task for this model")
        return (images or [None])[0], (audios or [None])[0]

    def _stop_strings(self, gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.get("until") or []
        ignored = sorted(set(gen_kwargs) - {"until"} - self._ignored)
        if ignored:
            log.warning("mmdiff lmms-eval plugin: ignoring gen_kwargs %s; sampler settings come from model_args (%s)",
                        ignored, self.decode.to_dict())
            self._ignored.update(ignored)
        return [until] if isinstance(until, str) else list(until)

    def generate_until(self, requests: Sequence) -> list[str]:
        """Answer ``Instance`` requests whose ``args`` are (context, gen_kwargs, doc_to_visual,
        doc_id, task, split), in order, ``batch_size`` per ``generate`` call. A sample whose media
        cannot be read gets "" (and a warning), not a failed run."""
        from tqdm import tqdm

        answers: list[str] = []
        with tqdm(total=len(requests), desc="mmdiff", unit="req", disable=self.rank != 0) as bar:
            for start in range(0, len(requests), self.batch_size):
                batch = [r.args for r in requests[start:start + self.batch_size]]
                media = [self._media(visual, doc_id, task, split) for _, _, visual, doc_id, task, split in batch]
                results = answer_batch(self.model, [context for context, *_ in batch], images=[m[0] for m in media],
                                       audios=[m[1] for m in media], decode=self.decode)
                for (_, gen_kwargs, _, doc_id, task, _), res in zip(batch, results):
                    if isinstance(res, Exception):
                        log.warning("mmdiff lmms-eval plugin: %s doc %s: %s", task, doc_id, res)
                        answers.append("")
                        continue
                    text = res.text
                    for stop in self._stop_strings(gen_kwargs):
                        text = text.split(stop)[0] if stop else text
                    answers.append(text)
                bar.update(len(batch))
        return answers

    def loglikelihood(self, requests: Sequence) -> list[tuple[float, bool]]:
        raise NotImplementedError("mmdiff is a masked-diffusion model: it has no left-to-right log-likelihood, so "
                                  "lmms-eval tasks scored by loglikelihood (output_type: loglikelihood / "
                                  "multiple_choice) are not supported; use generate_until tasks")

    def generate_until_multi_round(self, requests: Sequence) -> list[str]:
        raise NotImplementedError("mmdiff's lmms-eval plugin answers single-round generate_until tasks only")


# -- registration -----------------------------------------------------------------------------------
def manifest():
    """The ``lmms_eval.models`` entry-point payload: a ModelManifest naming :class:`MMDiffLMMS`."""
    _require_lmms_eval()
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Make ``mmdiff`` a model name of lmms-eval's model registry v2 in this process."""
    _require_lmms_eval()
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def main(argv: Sequence[str] | None = None) -> None:
    """lmms-eval's command line with ``--model mmdiff`` available."""
    register()
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    lmms_eval_main()


if __name__ == "__main__":
    main()

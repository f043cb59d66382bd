"""The mmdiff Gradio demo: ask about an image (typed or spoken question) and watch the answer denoise.

Two tabs on one model:

* **Ask**: image + question (+ spoken question, when the model has an audio encoder) -> the answer,
  the response canvas animated step by step (masked positions ▢ filling in, each token coloured by
  the step that fixed it), NFE and latency, and for a spoken question what the model heard (the
  transcript of an ``audio_ctc`` model, as ``mmdiff ask`` prints it). With a test-time search
  (:mod:`mmdiff.search`) on, only the chosen answer is shown, with its NFE and the scored candidates.
* **Structured caption**: image -> schema-valid JSON from a structure prior
  (:func:`mmdiff.tasks.captioning.caption`: the count question first, then the scene template),
  streamed step by step; or, without a prior, "describe the image in json." answered free-form and
  parsed (or a readable parse error).

Each tab has a settings accordion with one control per option of
:class:`~mmdiff.sampling.DecodeConfig` (sampler, cache, token pruning / layer skipping and, on the Ask
tab, the test-time search), derived from the fields' help, choices and ranges (:func:`control`) and
read back by :func:`read_settings`. A new decode option is one new config field. The API names
every input after its control (``image``, ``question``, ``audio``, then the option keys ``gen_length``,
``threshold``, ...: :func:`name_api`), and the settings may be left out (the tab's defaults).

The demo owns no sampling logic and no input checks: :func:`ask_model` answers through
:func:`mmdiff.search.answer` (the CLI's and the eval runner's entry, so a bad image, clip or question
gets the same message as on the command line), :func:`stream_steps` runs it (or
``caption(callback=...)``) in a worker thread and hands its :class:`~mmdiff.sampling.StepEvent` s to
the page as they happen. Started with a shared step-batching engine (``mmdiff demo --engine``,
:mod:`mmdiff.serving.engine`), the Ask tab submits each question to it instead
(:func:`engine_steps`), so concurrent users' answers advance in the same decoder forwards, and the
animation comes from the request's own step events; settings the engine does not batch (token
pruning, layer skipping, block caches, a search) and the caption tab keep their own sampler run.
:func:`world_guide` lists what the shipped model understands, from the world's own constants.
"""
from __future__ import annotations

import html
import inspect
import json
import logging
import queue
import random
import sys
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Sequence, TypeVar

import gradio as gr

from mmdiff import DEFAULT_MODEL_DIR, load
from mmdiff.checkpoints.formats import INDEX_NAME
from mmdiff.data.dataset import SPOKEN_TYPES
from mmdiff.data.questions import QUESTION_TYPES, ask as ask_family
from mmdiff.data.scenes import COLOURS, GRID, IMAGE_SIZE, MAX_OBJECTS, POSITIONS, SHAPES, SIZES, sample_scene, scene_schema
from mmdiff.io import CONFIG_NAME, WEIGHTS_NAME, read_json
from mmdiff.media import MAX_QUESTION_CHARS, read_question
from mmdiff.model import MODEL_TYPE, NO_VISION, GenerationResult, MultimodalDiffusionLM
from mmdiff.options import Option
from mmdiff.sampling import DecodeConfig, SearchConfig, StepEvent
from mmdiff.search import SearchResult, answer
from mmdiff.serving.engine import Engine, QueueFull
from mmdiff.tasks.captioning import CaptionResult, caption
from mmdiff.tasks.presets import JSON_CAPTION, SHORT_ANSWER
from mmdiff.tasks.prompts import CAPTION_JSON_QUESTION, COUNT_QUESTION

log = logging.getLogger("mmdiff.demo")
R = TypeVar("R")
Callback = Callable[[StepEvent], None]

EXAMPLES_FILE = Path("examples") / "examples.json"  # inside the model directory (scripts/make_examples.py)
ASK_DEFAULTS = SHORT_ANSWER
CAPTION_DEFAULTS = JSON_CAPTION
FRAME_DELAY_S = 0.05  # minimum time per animation frame, so fast steps stay visible (latency excludes it)
MAX_FILE_SIZE = "5mb"
QUEUE = dict(default_concurrency_limit=2, max_size=16)
ENGINE_TIMEOUT_S = 120.0  # with the engine: longest wait for a request's next step
NO_QUESTION = "Type a question, or record or upload a spoken one."
NO_IMAGE = "Upload an image (or click an example image) to caption."
#: caption tab: the structure prior (the scene schema through ``caption``), or none (free-form answer)
STRUCTURES = ("scene schema", "none")

#: colour ramp for "fixed at step k" (viridis stops): early steps dark blue, late steps yellow
RAMP: tuple[tuple[int, int, int], ...] = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
#: one style block per rendered canvas; spans then only carry their colour
CANVAS_CSS = (".mm-canvas .mm-tok{display:inline-block;min-width:1.2em;margin:2px 1px;padding:3px 5px;"
              "border-radius:5px;font-family:ui-monospace,monospace;font-size:15px;white-space:pre;text-align:center}"
              ".mm-canvas .mm-note{color:#6b7280;font-size:13px}"
              ".mm-canvas .mm-ramp{display:inline-block;width:120px;height:10px;vertical-align:middle}")
MASKED_STYLE = "background:#e5e7eb;color:#9ca3af;"
PRESET_STYLE = "background:#374151;color:#f9fafb;"
FINAL_STYLE = "background:#dbeafe;color:#1e3a8a;"  # a searched answer: the step order is not shown


# ------------------------------------------------------------------------------------------------
# settings: one control per DecodeConfig option, derived from the fields' help, choices and ranges
# ------------------------------------------------------------------------------------------------
SECTION_TITLES = {"sampler": "Sampler", "": "Cache", "pruning": "Token pruning and layer skipping",
                  "search": "Test-time search"}


def control(opt: Option, value: Any) -> gr.Component:
    """The page control of one decode option (:meth:`DecodeConfig.options`), showing ``value``.

    Choices become a dropdown (several values: multi-select), booleans a checkbox, bounded numbers a
    slider (an optional count's slider starts at 0, meaning "default"), other numbers a number box,
    lists of numbers a text box ("3,4").
    """
    label, info = opt.key.replace("_", " "), opt.help
    if opt.choices is not None:
        return gr.Dropdown(list(opt.choices), value=list(value) if opt.many else value, multiselect=opt.many,
                           label=label, info=info)
    if opt.kind is bool:
        return gr.Checkbox(value=value, label=label, info=info)
    if opt.many:
        return gr.Textbox(",".join(map(str, value)), label=label, placeholder="e.g. 3,4", info=info)
    high = opt.high if opt.high is not None else opt.widget_max
    if high is None:
        return gr.Number(value=value, precision=0 if opt.kind is int else None, label=label, info=info)
    low = 0 if opt.optional or opt.low is None else opt.low
    step = 1 if opt.kind is int else 0.01
    info = info + (" (0 = default)" if opt.optional else "")
    return gr.Slider(low, high, value=value or 0, step=step, label=label, info=info)


def panel_options(*, search: bool = True) -> list[Option]:
    """The options a settings panel shows, in page (and API input) order."""
    return [o for o in DecodeConfig.options() if search or o.section != "search"]


def settings_panel(defaults: DecodeConfig, *, search: bool = True) -> dict[str, gr.Component]:
    """Build the settings accordion, one sub-accordion per section after the sampler's; returns
    option key -> component, in :meth:`DecodeConfig.options` order.

    Args:
        defaults: the tab's decode defaults.
        search: include the test-time search controls.
    """
    values = defaults.values()
    out: dict[str, gr.Component] = {}
    opts = panel_options(search=search)
    with gr.Accordion("Settings", open=False):
        for section in dict.fromkeys(o.section for o in opts):
            inner = [o for o in opts if o.section == section]
            if section == "sampler":
                out.update({o.key: control(o, values[o.key]) for o in inner})
                continue
            with gr.Accordion(SECTION_TITLES[section], open=section == ""):
                out.update({o.key: control(o, values[o.key]) for o in inner})
    return out


def name_api(handler: Callable[..., R], inputs: dict[str, gr.Component], *, required: int) -> Callable[..., R]:
    """Give ``handler`` (which takes the inputs' values in order, the settings as ``*values``) a signature
    naming each input by its key, so that the API (``gradio_client``'s ``view_api``) shows ``question``,
    ``gen_length``, ... instead of ``param_3``, ...; the inputs after the first ``required`` default to
    their control's value, so an API call may leave them out.
    """
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    handler.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, kind, default=inspect.Parameter.empty if i < required else component.value)
         for i, (name, component) in enumerate(inputs.items())])
    return handler


def read_settings(names: Sequence[str], values: Sequence[Any], *, base: DecodeConfig) -> DecodeConfig:
    """Read a panel back into a :class:`DecodeConfig`: options without a control keep ``base``'s
    value; 0 in an optional count (steps, block length) means None, the default.

    Raises:
        ValueError: a value the decode settings reject (the message names the setting).
    """
    by_key = {o.key: o for o in DecodeConfig.options()}
    chosen = {}
    for name, value in zip(names, values, strict=True):
        opt = by_key.get(name)
        if opt is None:
            raise ValueError(f"unknown setting {name!r}")
        try:
            parsed = opt.parse(value)
        except ValueError as e:
            raise ValueError(f"setting {e}") from None
        chosen[name] = None if opt.optional and not opt.many and parsed == 0 else parsed
    return base.with_values(chosen)


# ------------------------------------------------------------------------------------------------
# streaming generation
# ------------------------------------------------------------------------------------------------
class _Stopped(Exception):
    """Raised inside the sampler's callback when the page went away: ends the worker early."""


def stream_steps(run: Callable[..., R]) -> Generator[StepEvent | R, None, None]:
    """Call ``run(callback=...)`` in a worker thread; yield each :class:`StepEvent` as it happens, then
    ``run``'s result.

    The events are sample 0's, copied to the CPU. Closing this generator (the page went away) stops
    the worker at its next step. An exception in ``run`` is raised here.
    """
    items: queue.Queue = queue.Queue()
    stop = threading.Event()
    done = object()

    def callback(event: StepEvent) -> None:
        if stop.is_set():
            raise _Stopped
        items.put(StepEvent(event.step, event.block, event.canvas[0].cpu().clone(), event.fixed[0].cpu().clone()))

    def work() -> None:
        try:
            items.put(_Result(run(callback=callback)))
        except _Stopped:
            pass
        except Exception as e:  # handed to the consumer, which raises it
            items.put(e)
        finally:
            items.put(done)

    threading.Thread(target=work, name="mmdiff-demo-generate", daemon=True).start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, Exception):
                raise item
            yield item.value if isinstance(item, _Result) else item
    finally:
        stop.set()


@dataclass
class _Result:
    """Wraps the worker's result in the queue (it could itself be an exception instance)."""

    value: Any


def engine_steps(engine: Engine, question: str, *, image: str | None, audio: str | None, decode: DecodeConfig,
                 timeout: float = ENGINE_TIMEOUT_S) -> Generator[StepEvent | GenerationResult, None, None]:
    """Submit one question to the shared engine; yield its :class:`~mmdiff.sampling.StepEvent` s as the
    engine steps it among other users' requests, then its result (as :func:`stream_steps` does for a
    run of its own). Closing this generator (the page went away) cancels the request.

    Raises:
        ValueError: an input the engine refuses (the message of ``mmdiff ask``), or a full waiting line.
        TimeoutError: no step for ``timeout`` seconds.
    """
    try:
        handle = engine.submit(question, image=image, audio=audio, decode=decode, stream=True)
    except QueueFull as e:
        raise ValueError(f"The demo is busy ({e}): try again in a moment.") from None
    try:
        yield from handle.events(timeout)
        yield handle.result(timeout)
    finally:
        if not handle.done:
            handle.cancel()


def batches(engine: Engine | None, decode: DecodeConfig) -> bool:
    """Whether ``decode`` is answered through ``engine`` (there is one, and it batches these settings)."""
    if engine is None:
        return False
    try:
        engine.check(decode)
    except ValueError:
        return False
    return True


def animate(model: MultimodalDiffusionLM, steps: Generator[StepEvent | R, None, None], *, planned_steps: int,
            frame_delay: float = FRAME_DELAY_S) -> Iterator[tuple[str, R | None]]:
    """``(canvas HTML, None)`` after every step in ``steps``, then ``(final HTML, result)``.

    Args:
        model: gives the tokenizer for rendering.
        steps: step events, then the result (which needs an ``nfe``): :func:`stream_steps` of
            :func:`ask_model` or :func:`run_caption` with the other arguments bound, or
            :func:`engine_steps`. Several sampler runs in a row (a count question, then the
            caption) each restart the canvas at their step 1. Closed when this generator is.
        planned_steps: the step at the end of the colour ramp.
        frame_delay: minimum seconds per frame.
    """
    tokens: list[int] = []
    fixed_at: list[int] = []
    with closing(steps):
        for item in steps:
            if not isinstance(item, StepEvent):
                yield render_canvas(model, tokens, fixed_at, planned_steps=planned_steps,
                                    header=f"done: {item.nfe} steps"), item
                return
            tokens = item.canvas.tolist()
            if item.step == 1 or len(fixed_at) != len(tokens):
                fixed_at = [0] * len(tokens)  # a new sampler run
            for i in item.fixed.nonzero().flatten().tolist():
                fixed_at[i] = item.step
            yield render_canvas(model, tokens, fixed_at, planned_steps=planned_steps,
                                header=f"step {item.step} · block {item.block + 1}"), None
            time.sleep(frame_delay)


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------
def ramp_colour(frac: float) -> tuple[int, int, int]:
    """The colour at ``frac`` in [0, 1] along :data:`RAMP` (piecewise-linear in RGB)."""
    x = min(max(frac, 0.0), 1.0) * (len(RAMP) - 1)
    i = min(int(x), len(RAMP) - 2)
    t = x - i
    r, g, b = (round(a + (c - a) * t) for a, c in zip(RAMP[i], RAMP[i + 1]))
    return r, g, b


def _step_style(step: int, last: int) -> str:
    r, g, b = ramp_colour((step - 1) / max(last - 1, 1))
    ink = "#111827" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#ffffff"
    return f"background:rgb({r},{g},{b});color:{ink};"


def _visible(text: str) -> str:
    """A token's text as shown: control characters escaped (``\\x0f``, ``\\n``), "·" for empty."""
    return (text if text.isprintable() else text.encode("unicode_escape").decode("ascii")) or "·"


def _span(text: str, style: str, title: str) -> str:
    return f'<span class="mm-tok" style="{style}" title="{html.escape(title)}">{html.escape(text)}</span>'


def render_canvas(model: MultimodalDiffusionLM, tokens: Sequence[int], fixed_at: Sequence[int] | None, *,
                  planned_steps: int, header: str) -> str:
    """HTML of the response canvas, one span per position, decoded token by token.

    Masked positions are a grey ▢; a fixed token is coloured by the step that fixed it (:data:`RAMP`,
    step 1 to ``planned_steps``); a token present before step 1 (a structure prior's) is dark grey.
    EOS / PAD are shown by name, faded; control characters as escapes.

    Args:
        model: gives the tokenizer and the special token ids.
        tokens: (L,) canvas token ids.
        fixed_at: (L,) the step that fixed each position; 0 or -1 = not fixed by a step. None: the
            order is unknown (a searched answer): every token in one light blue.
        planned_steps: the step at the end of the colour ramp (later steps clamp to it).
        header: the line above the canvas.
    """
    sp = model.special
    last = max(planned_steps, *(fixed_at or ()), 1)
    names = {sp.eos: "⟨eos⟩", sp.pad: "⟨pad⟩"}
    spans = []
    for i, tok in enumerate(tokens):
        if tok == sp.mask:
            spans.append(_span("▢", MASKED_STYLE, "masked"))
            continue
        step = None if fixed_at is None else fixed_at[i]
        if step is None:
            style, title = FINAL_STYLE, "chosen by the search (steps not shown)"
        elif step <= 0:
            style, title = PRESET_STYLE, "preset (structure prior)"
        else:
            style, title = _step_style(step, last), f"fixed at step {step}"
        text = names.get(tok) or _visible(model.tokenizer.decode([tok]))
        if tok in names:
            style += "opacity:0.55;"
        spans.append(_span(text, style, title))
    masked = sum(t == sp.mask for t in tokens)
    ramp = ",".join(f"rgb({r},{g},{b})" for r, g, b in RAMP)
    return (f'<div class="mm-canvas"><style>{CANVAS_CSS}</style>'
            f'<div class="mm-note">{html.escape(header)} · {masked} of {len(tokens)} masked</div>'
            f'<div style="line-height:2.1;margin:4px 0">{"".join(spans)}</div>'
            f'<div class="mm-note">{_span("▢", MASKED_STYLE, "masked")} masked &nbsp; fixed at step 1 '
            f'<span class="mm-ramp" style="background:linear-gradient(to right,{ramp})"></span> '
            f"step {last}</div></div>")


def stats_line(result: GenerationResult | SearchResult | CaptionResult) -> str:
    """NFE and latency of a finished answer, as Markdown."""
    return f"**NFE** {result.nfe} · **latency** {result.latency_s * 1000:.0f} ms"


def search_line(result: SearchResult, config: SearchConfig) -> str:
    """A searched answer's cost and its scored candidates (best first), as Markdown."""
    def shown(text: str) -> str:
        return html.escape(text.replace("`", "'")) or "∅"

    scored = ", ".join(f"`{shown(t)}` ({'—' if v is None else f'{v:.3f}'})" for t, v in result.candidates)
    return (f"{stats_line(result)} · **{config.strategy}** search, {config.verifier} verifier: final answer only "
            f"(the steps of a search are not animated) · candidates: {scored}")


def parse_caption(text: str) -> tuple[Any, str]:
    """``(parsed JSON or None, status line)`` for a JSON caption."""
    try:
        return json.loads(text), "✓ valid JSON"
    except json.JSONDecodeError as e:
        return None, f"✗ not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"


# ------------------------------------------------------------------------------------------------
# inputs: uploads, examples, the model directory
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Upload:
    """A file from the page or the API: where gradio stored it, and the name the user gave it."""

    path: str
    name: str

    @classmethod
    def from_payload(cls, payload: dict | str | None) -> "Upload | None":
        """From gradio's unprocessed ``FileData`` dict (or a plain path); None when nothing was given."""
        if not payload:
            return None
        if isinstance(payload, str):
            return cls(payload, Path(payload).name)
        return cls(payload["path"], payload["orig_name"] or Path(payload["path"]).name)


def user_error(e: ValueError, uploads: Sequence[Upload | None]) -> gr.Error:
    """The page's error for ``e``, naming uploads by their own names instead of gradio's temp paths."""
    message = str(e)
    for up in uploads:
        if up is not None:
            message = message.replace(up.path, up.name)
    return gr.Error(message, print_exception=False)


@dataclass(frozen=True)
class Example:
    """One entry of ``<model_dir>/examples/examples.json``, paths resolved."""

    image: str
    question: str  # the typed question (the transcript of ``audio`` on spoken examples)
    audio: str | None  # spoken question (wav), or None
    answer: str  # expected answer, from the data set


def load_examples(model_dir: str | Path) -> list[Example]:
    """The examples shipped beside a model; [] when it has none.

    Raises:
        ValueError: the file exists but is malformed or names missing media.
    """
    path = Path(model_dir) / EXAMPLES_FILE
    if not path.is_file():
        log.info("no %s: the demo shows no examples (write them with scripts/make_examples.py)", path)
        return []
    root = path.parent
    try:
        examples = [Example(str(root / e["image"]), e["question"], str(root / e["audio"]) if e["audio"] else None,
                            e["answer"]) for e in json.loads(path.read_text())["examples"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid examples file ({type(e).__name__}: {e}); "
                         "rewrite it with scripts/make_examples.py") from None
    missing = [p for ex in examples for p in (ex.image, ex.audio) if p is not None and not Path(p).is_file()]
    if missing:
        raise ValueError(f"{path}: {len(missing)} example file(s) missing, e.g. {missing[0]}")
    return examples


def check_model_dir(model_dir: str | Path) -> None:
    """Raise a FileNotFoundError saying what is missing and how to get it."""
    d = Path(model_dir)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (d / name).is_file()]
    if missing == [WEIGHTS_NAME] and (d / INDEX_NAME).is_file():  # a sharded (released) checkpoint
        return
    if not missing:
        return
    what = f"no model directory {d}" if not d.is_dir() else f"model directory {d} has no {' or '.join(missing)}"
    raise FileNotFoundError(f"{what}. Train the shipped model with `make train` (about 56 minutes on 2 CPU "
                            f"cores; it writes {DEFAULT_MODEL_DIR}), or pass --model DIR.")


def ask_model(model: MultimodalDiffusionLM, question: str, *, image: str | None, audio: str | None,
              decode: DecodeConfig, callback: Callback) -> GenerationResult:
    """Answer one question about an image and / or a spoken question, through
    :func:`mmdiff.search.answer` (its input checks included)."""
    return answer(model, [question], images=[image], audios=[audio], decode=decode, callback=callback)[0]


def search_model(model: MultimodalDiffusionLM, question: str, *, image: str | None, audio: str | None,
                 decode: DecodeConfig) -> SearchResult:
    """Answer one question through the test-time search (no step callback: the search runs many
    sampler batches and verifier passes; the page shows its final answer)."""
    return answer(model, [question], images=[image], audios=[audio], decode=decode)[0]


def heard(model: MultimodalDiffusionLM, audio: str | None) -> str:
    """What the model heard in a spoken question ("" without one, or when it cannot say)."""
    return model.transcribe([audio])[0] if audio is not None and model.transcribes else ""


def world_guide(*, seed: int = 0) -> str:
    """What the shipped model understands, as Markdown: its world's shapes, colours, sizes and positions,
    and one example question per family (drawn from test scenes by the question generators)."""
    rng = random.Random(seed)
    examples: dict[str, str] = {}
    while len(examples) < len(QUESTION_TYPES):
        scene = sample_scene(rng, "test")
        for qtype in QUESTION_TYPES:
            if qtype not in examples and (qa := ask_family(scene, rng, qtype)) is not None:
                examples[qtype] = qa.question
    rows = [("shapes", SHAPES), ("colors", COLOURS), ("sizes", SIZES), ("positions", POSITIONS)]
    where = {"caption": f" (settings: gen length {CAPTION_DEFAULTS.sampler.gen_length})",
             "caption_json": " (*Structured caption* tab)"}
    return "\n".join([
        f"The shipped model knows one synthetic world and nothing else: {IMAGE_SIZE} x {IMAGE_SIZE} images of "
        f"1 to {MAX_OBJECTS} objects on a light background, one per cell of a {GRID} x {GRID} grid. "
        "Outside it (other objects, photos, other questions) its answers are confidently wrong.",
        "", "| | |", "|---|---|", *(f"| {name} | {', '.join(values)} |" for name, values in rows), "",
        "| question family | example |", "|---|---|",
        *(f"| {qtype}{where.get(qtype, '')} | {html.escape(examples[qtype])} |" for qtype in QUESTION_TYPES), "",
        f"Spoken questions: the families {', '.join(SPOKEN_TYPES)}.",
    ])


def run_caption(model: MultimodalDiffusionLM, image: str, *, structure: str, decode: DecodeConfig,
                callback: Callback) -> CaptionResult | GenerationResult:
    """Caption ``image`` as JSON.

    ``structure`` "scene schema": :func:`mmdiff.tasks.captioning.caption` decodes schema-valid JSON
    on the scene template, the count question first (its preset tokens show as dark "preset" spans;
    canvas length and steps come from the template). "none": :data:`CAPTION_JSON_QUESTION` answered
    free-form on ``decode``'s canvas.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure prior {structure!r}; known: {', '.join(STRUCTURES)}")
    if structure == "none":
        return model.generate([CAPTION_JSON_QUESTION], images=[image], decode=decode, callback=callback)[0]
    return caption(model, image, format="json", schema=scene_schema(), decode=decode, callback=callback)


# ------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------
def _ask_tab(model: MultimodalDiffusionLM, examples: Sequence[Example], frame_delay: float,
             engine: Engine | None) -> None:
    hears, sees = model.audio is not None, model.vision is not None
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=260,
                             visible=sees, elem_id="image")
            question = gr.Textbox(label="Question", placeholder="how many red circles are there?",
                                  max_length=MAX_QUESTION_CHARS, elem_id="question")
            audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Spoken question",
                             visible=hears, elem_id="audio")
            ask = gr.Button("Ask", variant="primary", elem_id="ask")
            settings = settings_panel(ASK_DEFAULTS)
        with gr.Column():
            canvas = gr.HTML(label="Denoising", elem_id="canvas")
            answer_box = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
            heard_box = gr.Textbox(label="Heard", info="the transcript of the spoken question the model answered",
                                   interactive=False, visible=model.transcribes, elem_id="heard")
            stats = gr.Markdown(label="Cost", elem_id="stats")
    examples = [ex for ex in examples if (hears or ex.audio is None) and sees]  # the media the model reads
    if examples:
        rows = [[ex.image, "" if ex.audio else ex.question] + ([ex.audio] if hears else []) for ex in examples]
        gr.Examples(rows, inputs=[image, question] + ([audio] if hears else []), label="Examples",
                    elem_id="ask-examples")

    def run(image_in: Any, question_in: str, audio_in: Any, *values: Any) -> Iterator[tuple[str, str, str, str]]:
        img, clip = Upload.from_payload(image_in), Upload.from_payload(audio_in)
        try:
            if not question_in.strip() and clip is None:
                raise ValueError(NO_QUESTION)
            read_question(question_in)  # UTF-8, control characters, length (as mmdiff ask)
            chosen = read_settings(list(settings), values, base=ASK_DEFAULTS)
            config, image_path, audio_path = chosen.sampler, img and img.path, clip and clip.path
            if chosen.search.active:
                n = chosen.search.candidates
                yield "", "", "", f"searching ({chosen.search.strategy}, {n} candidates): only the final answer is shown…"
                result = search_model(model, question_in, image=image_path, audio=audio_path, decode=chosen)
                canvas_html = render_canvas(model, result.tokens, None, planned_steps=1,
                                            header=f"{chosen.search.strategy} search: final answer")
                yield canvas_html, result.text, heard(model, audio_path), search_line(result, chosen.search)
                return
            if batches(engine, chosen):
                steps = engine_steps(engine, question_in, image=image_path, audio=audio_path, decode=chosen)
            else:
                steps = stream_steps(partial(ask_model, model, question_in, image=image_path, audio=audio_path,
                                             decode=chosen))
            for html_, result in animate(model, steps, planned_steps=config.steps or config.gen_length,
                                         frame_delay=frame_delay):
                if result is None:
                    yield html_, "", "", "denoising…"
                else:
                    yield html_, result.text, heard(model, audio_path), stats_line(result)
        except ValueError as e:
            raise user_error(e, [img, clip]) from None

    inputs = {"image": image, "question": question, "audio": audio, **settings}
    gr.on([ask.click, question.submit], name_api(run, inputs, required=3), inputs=list(inputs.values()),
          outputs=[canvas, answer_box, heard_box, stats], api_name="ask", preprocess=False)


def _caption_tab(model: MultimodalDiffusionLM, examples: Sequence[Example], frame_delay: float) -> None:
    gr.Markdown(f"With the scene-schema structure prior the model first answers *{COUNT_QUESTION}*, "
                "then fills the slots of a JSON template sized by that count: the caption always validates. "
                f'Without a prior it answers *"{CAPTION_JSON_QUESTION}"* freely and the answer is parsed.')
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=260,
                             elem_id="caption-image")
            structure = gr.Radio(list(STRUCTURES), value=STRUCTURES[0], label="structure prior",
                                 info="scene schema: schema-valid JSON (count question first, canvas and steps "
                                      "from the template); none: free-form answer", elem_id="caption-structure")
            describe = gr.Button("Describe as JSON", variant="primary", elem_id="caption")
            settings = settings_panel(CAPTION_DEFAULTS, search=False)
        with gr.Column():
            canvas = gr.HTML(label="Denoising", elem_id="caption-canvas")
            status = gr.Markdown(label="Status", elem_id="caption-status")
            parsed = gr.JSON(label="Parsed caption", open=True, elem_id="caption-json")
            raw = gr.Textbox(label="Raw answer", interactive=False, elem_id="caption-raw")
    pictures = list(dict.fromkeys(ex.image for ex in examples))
    if pictures:
        gr.Examples([[p] for p in pictures], inputs=[image], label="Example images", elem_id="caption-examples")

    def run(image_in: Any, structure_in: str, *values: Any) -> Iterator[tuple[str, str, Any, str]]:
        img = Upload.from_payload(image_in)
        try:
            if model.vision is None:
                raise ValueError(NO_VISION)
            if img is None:
                raise ValueError(NO_IMAGE)
            chosen = read_settings(list(settings), values, base=CAPTION_DEFAULTS)
            config, prior = chosen.sampler, structure_in != "none"
            call = partial(run_caption, model, img.path, structure=structure_in, decode=chosen)
            planned = (config.steps or 1) if prior else (config.steps or config.gen_length)  # prior: the template's
            for html_, result in animate(model, stream_steps(call), planned_steps=planned, frame_delay=frame_delay):
                if result is None:
                    yield html_, "denoising…", None, ""
                    continue
                if isinstance(result, CaptionResult):
                    count = "" if result.count is None else f" · count question: {result.count}"
                    verdict, value = f"✓ valid JSON, matches the {structure_in}{count}", result.data
                else:
                    value, verdict = parse_caption(result.text)
                yield html_, f"{verdict} · {stats_line(result)}", value, result.text
        except ValueError as e:
            raise user_error(e, [img]) from None

    inputs = {"image": image, "structure": structure, **settings}
    describe.click(name_api(run, inputs, required=2), inputs=list(inputs.values()),
                   outputs=[canvas, status, parsed, raw], api_name="caption", preprocess=False)


def build_app(model_dir: str, *, frame_delay: float = FRAME_DELAY_S, engine: Engine | None = None,
              dtype: str = "auto", device: str = "cpu") -> gr.Blocks:
    """The demo page for the model in ``model_dir``, queued (2 concurrent answers, 16 waiting; with an
    engine, as many concurrent answers as it steps at once and as many waiting as it queues).

    Args:
        model_dir: any directory :func:`mmdiff.load` reads (mmdiff's own, with an optional
            ``examples/examples.json``; a released checkpoint). A model without a vision encoder
            gets no image input and its caption tab refuses; without an audio encoder, no clip input.
        frame_delay: minimum seconds per animation frame (0 in tests).
        engine: a step-batching engine on this directory's model, shared by every user of the Ask
            tab; the caller starts and stops it (:func:`main`). None: each answer runs on its own.
        dtype, device: how the model is loaded (:func:`mmdiff.load`; not used with ``engine``).

    Raises:
        FileNotFoundError: the model directory or its weights are missing (the message says how to
            get them).
        ValueError: a malformed model or examples file.
    """
    check_model_dir(model_dir)
    model = engine.model if engine is not None else load(model_dir, dtype=dtype, device=device)
    examples = load_examples(model_dir)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    hears = "a typed or spoken question" if model.audio is not None else "a typed question (no audio encoder)"
    hears += " about an image" if model.vision is not None else " (text only: no vision encoder)"
    with gr.Blocks(title="mmdiff demo", analytics_enabled=False) as app:
        gr.Markdown(f"## mmdiff: multimodal masked diffusion\nModel `{model_dir}` ({n_params:.1f} M parameters) "
                    f"answers {hears}. The answer starts fully masked and is filled in over "
                    "the denoising steps; each token is coloured by the step that fixed it.")
        if read_json(Path(model_dir) / CONFIG_NAME).get("model_type") == MODEL_TYPE:  # mmdiff's synthetic world
            with gr.Accordion("What the model understands", open=False, elem_id="world"):
                gr.Markdown(world_guide(), elem_id="world-guide")
        with gr.Tab("Ask"):
            _ask_tab(model, examples, frame_delay, engine)
        with gr.Tab("Structured caption"):
            _caption_tab(model, examples, frame_delay)
    if engine is None:
        return app.queue(**QUEUE)
    return app.queue(default_concurrency_limit=engine.max_batch, max_size=engine.max_batch + engine.max_queue)


def serve(app: gr.Blocks, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Launch ``app`` with the demo's limits (5 MB uploads, errors shown in the page); returns its URL.

    Args:
        app: from :func:`build_app`.
        host: interface to bind; the default serves this machine only.
        port: TCP port.
        block: keep serving until interrupted; False returns at once (tests).
    """
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False,
                           show_error=True, max_file_size=MAX_FILE_SIZE, ssr_mode=False, quiet=not block)
    return url


def main(model_dir: str = DEFAULT_MODEL_DIR, *, host: str = "127.0.0.1", port: int = 7860,
         max_batch: int | None = None, dtype: str = "auto", device: str = "cpu") -> None:
    """Build the demo on ``model_dir`` (loaded in ``dtype`` on ``device``: :func:`mmdiff.load`) and
    serve it until interrupted (``mmdiff demo``); with ``max_batch``, the Ask tab answers through a
    shared engine stepping that many requests at once (``mmdiff demo --engine``)."""
    if max_batch is None:
        serve(build_app(model_dir, dtype=dtype, device=device), host=host, port=port)
        return
    check_model_dir(model_dir)
    engine = Engine(load(model_dir, dtype=dtype, device=device), max_batch=max_batch).start()
    try:
        serve(build_app(model_dir, engine=engine), host=host, port=port)
    finally:
        engine.stop()


if __name__ == "__main__":
    from mmdiff.cli import main as cli_main

    raise SystemExit(cli_main(["demo", *sys.argv[1:]]))

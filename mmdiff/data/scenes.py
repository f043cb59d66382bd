"""The synthetic scene world: coloured shapes on a 3x3 grid, sampled from a seed and rendered with PIL.

A scene is a set of objects, each in its own grid cell (so objects never overlap), on a light
background. The scene content (objects, not the background) decides its split through a hash,
so the same content can never be in two splits.

The constants below are the single source of truth for the world's vocabulary; the question
generator, the dataset writer and the vision-encoder pretraining labels all read them from here.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "brown")
#: saturated, clearly distinct RGB values, all far from the light backgrounds (channels 200-255)
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 60, 230),
    "yellow": (235, 200, 0),
    "purple": (130, 30, 180),
    "orange": (255, 120, 0),
    "cyan": (0, 190, 210),
    "brown": (120, 70, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
GRID = 3  # the scene is a GRID x GRID grid of cells
IMAGE_SIZE = 64  # rendered images are IMAGE_SIZE x IMAGE_SIZE RGB
POSITIONS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)  # cell names in reading order (index = row * GRID + col)
SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_OBJECTS = 6  # a scene holds 1..MAX_OBJECTS objects

CELL_PX = IMAGE_SIZE / GRID  # cell side in pixels (21.33)
SIZE_PX: dict[str, float] = {"small": 8.0, "large": 15.0}  # object width/height in pixels
JITTER_PX = 2.0  # max offset of an object's centre from its cell centre
COLOUR_JITTER = 10  # max per-channel offset of an object's colour (when render gets an rng)
BACKGROUND_RANGE = (200, 255)  # per-channel range of the light background
SUPERSAMPLE = 4  # draw at this multiple of IMAGE_SIZE, then box-filter down (anti-aliasing)

assert len(POSITIONS) == GRID * GRID and len(COLOUR_RGB) == len(COLOURS)
assert SIZE_PX["large"] / 2 + JITTER_PX < CELL_PX / 2, "objects must stay inside their cell"


@dataclass(frozen=True)
class Obj:
    """One object of a scene.

    Args:
        shape: one of :data:`SHAPES`.
        colour: one of :data:`COLOURS`.
        size: one of :data:`SIZES`.
        row: grid row, 0 (top) .. GRID-1.
        col: grid column, 0 (left) .. GRID-1.
    """

    shape: str
    colour: str
    size: str
    row: int
    col: int

    def __post_init__(self) -> None:
        for name, value, known in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                   ("size", self.size, SIZES)):
            if value not in known:
                raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
        if not (0 <= self.row < GRID and 0 <= self.col < GRID):
            raise ValueError(f"cell ({self.row}, {self.col}) is outside the {GRID}x{GRID} grid")

    @property
    def cell(self) -> int:
        """Cell index in reading order (row * GRID + col)."""
        return self.row * GRID + self.col

    @property
    def position(self) -> str:
        """Cell name, one of :data:`POSITIONS`."""
        return POSITIONS[self.cell]

    def describe(self, with_size: bool = False) -> str:
        """Noun phrase without article: "red circle", or "small red circle" with ``with_size``.

        Args:
            with_size: prefix the size word.
        """
        words = ([self.size] if with_size else []) + [self.colour, self.shape]
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    """A set of objects in distinct cells, on a background colour.

    Args:
        objects: the objects; kept sorted in reading order (by cell) so equal contents compare equal.
        background: RGB background colour.
    """

    objects: tuple[Obj, ...]
    background: tuple[int, int, int]

    def __post_init__(self) -> None:
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects share a cell: cells {sorted(cells)}")
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.cell)))

    def fingerprint(self) -> str:
        """Stable sha1 hex digest of the objects (background excluded): the identity of the content."""
        text = ";".join(f"{o.row},{o.col},{o.shape},{o.colour},{o.size}" for o in self.objects)
        return hashlib.sha1(text.encode()).hexdigest()

    def split(self) -> str:
        """The split this content belongs to: fingerprint bucket mod 10, 0-7 train, 8 val, 9 test."""
        bucket = int(self.fingerprint(), 16) % 10
        return "train" if bucket < 8 else ("val" if bucket == 8 else "test")

    def at(self, row: int, col: int) -> Obj | None:
        """The object in cell (row, col), or None when the cell is empty."""
        for o in self.objects:
            if o.row == row and o.col == col:
                return o
        return None


def check_split(split: str) -> str:
    """Return ``split`` or raise a ValueError listing the known splits.

    Args:
        split: a split name.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return split


def sample_scene(rng: random.Random, split: str) -> Scene:
    """Sample a scene whose content hashes to ``split`` (rejection sampling, ~1.25-10 draws).

    1..MAX_OBJECTS objects in distinct cells with uniform shape / colour / size, on a light
    background (each channel in BACKGROUND_RANGE).

    Args:
        rng: the random source; the result is a pure function of its state.
        split: "train", "val" or "test".
    """
    check_split(split)
    while True:
        n = rng.randint(1, MAX_OBJECTS)
        cells = rng.sample(range(GRID * GRID), n)
        objects = tuple(
            Obj(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), cell // GRID, cell % GRID)
            for cell in cells
        )
        background = tuple(rng.randint(*BACKGROUND_RANGE) for _ in range(3))
        scene = Scene(objects, background)  # type: ignore[arg-type]
        if scene.split() == split:
            return scene


def object_box(obj: Obj, dx: float = 0.0, dy: float = 0.0) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) in image pixels of ``obj`` centred in its cell plus (dx, dy).

    Args:
        obj: the object.
        dx: horizontal offset of the centre, |dx| <= JITTER_PX keeps the box inside the cell.
        dy: vertical offset of the centre.
    """
    cx = (obj.col + 0.5) * CELL_PX + dx
    cy = (obj.row + 0.5) * CELL_PX + dy
    half = SIZE_PX[obj.size] / 2
    return (cx - half, cy - half, cx + half, cy + half)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                fill: tuple[int, int, int]) -> None:
    """Draw ``shape`` filling ``box`` (already in supersampled pixel coordinates)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        t = (x1 - x0) / 3  # arm thickness: a third of the width
        draw.rectangle((x0, y0 + t, x1, y1 - t), fill=fill)
        draw.rectangle((x0 + t, y0, x1 - t, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, rng: random.Random | None = None) -> Image.Image:
    """Draw ``scene`` as an IMAGE_SIZE x IMAGE_SIZE RGB image.

    Objects are drawn at SUPERSAMPLE x resolution and box-filtered down, so edges are anti-aliased
    and nothing bleeds outside an object's box. Without ``rng`` every object is centred in its cell
    in its exact colour; with ``rng`` the centre moves by up to JITTER_PX and each channel by up to
    COLOUR_JITTER.

    Args:
        scene: the scene to draw.
        rng: optional random source for position and colour jitter.
    """
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        dx = dy = 0.0
        fill = COLOUR_RGB[obj.colour]
        if rng is not None:
            dx, dy = rng.uniform(-JITTER_PX, JITTER_PX), rng.uniform(-JITTER_PX, JITTER_PX)
            fill = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in fill)
        box = tuple(v * SUPERSAMPLE for v in object_box(obj, dx, dy))
        _draw_shape(draw, obj.shape, box, fill)  # type: ignore[arg-type]
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def cell_labels(scene: Scene) -> dict[str, list[int]]:
    """Per-cell classification targets in reading order, for vision-encoder pretraining.

    Each list has GRID*GRID entries: 0 for an empty cell, otherwise the attribute's index in
    SHAPES / COLOURS / SIZES plus one.

    Args:
        scene: the scene to label.
    """
    labels = {"shape": [0] * (GRID * GRID), "colour": [0] * (GRID * GRID), "size": [0] * (GRID * GRID)}
    for o in scene.objects:
        labels["shape"][o.cell] = SHAPES.index(o.shape) + 1
        labels["colour"][o.cell] = COLOURS.index(o.colour) + 1
        labels["size"][o.cell] = SIZES.index(o.size) + 1
    return labels


def scene_schema() -> dict:
    """The scene-caption schema: the objects of :func:`mmdiff.data.questions.caption_json`, in reading
    order, each with enum fields shape / color / size / position (vocabularies of ``data.scenes``)."""
    fields = {"shape": SHAPES, "color": COLOURS, "size": SIZES, "position": POSITIONS}
    item = {"type": "object", "properties": {k: {"type": "string", "enum": list(v)} for k, v in fields.items()},
            "required": list(fields), "additionalProperties": False}
    return {"type": "array", "items": item, "minItems": 1, "maxItems": MAX_OBJECTS}

"""A procedurally generated "shapes" world: small images of coloured shapes with questions and answers.

Notable features:
- Fully deterministic: one integer seed gives one scene, one rendered image and one question/answer.
- Scenes are unambiguous by construction: 1 to 3 shapes, each of a different kind, each in its own cell
  of a 2x2 grid, so "the circle", "top left", "left of" and every count have exactly one right answer.
- Five question types (shape, colour, count, position, caption) with short canonical answers, so a model
  is scored by exact match.
- Train and held-out data come from disjoint seed ranges (`TRAIN_SEEDS`, `HELDOUT_SEEDS`).
- Images are 112x112 by default: with Qwen2-VL's patch 14 and merge 2 that is 16 image tokens.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 170),
    "orange": (245, 130, 0),
}
CELLS = ("top left", "top right", "bottom left", "bottom right")  # index = 2 * row + col
QUESTION_TYPES = ("shape", "colour", "count", "position", "caption")
NUMBER_WORDS = ("0", "1", "2", "3")

TRAIN_SEEDS = range(1_000_000_000)
HELDOUT_SEEDS = range(1_000_000_000, 1_001_000_000)

IMAGE_SIZE = 112
_SUPERSAMPLE = 4  # draw large, then downscale: smooth edges without any drawing library beyond Pillow
_POSITION_JITTER = 0.06  # fraction of a cell side; with the largest radius a shape still fits its cell
_GRADIENT = 24  # background levels faded across the image (see _background)
_COLOUR_JITTER = 20  # per-channel jitter so a model learns colour names, not eight exact RGB triples


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # one of COLOURS
    rgb: tuple[int, int, int]  # the drawn colour (the named colour plus a little jitter)
    cell: int  # index into CELLS
    center: tuple[float, float]  # (x, y) in pixels of the final image
    radius: float  # half the shape's extent, in pixels

    @property
    def row(self) -> int:
        return self.cell // 2

    @property
    def col(self) -> int:
        return self.cell % 2


@dataclass(frozen=True)
class Scene:
    size: int  # image side in pixels
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]  # in reading order (by cell)


@dataclass(frozen=True)
class Sample:
    seed: int
    qtype: str  # one of QUESTION_TYPES
    question: str
    answer: str
    scene: Scene

    def image(self) -> Image.Image:
        return render(self.scene)


# ---------------------------------------------------------------------------------------------- scenes


def make_scene(rng: random.Random, size: int = IMAGE_SIZE) -> Scene:
    n = rng.randint(1, 3)
    kinds = rng.sample(KINDS, n)
    cells = sorted(rng.sample(range(4), n))
    shapes = tuple(_make_shape(rng, kind, cell, size) for kind, cell in zip(kinds, cells))
    light = rng.randint(225, 255)
    background = tuple(min(255, light + rng.randint(-8, 0)) for _ in range(3))
    return Scene(size=size, background=background, shapes=shapes)


def _make_shape(rng: random.Random, kind: str, cell: int, size: int) -> Shape:
    # A shape sits near the centre of its cell: a cell of a 112-pixel image is exactly 4x4 patches (2x2 image
    # tokens), so a shape always covers the same patches and a tiny vision tower learns its outline in a few
    # thousand steps; shapes free to roam across patch borders took far longer to tell apart.
    half = size / 2
    radius = rng.uniform(0.28, 0.40) * half
    x = ((cell % 2) + 0.5 + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)) * half
    y = ((cell // 2) + 0.5 + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)) * half
    colour = rng.choice(list(COLOURS))
    rgb = tuple(max(0, min(255, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in COLOURS[colour])
    return Shape(kind=kind, colour=colour, rgb=rgb, cell=cell, center=(x, y), radius=radius)


# ------------------------------------------------------------------------------------------- rendering


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of `scene.size` pixels square."""
    big = scene.size * _SUPERSAMPLE
    image = _background(scene.background, big)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape, _SUPERSAMPLE)
    return image.resize((scene.size, scene.size), Image.Resampling.LANCZOS)


def _background(rgb: tuple[int, int, int], size: int) -> Image.Image:
    """The light background, its red fading to the right and its green downwards by up to _GRADIENT levels.

    Qwen2-VL's vision tower has no absolute position embedding (only relative rotary), so a patch of plain
    background looks the same anywhere and a tiny tower never learns where a patch is; the faint gradient
    tells every patch its place, which "Where is the star?" needs once the star is found by what it is."""
    down, right = _ramps(size)
    red = right.point(lambda v: rgb[0] - round(_GRADIENT * v / 255))
    green = down.point(lambda v: rgb[1] - round(_GRADIENT * v / 255))
    return Image.merge("RGB", (red, green, Image.new("L", (size, size), rgb[2])))


@functools.lru_cache(maxsize=4)
def _ramps(size: int) -> tuple[Image.Image, Image.Image]:
    """(0 at the top .. 255 at the bottom, 0 at the left .. 255 at the right), `size` pixels square; the same
    for every scene, so made once (a quarter of a render's time otherwise)."""
    down = Image.linear_gradient("L").resize((size, size))
    return down, down.transpose(Image.Transpose.ROTATE_90)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, scale: int) -> None:
    x, y = shape.center[0] * scale, shape.center[1] * scale
    r = shape.radius * scale
    if shape.kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=shape.rgb)
    elif shape.kind == "square":
        s = r * 0.85  # a square of side 2r looks much bigger than a circle of radius r
        draw.rectangle((x - s, y - s, x + s, y + s), fill=shape.rgb)
    elif shape.kind == "triangle":
        draw.polygon(_regular_polygon(x, y + 0.25 * r, r * 1.1, 3), fill=shape.rgb)
    else:
        draw.polygon(_star(x, y, r), fill=shape.rgb)


def _regular_polygon(x: float, y: float, r: float, n: int) -> list[tuple[float, float]]:
    # first vertex straight up (y grows downwards in images)
    return [(x + r * math.sin(2 * math.pi * i / n), y - r * math.cos(2 * math.pi * i / n)) for i in range(n)]


def _star(x: float, y: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else 0.45 * r
        angle = math.pi * i / 5
        points.append((x + radius * math.sin(angle), y - radius * math.cos(angle)))
    return points


# ------------------------------------------------------------------------------------------- questions


def caption(scene: Scene) -> str:
    """'a red circle', 'a red circle left of a blue square', 'a red circle, a blue square and a green star'."""
    names = [f"{_article(s.colour)} {s.colour} {s.kind}" for s in scene.shapes]
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        a, b = scene.shapes  # reading order: a is above b, or left of it in the same row
        relation = "above" if a.col == b.col else "left of" if a.col < b.col else "right of"
        return f"{names[0]} {relation} {names[1]}"
    return f"{names[0]}, {names[1]} and {names[2]}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def ask(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair of the given type about the scene."""
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}: use one of {QUESTION_TYPES}")
    return _ASKERS[qtype](scene, rng)


def _ask_shape(scene: Scene, rng: random.Random) -> tuple[str, str]:
    shape = rng.choice(scene.shapes)
    if len(scene.shapes) == 1 and rng.random() < 0.5:
        return rng.choice(("What shape is this?", "What shape is in the picture?")), shape.kind
    return f"What shape is at the {CELLS[shape.cell]}?", shape.kind


def _ask_colour(scene: Scene, rng: random.Random) -> tuple[str, str]:
    shape = rng.choice(scene.shapes)
    word = rng.choice(("colour", "color"))
    return f"What {word} is the {shape.kind}?", shape.colour


def _ask_count(scene: Scene, rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        return "How many shapes are there?", NUMBER_WORDS[len(scene.shapes)]
    colour = rng.choice([s.colour for s in scene.shapes] + list(COLOURS))  # present colours asked more often
    n = sum(s.colour == colour for s in scene.shapes)
    return f"How many {colour} shapes are there?", NUMBER_WORDS[n]


def _ask_position(scene: Scene, rng: random.Random) -> tuple[str, str]:
    pairs = [(a, b) for a in scene.shapes for b in scene.shapes if a is not b]
    if not pairs or rng.random() < 0.5:
        shape = rng.choice(scene.shapes)
        return f"Where is the {shape.kind}?", CELLS[shape.cell]
    a, b = rng.choice(pairs)
    if a.col != b.col and (a.row == b.row or rng.random() < 0.5):
        return f"Is the {a.kind} left or right of the {b.kind}?", "left" if a.col < b.col else "right"
    return f"Is the {a.kind} above or below the {b.kind}?", "above" if a.row < b.row else "below"


def _ask_caption(scene: Scene, rng: random.Random) -> tuple[str, str]:
    question = rng.choice(("What is in the picture?", "Describe the picture.", "What do you see?"))
    return question, caption(scene)


_ASKERS = {
    "shape": _ask_shape,
    "colour": _ask_colour,
    "count": _ask_count,
    "position": _ask_position,
    "caption": _ask_caption,
}


def sample(seed: int, qtype: str | None = None, size: int = IMAGE_SIZE) -> Sample:
    """The sample of one seed. Without `qtype` the seed also picks the question type."""
    rng = random.Random(seed)
    scene = make_scene(rng, size)
    qtype = qtype or rng.choice(QUESTION_TYPES)
    question, answer = ask(scene, qtype, rng)
    return Sample(seed=seed, qtype=qtype, question=question, answer=answer, scene=scene)


def samples(seeds: range, qtype: str | None = None, size: int = IMAGE_SIZE) -> list[Sample]:
    return [sample(seed, qtype, size) for seed in seeds]


def example_scene(size: int = IMAGE_SIZE) -> Scene:
    """The scene of examples/shapes.png: a red circle at the top left and a blue square at the bottom right.

    Its caption is "a red circle left of a blue square".
    """
    half = size / 2
    circle = Shape("circle", "red", COLOURS["red"], 0, (0.5 * half, 0.5 * half), 0.34 * half)
    square = Shape("square", "blue", COLOURS["blue"], 3, (1.5 * half, 1.5 * half), 0.34 * half)
    return Scene(size=size, background=(245, 245, 245), shapes=(circle, square))

"""The toy-faces world: a procedural renderer of colourful cartoon faces with exact ground truth.

Every image is drawn from a :class:`FaceParams` (deterministic from a seed by :func:`sample_params`), with
numpy and PIL only: shapes are polygons built in a face-local frame, posed (yaw on a cylinder-like face
surface, roll, scale, translation), drawn at ``SUPERSAMPLE`` x the output size and box-downsampled. The
ground truth comes from the same geometry that is drawn:

* ``landmarks`` -- ``LANDMARK_NAMES`` points ``[x, y]`` in pixels of the output size, pixel centres at
  integers (pixel ``(i, j)`` is centred on ``x = i, y = j``). "left"/"right" mean the image's left/right
  (the viewer's), not the subject's.
* ``continuous`` -- the ``CONTINUOUS`` attributes, each in ``[0, 1]``.
* ``categorical`` -- the class index of every ``CATEGORICAL`` attribute (in the dict's key order).
* ``caption`` -- an English description made of the words in ``VOCABULARY``.

Seeds: training seeds are drawn from ``[0, HELD_OUT_OFFSET)``; held-out seed ``i`` is
``HELD_OUT_OFFSET + i`` (:func:`held_out_seeds`), so no training stream can see a held-out face.

Edits are local by construction: ``smile`` and ``mouth_width`` move only the mouth corners, ``mouth_open``
only the lips, ``eye_open`` only the eyelid points, ``gaze`` only the pupils, ``brow_raise``/``brow_tilt``
only the brow points, ``eye_spacing``/``eye_height``/``eye_size`` the eye points (and the pupils and brows,
which sit on the eyes), ``nose_size`` only the nose tip and only under yaw (the tip is the centre of the
nose, which sticks out further when bigger), ``head_yaw``/``head_roll`` and the pose fields everything.
Yaw turns the face on a cylinder-like surface: features shift and squash, the silhouette stays except its
lower half, which follows the chin half-way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 256
#: Drawing happens at SUPERSAMPLE x the output size, then a box filter downsamples (anti-aliasing).
SUPERSAMPLE = 2
#: Held-out seed i is HELD_OUT_OFFSET + i; training seeds lie in [0, HELD_OUT_OFFSET).
HELD_OUT_OFFSET = 2_000_000_000
#: Seeds must lie in [0, MAX_SEED).
MAX_SEED = 2**63
#: The two seed ranges (``seed in HELD_OUT_SEEDS``): training streams draw from TRAIN_SEEDS only.
TRAIN_SEEDS = range(0, HELD_OUT_OFFSET)
HELD_OUT_SEEDS = range(HELD_OUT_OFFSET, MAX_SEED)

LANDMARK_NAMES: tuple[str, ...] = (
    "left_eye_outer", "left_eye_inner", "right_eye_inner", "right_eye_outer",
    "left_eye_top", "left_eye_bottom", "right_eye_top", "right_eye_bottom",
    "left_pupil", "right_pupil",
    "left_brow_outer", "left_brow_inner", "right_brow_inner", "right_brow_outer",
    "nose_tip",
    "mouth_left", "mouth_right", "upper_lip", "lower_lip",
    "chin", "left_jaw", "right_jaw",
)  # fmt: skip
LANDMARK_INDEX: dict[str, int] = {n: i for i, n in enumerate(LANDMARK_NAMES)}

#: Continuous attributes, each in [0, 1] (0.5 is the neutral value where one makes sense).
CONTINUOUS: tuple[str, ...] = (
    "smile",  # 0 frown .. 0.5 neutral .. 1 smile (mouth corners down/up)
    "mouth_open",  # 0 closed .. 1 wide open (lips apart)
    "mouth_width",  # 0 narrow .. 1 wide
    "eye_open",  # 0 sleepy (nearly closed) .. 1 wide open
    "eye_size",  # 0 small .. 1 big
    "eye_spacing",  # 0 close together .. 1 far apart
    "eye_height",  # 0 high on the face .. 1 low
    "gaze",  # 0 looking to the image's left .. 1 to its right (pupils inside the eyes)
    "brow_raise",  # 0 lowered .. 1 raised
    "brow_tilt",  # 0 worried (inner ends up) .. 1 angry (inner ends down)
    "nose_size",  # 0 small .. 1 big
    "face_width",  # 0 narrow .. 1 wide, relative to the head shape's range
    "head_yaw",  # 0 turned to the image's left .. 0.5 frontal .. 1 turned right
    "head_roll",  # 0 tilted anticlockwise (on screen) .. 0.5 upright .. 1 clockwise
)
CONTINUOUS_INDEX: dict[str, int] = {n: i for i, n in enumerate(CONTINUOUS)}

CATEGORICAL: dict[str, tuple[str, ...]] = {
    "head_shape": ("oval", "round", "square", "heart"),
    "skin_tone": ("pale", "light", "tan", "brown", "dark"),
    "hair_colour": ("black", "brown", "blonde", "red", "grey", "blue", "pink", "green"),
    "hair_style": ("bald", "short", "long", "spiky", "bob", "afro"),
    "iris_colour": ("blue", "green", "brown", "violet"),
    "background_colour": ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "grey", "white"),
    "glasses": ("none", "round", "square"),
    "hat": ("none", "cap", "beanie", "tophat"),
    "beard": ("none", "moustache", "goatee", "full"),
}
CATEGORICAL_NAMES: tuple[str, ...] = tuple(CATEGORICAL)

# Sampling probabilities of the categorical attributes (uniform where not listed).
_CLASS_PROBS: dict[str, tuple[float, ...]] = {
    "hair_style": (0.08, 0.2, 0.2, 0.18, 0.18, 0.16),
    "glasses": (0.5, 0.25, 0.25),
    "hat": (0.55, 0.15, 0.15, 0.15),
    "beard": (0.55, 0.15, 0.15, 0.15),
}

# Palettes (RGB). Per-image jitter stays small so that the classes never overlap.
_SKIN = {
    "pale": (252, 226, 212),
    "light": (238, 194, 152),
    "tan": (206, 150, 100),
    "brown": (148, 96, 60),
    "dark": (88, 56, 38),
}
_HAIR = {
    "black": (28, 26, 30),
    "brown": (100, 58, 28),
    "blonde": (240, 204, 96),
    "red": (204, 58, 28),
    "grey": (168, 168, 174),
    "blue": (48, 96, 224),
    "pink": (244, 108, 184),
    "green": (56, 172, 76),
}
_IRIS = {"blue": (56, 120, 228), "green": (40, 168, 72), "brown": (112, 66, 30), "violet": (150, 72, 210)}
_BACKGROUND = {
    "red": (222, 78, 78),
    "orange": (242, 158, 56),
    "yellow": (240, 222, 86),
    "green": (108, 192, 98),
    "teal": (56, 182, 170),
    "blue": (88, 138, 232),
    "purple": (160, 108, 212),
    "pink": (242, 152, 192),
    "grey": (168, 168, 172),
    "white": (242, 242, 236),
}
_SHIRTS = ((200, 40, 60), (40, 80, 180), (40, 140, 80), (240, 200, 40), (110, 60, 160), (30, 30, 40),
           (240, 240, 240), (230, 110, 30))  # fmt: skip
_HATS = ((200, 30, 40), (30, 60, 170), (20, 20, 24), (40, 130, 70), (230, 190, 30), (130, 70, 170),
         (240, 120, 30), (90, 90, 100))  # fmt: skip
_FRAMES = ((20, 20, 24), (120, 20, 30), (20, 40, 110), (180, 140, 40))

# Pose ranges.
_MAX_YAW = math.radians(24.0)
_MAX_ROLL = math.radians(12.0)
_HEAD_CENTRE = (127.5, 134.0)  # design pixels of a 256 image
_HEAD_HALF_HEIGHT = 76.0
# Head half-width / half-height per shape: face_width spans [lo, hi].
_SHAPE_RATIO = {"oval": (0.70, 0.79), "round": (0.88, 0.97), "square": (0.76, 0.86), "heart": (0.78, 0.88)}


@dataclass(frozen=True)
class FaceParams:
    """Every rendering parameter. Continuous attributes in [0, 1]; categorical ones as class names;
    the rest are nuisance parameters (pose jitter, details) that no attribute or caption reports."""

    # continuous attributes (CONTINUOUS)
    smile: float = 0.5
    mouth_open: float = 0.0
    mouth_width: float = 0.5
    eye_open: float = 0.7
    eye_size: float = 0.5
    eye_spacing: float = 0.5
    eye_height: float = 0.5
    gaze: float = 0.5
    brow_raise: float = 0.5
    brow_tilt: float = 0.5
    nose_size: float = 0.5
    face_width: float = 0.5
    head_yaw: float = 0.5
    head_roll: float = 0.5
    # categorical attributes (CATEGORICAL)
    head_shape: str = "oval"
    skin_tone: str = "light"
    hair_colour: str = "brown"
    hair_style: str = "short"
    iris_colour: str = "blue"
    background_colour: str = "blue"
    glasses: str = "none"
    hat: str = "none"
    beard: str = "none"
    # nuisance parameters
    scale: float = 1.0  # [0.92, 1.08] head scale
    shift_x: float = 0.0  # [-8, 8] design pixels
    shift_y: float = 0.0  # [-6, 6] design pixels
    hairline: float = 0.5  # [0, 1] forehead height of the hairline
    brow_thickness: float = 0.5  # [0, 1]
    ear_size: float = 0.5  # [0, 1]
    nose_style: int = 0  # 0 ball, 1 ball with nostrils, 2 hook
    blush: bool = False
    detail_seed: int = 0  # colour jitter, background decoration, shirt/hat/frame colours

    def __post_init__(self) -> None:
        for name in CONTINUOUS:
            _check_range(name, getattr(self, name), 0.0, 1.0)
        for name, classes in CATEGORICAL.items():
            value = getattr(self, name)
            if value not in classes:
                raise ValueError(f"{name} must be one of {', '.join(classes)}; got {value!r}")
        _check_range("scale", self.scale, 0.92, 1.08)
        _check_range("shift_x", self.shift_x, -8.0, 8.0)
        _check_range("shift_y", self.shift_y, -6.0, 6.0)
        for name in ("hairline", "brow_thickness", "ear_size"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        if self.nose_style not in (0, 1, 2):
            raise ValueError(f"nose_style must be 0, 1 or 2; got {self.nose_style!r}")
        if not (isinstance(self.detail_seed, (int, np.integer)) and 0 <= int(self.detail_seed) < MAX_SEED):
            raise ValueError(f"detail_seed must be an integer in [0, 2**63); got {self.detail_seed!r}")

    def replace(self, **changes) -> FaceParams:
        """A copy with ``changes`` applied (validated like the constructor)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown FaceParams field(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def continuous(self) -> np.ndarray:
        """The ``CONTINUOUS`` attributes as float32 ``[K]``."""
        return np.array([getattr(self, n) for n in CONTINUOUS], dtype=np.float32)

    def categorical(self) -> np.ndarray:
        """The ``CATEGORICAL`` class indices as int64 ``[M]``."""
        return np.array([CATEGORICAL[n].index(getattr(self, n)) for n in CATEGORICAL], dtype=np.int64)

    def attributes(self) -> dict[str, float | str]:
        """Every attribute by name: continuous floats and categorical class names."""
        return {n: getattr(self, n) for n in (*CONTINUOUS, *CATEGORICAL)}


def _check_range(name: str, value, lo: float, hi: float) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}]; got {value!r}") from None
    if not (lo <= v <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}]; got {value!r}")


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer in [0, 2**63); got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63); got {seed}")
    return seed


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= int(size) <= 2048:
        raise ValueError(f"size must be an integer in [16, 2048]; got {size!r}")
    return int(size)


def sample_params(seed: int) -> FaceParams:
    """The face of ``seed``: every attribute and nuisance parameter drawn from its own generator."""
    rng = np.random.default_rng(_check_seed(seed))
    cont = rng.random(len(CONTINUOUS))
    kw: dict = {n: float(v) for n, v in zip(CONTINUOUS, cont)}
    for name, classes in CATEGORICAL.items():
        p = _CLASS_PROBS.get(name)
        kw[name] = classes[int(rng.choice(len(classes), p=p))]
    u = rng.random(8)
    kw.update(
        scale=0.92 + 0.16 * float(u[0]),
        shift_x=-8.0 + 16.0 * float(u[1]),
        shift_y=-6.0 + 12.0 * float(u[2]),
        hairline=float(u[3]),
        brow_thickness=float(u[4]),
        ear_size=float(u[5]),
        nose_style=int(u[6] * 3),
        blush=bool(u[7] < 0.3),
        detail_seed=int(rng.integers(0, 2**62)),
    )
    return FaceParams(**kw)


def held_out_seeds(n: int, start: int = 0) -> range:
    """Held-out seeds ``HELD_OUT_OFFSET + start .. + start + n`` (never produced by :func:`train_seeds`)."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0; got n={n}, start={start}")
    return range(HELD_OUT_OFFSET + start, HELD_OUT_OFFSET + start + n)


def train_seeds(n: int, seed: int) -> np.ndarray:
    """``n`` training seeds (int64) drawn from ``[0, HELD_OUT_OFFSET)`` by a generator seeded with ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    return np.random.default_rng(_check_seed(seed)).integers(0, HELD_OUT_OFFSET, size=n, dtype=np.int64)


def is_held_out(seed: int) -> bool:
    return int(seed) >= HELD_OUT_OFFSET


# --------------------------------------------------------------------------------------------------------
# Geometry. Face-local frame: origin at the head centre, x to the image's right, y down, design pixels of
# a 256 image. Points on the face surface carry a depth z (towards the viewer) for the yaw projection.


@dataclass(frozen=True)
class Face:
    """One rendered face and its ground truth."""

    image: np.ndarray  # uint8 [size, size, 3]
    landmarks: np.ndarray  # float32 [L, 2], [x, y] in pixels of `size`
    continuous: np.ndarray  # float32 [K]
    categorical: np.ndarray  # int64 [M]
    caption: str
    params: FaceParams


@functools.lru_cache(maxsize=64)
def _bezier_basis(n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)
    return np.stack([(1 - t) ** 2, 2 * (1 - t) * t, t**2], axis=1)


@functools.lru_cache(maxsize=64)
def _unit_circle(n: int) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _curve(p0, p2, mid, n: int) -> np.ndarray:
    """A quadratic Bezier from p0 to p2 whose t=0.5 point is ``mid``: [n, 2]."""
    p0x, p0y = float(p0[0]), float(p0[1])
    p2x, p2y = float(p2[0]), float(p2[1])
    cx, cy = 2.0 * float(mid[0]) - 0.5 * (p0x + p2x), 2.0 * float(mid[1]) - 0.5 * (p0y + p2y)
    return _bezier_basis(n) @ np.array([[p0x, p0y], [cx, cy], [p2x, p2y]])


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28) -> np.ndarray:
    return _unit_circle(n) * np.array([rx, ry]) + np.array([cx, cy])


def _rounded_rect(cx: float, cy: float, hw: float, hh: float, r: float, n: int = 6) -> np.ndarray:
    pts = []
    for (sx, sy), a0 in zip(((1, 1), (-1, 1), (-1, -1), (1, -1)), (0.0, 0.5 * math.pi, math.pi, 1.5 * math.pi)):
        ccx, ccy = cx + sx * (hw - r), cy + sy * (hh - r)
        t = a0 + np.linspace(0.0, 0.5 * math.pi, n)
        pts.append(np.stack([ccx + r * np.cos(t), ccy + r * np.sin(t)], axis=1))
    return np.concatenate(pts)


_RIGHT_QUARTER = np.linspace(0.0, 0.5 * math.pi, 200)  # outline from the right side down to the chin
_LEFT_QUARTER = np.linspace(math.pi, 0.5 * math.pi, 200)  # from the left side down to the chin


class _Geometry:
    """The pose of one face: local points -> design pixels -> canvas pixels."""

    def __init__(self, p: FaceParams, size: int, ss: int) -> None:
        b = _HEAD_HALF_HEIGHT
        lo, hi = _SHAPE_RATIO[p.head_shape]
        self.a = b * (lo + (hi - lo) * p.face_width)  # head half width
        self.b = b
        self.shape = p.head_shape
        self.depth = 0.9 * self.a
        yaw = (p.head_yaw - 0.5) * 2.0 * _MAX_YAW
        self.cos_yaw, self.sin_yaw = math.cos(yaw), math.sin(yaw)
        roll = (p.head_roll - 0.5) * 2.0 * _MAX_ROLL
        cr, sr = math.cos(roll), math.sin(roll)
        # design = centre + scale * R(roll) @ local; positive roll turns clockwise on screen (y down).
        self.scale = p.scale
        self.lin = p.scale * np.array([[cr, -sr], [sr, cr]])
        self.centre = np.array([_HEAD_CENTRE[0] + p.shift_x, _HEAD_CENTRE[1] + p.shift_y])
        self.k = ss * size / IMAGE_SIZE  # design pixel -> canvas pixel
        self.canvas_lin = (self.lin * self.k).T.copy()
        # PIL puts pixel i's centre at coordinate i + 0.5: hence the final + 0.5.
        self.canvas_off = (self.centre + 0.5) * self.k - 0.5 + 0.5
        self.inv_a, self.inv_b = 1.0 / (1.05 * self.a), 1.0 / self.b
        self.size = size

    # local -> local after yaw (points on the face surface)
    def surface_z(self, pts: np.ndarray) -> np.ndarray:
        x, y = pts[:, 0] * self.inv_a, pts[:, 1] * self.inv_b
        return self.depth * np.sqrt(np.maximum(1.0 - x * x - 0.25 * y * y, 0.02))

    def yaw(self, pts: np.ndarray, extra_z: float | np.ndarray = 0.0) -> np.ndarray:
        z = self.surface_z(pts)
        if not (isinstance(extra_z, float) and extra_z == 0.0):
            z = z + extra_z
        out = np.array(pts, dtype=float)
        out[:, 0] = out[:, 0] * self.cos_yaw + z * self.sin_yaw
        return out

    def design(self, pts: np.ndarray) -> np.ndarray:
        return pts @ self.lin.T + self.centre

    def canvas(self, pts: np.ndarray) -> np.ndarray:
        # pixel centres at integers at every size: design p -> output (p + .5) * size/256 - .5, and the
        # box downsample maps canvas X to output (X - (ss - 1) / 2) / ss.
        return pts @ self.canvas_lin + self.canvas_off

    def output(self, pts: np.ndarray) -> np.ndarray:
        return (self.design(pts) + 0.5) * (self.size / IMAGE_SIZE) - 0.5

    # head outline (silhouette: never yawed)
    def outline_point(self, t: np.ndarray) -> np.ndarray:
        """Outline points at parameter angles ``t`` (0 = right, pi/2 = chin, 3pi/2 = top)."""
        c, s = np.cos(t), np.sin(t)
        n = 4.0 if self.shape == "square" else 2.0
        x = self.a * np.sign(c) * np.abs(c) ** (2.0 / n)
        y = self.b * np.sign(s) * np.abs(s) ** (2.0 / n)
        yn = y / self.b
        if self.shape == "heart":  # wide cheekbones, pointed chin
            x = x * np.where(yn > 0, 1.0 - 0.42 * np.clip(yn, 0, 1) ** 1.6, 1.0 + 0.05 * np.clip(-yn, 0, 1))
        elif self.shape == "oval":  # egg: slightly narrower jaw
            x = x * np.where(yn > 0, 1.0 - 0.12 * np.clip(yn, 0, 1) ** 2, 1.0)
        elif self.shape == "square":
            x = x * np.where(yn > 0, 1.0 - 0.08 * np.clip(yn, 0, 1) ** 3, 1.0)
        # the chin is on the front of the face: under yaw the lower outline follows it half-way
        x = x + self.sin_yaw * self.depth * 0.5 * np.clip(yn, 0.0, 1.0) ** 1.5
        return np.stack([x, y], axis=1)

    def outline(self, n: int = 72) -> np.ndarray:
        return self.outline_point(np.linspace(0.0, 2.0 * math.pi, n, endpoint=False))

    def jaw_points(self, y: float) -> tuple[np.ndarray, np.ndarray]:
        """The (left, right) outline points at height ``y`` (lower half, 0 <= y < b)."""
        out = []
        for t in (_LEFT_QUARTER, _RIGHT_QUARTER):
            pts = self.outline_point(t)  # y increases along both
            out.append(np.array([float(np.interp(y, pts[:, 1], pts[:, 0])), y]))
        return out[0], out[1]

    def top_arc(self, y_end: float, scale: float, n: int = 40) -> np.ndarray:
        """The outline above ``y_end`` (negative: above the centre), image-left to image-right, scaled."""
        s = min(1.0, max(0.0, -y_end / self.b))
        n_exp = 4.0 if self.shape == "square" else 2.0
        t0 = math.asin(s ** (n_exp / 2.0))  # |sin t| ** (2/n) = s
        t = np.linspace(math.pi + t0, 2.0 * math.pi - t0, n)
        return self.outline_point(t) * scale


def _layout(p: FaceParams, g: _Geometry) -> dict[str, np.ndarray | float]:
    """Local (pre-yaw) key points and sizes of the features."""
    lay: dict = {}
    eye_y = -8.0 + (p.eye_height - 0.5) * 14.0
    eye_dx = 19.0 + 10.0 * p.eye_spacing + 0.06 * (g.a - 60.0)
    eye_w = 8.5 + 5.5 * p.eye_size  # half width
    eye_h = eye_w * 0.72 * (0.35 + 0.65 * p.eye_open)  # upper-lid half height (the iris always shows)
    lay.update(eye_y=eye_y, eye_dx=eye_dx, eye_w=eye_w, eye_h=eye_h)
    iris_r = 0.56 * eye_w
    gaze = (p.gaze - 0.5) * 2.0 * (eye_w - iris_r) * 0.85
    lay.update(iris_r=iris_r, gaze=gaze)
    brow_y = eye_y - 0.72 * eye_w - 6.5 - 8.0 * p.brow_raise
    lay.update(brow_y=brow_y, brow_th=2.8 + 2.2 * p.brow_thickness)
    nose_y = eye_y + 25.0 + 2.0 * (p.eye_height - 0.5) * -4.0
    lay.update(nose_y=nose_y, nose_r=4.5 + 4.5 * p.nose_size)
    mouth_y = 38.0
    mouth_hw = 13.0 + 13.0 * p.mouth_width
    lift = (p.smile - 0.5) * 2.0 * 7.0
    open_h = 19.0 * p.mouth_open
    lay.update(mouth_y=mouth_y, mouth_hw=mouth_hw, lift=lift, open_h=open_h)
    lay["upper_lip"] = np.array([0.0, mouth_y - 0.3 * open_h])
    lay["lower_lip"] = np.array([0.0, mouth_y + 0.7 * open_h])
    lay["mouth_left"] = np.array([-mouth_hw, mouth_y - lift])
    lay["mouth_right"] = np.array([mouth_hw, mouth_y - lift])
    lay["hairline_y"] = -44.0 - 8.0 * p.hairline
    return lay


def _eye(side: int, lay: dict) -> dict[str, np.ndarray]:
    """Local points of one eye (side -1 image-left, +1 image-right)."""
    ex, ey, w, h = side * lay["eye_dx"], lay["eye_y"], lay["eye_w"], lay["eye_h"]
    t = np.linspace(0.0, 1.0, 15)
    xs = ex - w + 2.0 * w * t
    upper = np.stack([xs, ey - h * np.sin(math.pi * t)], axis=1)
    lower = np.stack([xs, ey + 0.8 * h * np.sin(math.pi * t)], axis=1)
    return {"upper": upper, "lower": lower, "centre": np.array([ex, ey])}


def landmarks_local(p: FaceParams, g: _Geometry | None = None) -> np.ndarray:
    """Landmarks in the face-local frame after yaw (before roll/scale/shift): [L, 2]."""
    g = g or _Geometry(p, IMAGE_SIZE, 1)
    lay = _layout(p, g)
    pts = np.zeros((len(LANDMARK_NAMES), 2))
    for side, name in ((-1, "left"), (1, "right")):
        ex, ey, w, h = side * lay["eye_dx"], lay["eye_y"], lay["eye_w"], lay["eye_h"]
        pts[LANDMARK_INDEX[f"{name}_eye_outer"]] = (ex + side * w, ey)
        pts[LANDMARK_INDEX[f"{name}_eye_inner"]] = (ex - side * w, ey)
        pts[LANDMARK_INDEX[f"{name}_eye_top"]] = (ex, ey - h)
        pts[LANDMARK_INDEX[f"{name}_eye_bottom"]] = (ex, ey + 0.8 * h)
        pts[LANDMARK_INDEX[f"{name}_pupil"]] = (ex + lay["gaze"], ey)
        inner, outer = _brow_ends(side, lay, p)
        pts[LANDMARK_INDEX[f"{name}_brow_inner"]] = inner
        pts[LANDMARK_INDEX[f"{name}_brow_outer"]] = outer
    pts[LANDMARK_INDEX["nose_tip"]] = (0.0, lay["nose_y"])
    for k in ("mouth_left", "mouth_right", "upper_lip", "lower_lip"):
        pts[LANDMARK_INDEX[k]] = lay[k]
    extra = np.zeros(len(pts))
    extra[LANDMARK_INDEX["nose_tip"]] = _nose_extra_z(lay)
    out = g.yaw(pts, extra)
    # outline points (the silhouette: its lower half follows the yaw half-way)
    jaw_y = lay["mouth_y"]
    out[LANDMARK_INDEX["chin"]] = g.outline_point(np.array([0.5 * math.pi]))[0]
    out[LANDMARK_INDEX["left_jaw"]], out[LANDMARK_INDEX["right_jaw"]] = g.jaw_points(jaw_y)
    return out


def _brow_ends(side: int, lay: dict, p: FaceParams) -> tuple[np.ndarray, np.ndarray]:
    ex, w, by = side * lay["eye_dx"], lay["eye_w"], lay["brow_y"]
    tilt = p.brow_tilt - 0.5
    inner = np.array([ex - side * 0.95 * w, by + 10.0 * tilt])
    outer = np.array([ex + side * 1.15 * w, by - 4.0 * tilt + 2.0])
    return inner, outer


def _nose_extra_z(lay: dict) -> float:
    return 4.0 + 1.2 * lay["nose_r"]


def _jitter(rng: np.random.Generator, rgb, amount: int) -> tuple[int, int, int]:
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(min(255, max(0, c + int(e)))) for c, e in zip(rgb, d))


def _shade(rgb, f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(c * f)))) for c in rgb)


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


class _Painter:
    """Draws local-frame polygons and lines on the supersampled canvas through the face's geometry.

    Shapes are queued and posed together in :meth:`flush` (one vectorised transform for the whole face),
    then drawn in the order they were queued."""

    def __init__(self, g: _Geometry, canvas: Image.Image) -> None:
        self.g = g
        self.draw = ImageDraw.Draw(canvas)
        self.pts: list[np.ndarray] = []
        self.yaws: list[bool] = []
        self.extra: list[float] = []
        self.ops: list[tuple] = []  # (is_line, n_points, fill, width px, closed)

    def _add(self, local: np.ndarray, yaw: bool, extra_z: float) -> None:
        self.pts.append(local)
        self.yaws.append(yaw)
        self.extra.append(float(extra_z))

    def poly(self, local: np.ndarray, fill, *, yaw: bool = True, extra_z: float = 0.0) -> None:
        self._add(local, yaw, extra_z)
        self.ops.append((False, len(local), fill, 0, False))

    def line(self, local: np.ndarray, fill, width: float, *, yaw: bool = True, closed: bool = False) -> None:
        self._add(local, yaw, 0.0)
        wpx = max(1, int(round(width * self.g.k * self.g.scale)))
        self.ops.append((True, len(local), fill, wpx, closed))

    def flush(self) -> None:
        if not self.ops:
            return
        g = self.g
        counts = [len(p) for p in self.pts]
        local = np.concatenate(self.pts).astype(float, copy=False)
        yaw = np.repeat(np.array(self.yaws), counts)
        z = g.surface_z(local) + np.repeat(np.array(self.extra), counts)
        x = np.where(yaw, local[:, 0] * g.cos_yaw + z * g.sin_yaw, local[:, 0])
        posed = np.stack([x, local[:, 1]], axis=1) @ g.canvas_lin + g.canvas_off
        flat = posed.ravel().tolist()
        i = 0
        for is_line, n, fill, wpx, closed in self.ops:
            xy = flat[2 * i: 2 * (i + n)]
            i += n
            if is_line:
                if closed:
                    xy = xy + xy[:2]
                self.draw.line(xy, fill=fill, width=wpx, joint="curve")
            else:
                self.draw.polygon(xy, fill=fill)
        self.pts, self.yaws, self.extra, self.ops = [], [], [], []


def render(params: FaceParams, size: int = IMAGE_SIZE) -> Face:
    """Draw ``params`` at ``size`` x ``size`` and return the image with its ground truth."""
    if not isinstance(params, FaceParams):
        raise ValueError(f"params must be a FaceParams; got {type(params).__name__}")
    size = _check_size(size)
    ss = SUPERSAMPLE
    p = params
    g = _Geometry(p, size, ss)
    lay = _layout(p, g)
    rng = np.random.default_rng(int(p.detail_seed))
    skin = _jitter(rng, _SKIN[p.skin_tone], 6)
    hair = _jitter(rng, _HAIR[p.hair_colour], 8)
    iris = _jitter(rng, _IRIS[p.iris_colour], 8)
    bg = _jitter(rng, _BACKGROUND[p.background_colour], 6)
    shirt = _SHIRTS[int(rng.integers(len(_SHIRTS)))]
    hat_col = _HATS[int(rng.integers(len(_HATS)))]
    frame_col = _FRAMES[int(rng.integers(len(_FRAMES)))]
    deco = rng.random((4, 4))
    spikes = int(rng.integers(9, 14))
    n_curls = int(rng.integers(11, 17))
    lip_col = _mix(skin, (200, 60, 80), 0.55)
    dark_skin = _shade(skin, 0.82)
    line_col = _shade(skin, 0.35)

    S = size * ss
    canvas = Image.new("RGB", (S, S), bg)
    pt = _Painter(g, canvas)
    draw = pt.draw

    # 1. background decoration: soft discs in a tint of the background colour (never its class)
    k = S / 256.0
    for i in range(int(deco[0, 0] * 4)):
        cx, cy, r = deco[i, 1] * 256 * k, deco[i, 2] * 256 * k, (20 + 50 * deco[i, 3]) * k
        tint = _shade(bg, 1.1) if deco[i, 0] > 0.5 else _shade(bg, 0.92)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tint)

    # 2. body: shoulders and neck (only scale/shift follow the head; no roll)
    sc, (hx, hy) = p.scale, g.centre
    body_top = hy + 0.95 * g.b * sc
    sh = np.array([[hx - 105 * sc, 300], [hx - 100 * sc, body_top + 30 * sc], [hx - 60 * sc, body_top + 5 * sc],
                   [hx + 60 * sc, body_top + 5 * sc], [hx + 100 * sc, body_top + 30 * sc], [hx + 105 * sc, 300]])
    draw.polygon(((sh + 0.5) * g.k).ravel().tolist(), fill=shirt)
    nk = np.array([[hx - 22 * sc, hy], [hx + 22 * sc, hy], [hx + 24 * sc, body_top + 12 * sc],
                   [hx - 24 * sc, body_top + 12 * sc]])
    draw.polygon(((nk + 0.5) * g.k).ravel().tolist(), fill=dark_skin)

    # 3. hair behind the head
    a, b = g.a, g.b
    style = p.hair_style
    if style == "long":
        top = g.top_arc(-0.05 * b, 1.13)
        side_l = np.array([[-1.16 * a, 0.6 * b], [-1.1 * a, 1.32 * b], [-0.45 * a, 1.38 * b]])
        side_r = np.array([[0.45 * a, 1.38 * b], [1.1 * a, 1.32 * b], [1.16 * a, 0.6 * b]])
        pt.poly(np.concatenate([side_l[::-1], top, side_r[::-1]]), hair, yaw=False)
    elif style == "bob":
        top = g.top_arc(-0.05 * b, 1.16)
        pt.poly(np.concatenate([[[-1.18 * a, 0.42 * b]], top, [[1.18 * a, 0.42 * b]]]), hair, yaw=False)
    elif style == "afro":
        t = np.linspace(0.0, 2.0 * math.pi, 96, endpoint=False)
        r = 1.33 * a * (1.0 + 0.05 * np.abs(np.sin(0.5 * n_curls * t)))
        cy = -0.3 * b
        pt.poly(np.stack([r * np.cos(t), cy + 0.95 * r * np.sin(t)], axis=1), hair, yaw=False)

    # 4. ears (behind the head, shifted by the yaw)
    ear_r = 9.0 + 5.0 * p.ear_size
    for side in (-1, 1):
        ex = side * a * g.cos_yaw - 0.25 * a * g.sin_yaw
        pt.poly(_ellipse(ex, 4.0, ear_r * 0.7, ear_r * 1.25, 16), dark_skin, yaw=False)

    # 5. head
    outline = g.outline()
    pt.poly(outline, skin, yaw=False)
    if p.blush:
        for side in (-1, 1):
            cheek = _ellipse(side * (lay["eye_dx"] + 3), lay["eye_y"] + 20, 8, 5, 16)
            pt.poly(cheek, _mix(skin, (240, 110, 120), 0.35))

    # 6. full beard (under the face features)
    if p.beard == "full":
        t = np.linspace(0.02 * math.pi, 0.98 * math.pi, 40)
        low = g.outline_point(t) * 1.04
        low = low[low[:, 1] > lay["nose_y"] - 6.0]
        cheek = _curve(low[-1], low[0], (0.0, lay["nose_y"] + 3.0), 16)
        pt.poly(np.concatenate([low, cheek]), hair, yaw=False)
        # skin around the mouth
        my = lay["mouth_y"]
        pt.poly(_ellipse(0.0, my + 0.2 * lay["open_h"], lay["mouth_hw"] + 5.0, 0.5 * lay["open_h"] + 9.0, 24), skin)

    # 7. eyes
    for side in (-1, 1):
        e = _eye(side, lay)
        ex, ey = e["centre"]
        w, h, r = lay["eye_w"], lay["eye_h"], lay["iris_r"]
        almond = np.concatenate([e["upper"], e["lower"][::-1][1:-1]])
        pt.poly(almond, (250, 250, 250))
        ic = (ex + lay["gaze"], ey)
        pt.poly(_ellipse(ic[0], ic[1], r, r, 20), iris)
        pt.poly(_ellipse(ic[0], ic[1], 0.48 * r, 0.48 * r, 16), (14, 12, 16))
        pt.poly(_ellipse(ic[0] + 0.35 * r, ic[1] - 0.35 * r, 0.2 * r, 0.2 * r, 10), (255, 255, 255))
        # eyelids: skin over whatever of the iris pokes out of the almond
        top = ey - max(h, r) - 2.0
        bot = ey + max(0.8 * h, r) + 2.0
        cap = [[ex + w + 1.0, ey], [ex + w + 1.0, top], [ex - w - 1.0, top], [ex - w - 1.0, ey]]
        pt.poly(np.concatenate([e["upper"], cap]), skin)
        cup = [[ex + w + 1.0, ey], [ex + w + 1.0, bot], [ex - w - 1.0, bot], [ex - w - 1.0, ey]]
        pt.poly(np.concatenate([e["lower"], cup]), skin)
        pt.line(e["upper"], (24, 20, 24), 1.2)
        pt.line(e["lower"][2:-2], line_col, 0.8)

    # 8. brows (hair colour)
    for side in (-1, 1):
        inner, outer = _brow_ends(side, lay, p)
        mid = 0.5 * (inner + outer) + np.array([0.0, -3.0])
        c = _curve(inner, outer, mid, 12)
        th = lay["brow_th"]
        taper = np.linspace(1.0, 0.55, 12)[:, None]
        off = np.array([0.0, 0.5 * th]) * taper
        pt.poly(np.concatenate([c - off, (c + off)[::-1]]), hair)

    # 9. nose (nose tip landmark = centre of the ball; drawn with extra depth)
    ny, nr = lay["nose_y"], lay["nose_r"]
    ez = _nose_extra_z(lay)
    if p.nose_style == 2:
        hook = np.array([[0.0, ny - 2.2 * nr], [0.7 * nr, ny + 0.1 * nr], [0.0, ny + 0.75 * nr],
                         [-0.8 * nr, ny + 0.5 * nr]])
        pt.line(hook, line_col, 1.4)
        pt.poly(_ellipse(0.0, ny, 0.55 * nr, 0.45 * nr, 12), dark_skin, extra_z=ez)
    else:
        pt.poly(_ellipse(0.0, ny, nr, 0.8 * nr, 20), dark_skin, extra_z=ez)
        pt.poly(_ellipse(-0.25 * nr, ny - 0.3 * nr, 0.25 * nr, 0.18 * nr, 8), _mix(skin, (255, 255, 255), 0.4),
                extra_z=ez)
        if p.nose_style == 1:
            for side in (-1, 1):
                pt.poly(_ellipse(side * 0.45 * nr, ny + 0.3 * nr, 0.2 * nr, 0.14 * nr, 8), line_col, extra_z=ez)

    # 10. mouth
    ml, mr, ul, ll = lay["mouth_left"], lay["mouth_right"], lay["upper_lip"], lay["lower_lip"]
    if lay["open_h"] < 1.5:
        c = _curve(ml, mr, (0.0, lay["mouth_y"]), 16)
        th = 1.6
        pt.poly(np.concatenate([c + [0, -th], (c + [0, th])[::-1]]), lip_col)
        pt.line(c, _shade(lip_col, 0.55), 1.0)
    else:
        upper = _curve(ml, mr, ul, 18)
        lower = _curve(mr, ml, ll, 18)
        pt.poly(np.concatenate([upper, lower[1:-1]]), (70, 16, 32))
        teeth_h = min(4.5, 0.3 * lay["open_h"])
        if teeth_h > 1.0:
            tl = _curve(ml + [0.35 * lay["mouth_hw"], 0], mr - [0.35 * lay["mouth_hw"], 0],
                        ul, 10)
            pt.poly(np.concatenate([tl[1:-1], (tl + [0, teeth_h])[::-1][1:-1]]), (248, 248, 244))
        tongue_y = ll[1] - 0.25 * lay["open_h"]
        pt.poly(_ellipse(0.0, tongue_y, 0.45 * lay["mouth_hw"], 0.18 * lay["open_h"], 16), (214, 90, 104))
        pt.line(np.concatenate([upper, lower[1:-1]]), lip_col, 2.0, closed=True)

    # 11. moustache / goatee (the full beard has a moustache too)
    if p.beard in ("moustache", "full"):
        mw = lay["mouth_hw"]
        bottom = _curve(ml + [-2.0, 2.5], mr + [2.0, 2.5], ul + [0.0, -1.5], 14)
        top = _curve(mr + [0.0, -6.0], ml + [0.0, -6.0], (0.0, min(ul[1] - 7.0, ny + nr + 1.0)), 14)
        if mw > 0:
            pt.poly(np.concatenate([bottom, top]), hair)
    if p.beard == "goatee":  # from under the lower lip (on the face surface) down over the chin (silhouette)
        gy0 = ll[1] + 2.5
        top = g.yaw(_curve((-0.5 * lay["mouth_hw"], gy0), (0.5 * lay["mouth_hw"], gy0), (0.0, gy0 - 1.0), 8))
        d = min(0.6, 0.4 * lay["mouth_hw"] / a)
        chin = g.outline_point(np.linspace(0.5 * math.pi - d, 0.5 * math.pi + d, 10)) * 1.03
        pt.poly(np.concatenate([top, chin]), hair, yaw=False)

    # 12. hair in front: cap with a hairline (yawed with the forehead surface)
    hl = lay["hairline_y"]
    if style in ("short", "spiky", "long", "afro"):
        side_y = lay["eye_y"] - 4.0
        outer = g.top_arc(side_y, 1.05)
        if style == "spiky":
            m = len(outer)
            tri = np.abs(((np.arange(m) / (m - 1)) * spikes) % 1.0 - 0.5) * 2.0
            outer = outer * (1.0 + 0.2 * (1.0 - tri))[:, None]
        u = np.linspace(0.0, 1.0, 25)
        inner = np.stack([a * 0.93 * np.cos(math.pi * u), side_y + (hl - side_y) * np.sin(math.pi * u) ** 0.55],
                         axis=1)
        inner = g.yaw(inner)
        pt.poly(np.concatenate([outer, inner]), hair, yaw=False)
    elif style == "bob":
        outer = g.top_arc(0.4 * b, 1.07)
        outer = np.concatenate([[[-1.0 * a, 0.42 * b]], outer, [[1.0 * a, 0.42 * b]]])
        bang = hl + 2.0
        inner = np.array([[0.94 * a, 0.42 * b], [0.9 * a, 0.15 * b], [0.78 * a, bang], [-0.78 * a, bang],
                          [-0.9 * a, 0.15 * b], [-0.94 * a, 0.42 * b]])
        pt.poly(np.concatenate([outer, inner]), hair, yaw=False)

    # 13. glasses
    if p.glasses != "none":
        for side in (-1, 1):
            ex, ey, w = side * lay["eye_dx"], lay["eye_y"], lay["eye_w"]
            if p.glasses == "round":
                ring = _ellipse(ex, ey, 1.3 * w + 2.0, 1.3 * w + 2.0, 28)
            else:
                ring = _rounded_rect(ex, ey, 1.3 * w + 2.5, 0.95 * w + 3.0, 3.0)
            pt.line(ring, frame_col, 2.2, closed=True)
            rim = ex + side * (1.3 * w + 2.0)
            pt.line(np.array([[rim, ey - 2.0], [side * 0.98 * a, ey - 4.0]]), frame_col, 2.0)
        inner_rim = lay["eye_dx"] - 1.3 * lay["eye_w"] - 2.0
        bridge = _curve((-inner_rim, lay["eye_y"] - 1.0), (inner_rim, lay["eye_y"] - 1.0),
                        (0.0, lay["eye_y"] - 4.0), 8)
        pt.line(bridge, frame_col, 2.0)

    # 14. hat (sits on the top of the head; not yawed)
    if p.hat != "none":
        band_y = hl - 4.0
        dome = g.top_arc(band_y, 1.07)
        if p.hat == "cap":
            pt.poly(dome, hat_col, yaw=False)
            brim = _curve((-0.95 * a, band_y + 1.0), (0.95 * a, band_y + 1.0), (0.0, band_y + 6.0), 16)
            brim_top = _curve((0.95 * a, band_y - 2.0), (-0.95 * a, band_y - 2.0), (0.0, band_y + 1.0), 16)
            pt.poly(np.concatenate([brim, brim_top]), _shade(hat_col, 0.8), yaw=False)
            pt.poly(_ellipse(0.0, dome[:, 1].min() + 2.0, 4.0, 3.0, 10), _shade(hat_col, 0.7), yaw=False)
        elif p.hat == "beanie":
            pt.poly(dome * [1.0, 1.05], hat_col, yaw=False)
            band = np.concatenate([_curve((-1.08 * a, band_y - 9.0), (1.08 * a, band_y - 9.0),
                                          (0.0, band_y - 12.0), 12),
                                   _curve((1.08 * a, band_y + 2.0), (-1.08 * a, band_y + 2.0),
                                          (0.0, band_y - 1.0), 12)])
            pt.poly(band, _shade(hat_col, 1.25), yaw=False)
            top_y = float((dome * [1.0, 1.05])[:, 1].min())
            pt.poly(_ellipse(0.0, top_y - 5.0, 9.0, 8.0, 16), _mix(hat_col, (255, 255, 255), 0.6), yaw=False)
        else:  # tophat
            crown_w = 0.72 * a
            crown = np.array([[-crown_w, band_y - 2.0], [-0.95 * crown_w, band_y - 58.0],
                              [0.95 * crown_w, band_y - 58.0], [crown_w, band_y - 2.0]])
            pt.poly(crown, hat_col, yaw=False)
            pt.poly(np.array([[-crown_w, band_y - 14.0], [crown_w, band_y - 14.0], [crown_w, band_y - 6.0],
                              [-crown_w, band_y - 6.0]]), _shade(hat_col, 0.6), yaw=False)
            pt.poly(_ellipse(0.0, band_y, 1.25 * a, 6.0, 28), _shade(hat_col, 0.85), yaw=False)

    pt.flush()
    if ss > 1:
        canvas = canvas.reduce(ss)
    image = np.array(canvas, dtype=np.uint8)
    lm = g.output(landmarks_local(p, g)).astype(np.float32)
    return Face(image=image, landmarks=lm, continuous=p.continuous(), categorical=p.categorical(),
                caption=caption(p), params=p)


# --------------------------------------------------------------------------------------------------------
# Captions: a fixed template over the attributes; every word is in VOCABULARY.

_SHAPE_WORDS = {"oval": "an oval", "round": "a round", "square": "a square", "heart": "a heart shaped"}
_HAIR_STYLE_PHRASE = {
    "bald": "a bald head and {c} eyebrows",
    "short": "short {c} hair",
    "long": "long {c} hair",
    "spiky": "spiky {c} hair",
    "bob": "a {c} bob",
    "afro": "a {c} afro",
}
_EXTRA_PHRASE = {
    ("glasses", "round"): "round glasses",
    ("glasses", "square"): "square glasses",
    ("hat", "cap"): "a cap",
    ("hat", "beanie"): "a beanie",
    ("hat", "tophat"): "a top hat",
    ("beard", "moustache"): "a moustache",
    ("beard", "goatee"): "a goatee",
    ("beard", "full"): "a full beard",
}
#: The categorical attributes a caption names only when present (their other value is "none").
EXTRAS: tuple[str, ...] = ("glasses", "hat", "beard")

# (attribute, threshold test, phrase) for the continuous attributes that captions mention
_MOUTH = ((0.8, "a wide smile"), (0.62, "a smile"), (0.38, "a neutral mouth"), (0.2, "a frown"),
          (-1.0, "a deep frown"))  # fmt: skip
_FIXED_PHRASES = (
    "a cartoon face with skin , on background",
    "big small sleepy eyes looking left right",
    "raised lowered eyebrows an angry worried look with an open mouth",
    "a big small nose head turned to the left right a tilted head",
)


def _attributes_of(params_or_attributes: FaceParams | Mapping, who: str) -> Mapping:
    if isinstance(params_or_attributes, FaceParams):
        return params_or_attributes.attributes()
    if isinstance(params_or_attributes, Mapping):
        return params_or_attributes
    raise ValueError(f"{who} takes FaceParams or a mapping of attributes; got {type(params_or_attributes)}")


def _attr_value(attrs: Mapping, name: str):
    if name not in attrs:
        raise ValueError(f"caption needs the attribute {name!r}")
    v = attrs[name]
    if name in CATEGORICAL:
        classes = CATEGORICAL[name]
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            if not 0 <= int(v) < len(classes):
                raise ValueError(f"{name} index must be in [0, {len(classes) - 1}]; got {v}")
            return classes[int(v)]
        if v not in classes:
            raise ValueError(f"{name} must be one of {', '.join(classes)}; got {v!r}")
        return v
    _check_range(name, v, 0.0, 1.0)
    return float(v)


#: How a caption describes each continuous attribute it mentions: ``name -> ((bin, test), ...)``, the first bin
#: whose test holds; none: the caption says nothing of it (bin ``""``). The thresholds of :func:`caption`.
CAPTION_BINS: dict[str, tuple[tuple[str, Callable[[float], bool]], ...]] = {
    "eye_size": (("small", lambda v: v < 0.33), ("big", lambda v: v > 0.67)),
    "eye_open": (("sleepy", lambda v: v < 0.3),),
    "gaze": (("looking left", lambda v: v < 0.2), ("looking right", lambda v: v > 0.8)),
    "brow_raise": (("raised eyebrows", lambda v: v > 0.75), ("lowered eyebrows", lambda v: v < 0.25)),
    "brow_tilt": (("an angry look", lambda v: v > 0.8), ("a worried look", lambda v: v < 0.2)),
    "smile": tuple((phrase, lambda v, lo=lo: v > lo) for lo, phrase in _MOUTH),
    "mouth_open": (("open", lambda v: v > 0.55),),
    "nose_size": (("a big nose", lambda v: v > 0.8), ("a small nose", lambda v: v < 0.2)),
    "head_yaw": (("head turned to the left", lambda v: v < 0.2), ("head turned to the right", lambda v: v > 0.8)),
    "head_roll": (("a tilted head", lambda v: v < 0.15 or v > 0.85),),
}


def caption_bins(values: Mapping[str, float]) -> dict[str, str]:
    """The bin of each continuous attribute a caption describes (:data:`CAPTION_BINS`; ``""``: not mentioned), from
    a mapping of those attributes to their values in [0, 1] -- true values, or an attribute model's readings."""
    return {name: next((b for b, test in bins if test(float(values[name]))), "")
            for name, bins in CAPTION_BINS.items()}


def caption(params_or_attributes: FaceParams | Mapping) -> str:
    """The caption of a face: from a :class:`FaceParams` or a mapping of every attribute name to its value
    (continuous floats; categorical class names or indices)."""
    attrs = _attributes_of(params_or_attributes, "caption")
    v = {n: _attr_value(attrs, n) for n in (*CONTINUOUS, *CATEGORICAL)}
    b = caption_bins(v)
    parts = [f"{_SHAPE_WORDS[v['head_shape']]} cartoon face with {v['skin_tone']} skin"]
    parts.append(_HAIR_STYLE_PHRASE[v["hair_style"]].format(c=v["hair_colour"]))
    eyes = [w for w in (b["eye_size"], b["eye_open"]) if w] + [v["iris_colour"], "eyes"]
    eyes += [b["gaze"]] if b["gaze"] else []
    parts.append(" ".join(eyes))
    parts += [w for w in (b["brow_raise"], b["brow_tilt"]) if w]
    mouth = b["smile"]
    if b["mouth_open"]:
        mouth = "an open mouth" if mouth == "a neutral mouth" else mouth + " with an open mouth"
    parts.append(mouth)
    parts += [b["nose_size"]] if b["nose_size"] else []
    for key in EXTRAS:
        if v[key] != "none":
            parts.append(_EXTRA_PHRASE[(key, v[key])])
    parts += [w for w in (b["head_yaw"], b["head_roll"]) if w]
    parts.append(f"on a {v['background_colour']} background")
    return ", ".join(parts)


def unnamed_extras(params_or_attributes: FaceParams | Mapping) -> list[str]:
    """The phrases of every extra (:data:`EXTRAS`) that a face's caption leaves out because the face has none of
    it, e.g. ``["a moustache", "a goatee", "a full beard"]`` for a face without a beard: what a diffusion
    sampler's negative prompt can name, since a caption says nothing of what is absent."""
    attrs = _attributes_of(params_or_attributes, "unnamed_extras")
    return [phrase for key in EXTRAS if _attr_value(attrs, key) == "none"
            for (k, _), phrase in _EXTRA_PHRASE.items() if k == key]


def caption_tokens(text: str) -> list[str]:
    """The words of a caption (commas as their own tokens), lowercase."""
    return text.lower().replace(",", " , ").split()


def _vocabulary() -> tuple[str, ...]:
    words: set[str] = set()
    phrases = list(_FIXED_PHRASES) + list(_SHAPE_WORDS.values()) + list(_EXTRA_PHRASE.values())
    phrases += [p for _, p in _MOUTH]
    phrases += [p.format(c=c) for p in _HAIR_STYLE_PHRASE.values() for c in CATEGORICAL["hair_colour"]]
    for name in ("skin_tone", "iris_colour", "background_colour"):
        phrases += list(CATEGORICAL[name])
    for ph in phrases:
        words.update(caption_tokens(ph))
    return tuple(sorted(words))


#: Every token a caption can contain (lowercase words and ",").
VOCABULARY: tuple[str, ...] = _vocabulary()


def render_seed(seed: int, size: int = IMAGE_SIZE) -> Face:
    return render(sample_params(seed), size)


def render_batch(seeds: Iterable[int], size: int = IMAGE_SIZE) -> dict[str, np.ndarray | list[str]]:
    """Render every seed: images uint8 [N, size, size, 3], landmarks float32 [N, L, 2], continuous
    float32 [N, K], categorical int64 [N, M], seeds int64 [N], captions list[str]."""
    size = _check_size(size)
    seeds = [_check_seed(s) for s in seeds]
    n = len(seeds)
    out = {
        "images": np.empty((n, size, size, 3), np.uint8),
        "landmarks": np.empty((n, len(LANDMARK_NAMES), 2), np.float32),
        "continuous": np.empty((n, len(CONTINUOUS)), np.float32),
        "categorical": np.empty((n, len(CATEGORICAL)), np.int64),
        "seeds": np.array(seeds, dtype=np.int64).reshape(n),
        "captions": [],
    }
    for i, s in enumerate(seeds):
        f = render_seed(s, size)
        out["images"][i] = f.image
        out["landmarks"][i] = f.landmarks
        out["continuous"][i] = f.continuous
        out["categorical"][i] = f.categorical
        out["captions"].append(f.caption)
    return out

"""Deterministic synthetic tire images, so the demo and the tests need no downloads.

A tire is seen from the side: a background, a dark rubber ring (tread band with grooves around the
outer edge, sidewall with raised lettering), and a lighter metal rim with spokes and a hub. Every
image varies in geometry, lighting, noise and blur, so that good and defective tires can only be
told apart by the defect itself. A defective tire carries one of :data:`DEFECT_KINDS`.

Every image draws from its own generator seeded with ``(seed, index)``: the same seed gives
byte-identical files, and a larger ``count`` only adds images after the existing ones.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from tirelib.errors import ConfigurationError

__all__ = ["DEFECT_KINDS", "SynthSummary", "draw_tire", "generate"]

logger = logging.getLogger(__name__)

DEFECT_KINDS: tuple[str, ...] = ("crack", "cut", "bulge", "worn")

GOOD, DEFECTIVE = "good", "defective"

_SUPERSAMPLE = 2  # the tire is drawn at twice the output size, then resampled: smooth edges
_MIN_SIZE, _MAX_SIZE = 16, 1024
_RADIUS = 0.47  # the tire's outer radius, as a fraction of the canvas side

_Array = np.ndarray  # float32 pixels or coordinates; numpy's dtype typing adds little here


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate` wrote: the output folder and the number of images per class."""

    out: Path
    counts: dict[str, int]


@dataclass(frozen=True)
class _Tire:
    """One tire's layout in its own frame: radii in canvas pixels, fractions of ``radius``."""

    side: int  # canvas side, pixels
    radius: float  # outer radius of the rubber
    tread: float  # the tread band lies between tread * radius and radius
    rim: float  # the metal rim lies inside rim * radius
    rubber: float  # sidewall luminance, 0-255

    @property
    def center(self) -> float:
        return self.side / 2


def generate(
    out: Path,
    count: int,
    *,
    seed: int = 0,
    size: int = 128,
    defect_ratio: float = 0.5,
    progress: bool = False,
) -> SynthSummary:
    """Write ``count`` PNG images into ``out/good/`` and ``out/defective/``.

    Files are named after their index (``good/tire_000042.png``); ``defect_ratio`` of them, spread
    evenly over the indices, are defective. Existing files of the same name are replaced; others
    are left alone.
    """
    _check_arguments(count, size, defect_ratio)
    folders = {label: out / label for label in (GOOD, DEFECTIVE)}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(folders, 0)
    for index in tqdm(range(count), desc="synth", unit="img", disable=not progress):
        label, image = _make_image(seed, index, size, defect_ratio)
        _save_png(image, folders[label] / f"tire_{index:06d}.png")
        counts[label] += 1
    logger.info("Wrote %d synthetic tires to %s: %s", count, out, counts)
    return SynthSummary(out=out, counts=counts)


def draw_tire(rng: np.random.Generator, size: int, defect: str | None) -> Image.Image:
    """Draw one ``size`` x ``size`` RGB tire image, with ``defect`` (one of DEFECT_KINDS) or none.

    The defect draws from a generator of its own, so the same ``rng`` state gives the same tire
    with and without a defect.
    """
    _check_size(size)
    if defect is not None and defect not in DEFECT_KINDS:
        raise ConfigurationError(f"defect={defect!r} is unknown; allowed: None, {DEFECT_KINDS}")
    defect_rng = np.random.default_rng(int(rng.integers(2**63)))
    light = rng.uniform(-np.pi / 2 - 1.0, -np.pi / 2 + 1.0)  # roughly from above
    side = size * _SUPERSAMPLE
    tire = _sample_tire(rng, side)
    rho, phi = _polar(side)

    wear = _wear(defect_rng, rho, phi) if defect == "worn" else None
    lum = _draw_sidewall(rng, rho, tire)
    _draw_tread(rng, lum, rho, phi, tire, wear)
    _draw_lettering(rng, lum, rho, phi, tire)
    _draw_rim(rng, lum, rho, phi, tire)
    if defect == "bulge":
        for _ in range(int(defect_rng.integers(1, 4))):
            _draw_bulge(defect_rng, lum, tire, light)

    tint = rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    outline = 1.0 if wear is None else 1.0 - 0.1 * wear[0]  # a worn tire loses its round edge
    layer = _to_rgb(lum, tint)
    if defect in ("crack", "cut"):
        marked = layer.copy()
        if defect == "crack":
            _draw_crack(defect_rng, marked, tire, tint)
        else:
            for _ in range(int(defect_rng.integers(2, 4))):
                _draw_cut(defect_rng, marked, tire, tint)
        layer = Image.composite(marked, layer, _mask(rho >= tire.rim))  # rubber only, not metal
    layer.putalpha(_mask(np.clip((outline - rho) * tire.radius + 0.5, 0.0, 1.0)))

    image = _place(rng, layer, _background(rng, size), size)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9) * size / 128))
    return _expose(rng, image, light)


# --- generation ---------------------------------------------------------------------------------


def _check_arguments(count: int, size: int, defect_ratio: float) -> None:
    if count < 1:
        raise ConfigurationError(f"count={count} is not allowed; it must be at least 1")
    _check_size(size)
    if not 0.0 < defect_ratio < 1.0:
        raise ConfigurationError(
            f"defect_ratio={defect_ratio} is not allowed; it must lie strictly between 0 and 1"
        )


def _check_size(size: int) -> None:
    if not _MIN_SIZE <= size <= _MAX_SIZE:
        raise ConfigurationError(
            f"size={size} is not allowed; it must be between {_MIN_SIZE} and {_MAX_SIZE} pixels"
        )


def _is_defective(index: int, defect_ratio: float) -> bool:
    """Spread defects evenly: any prefix of n images holds floor(n * defect_ratio) of them."""
    return math.floor((index + 1) * defect_ratio) > math.floor(index * defect_ratio)


def _make_image(seed: int, index: int, size: int, defect_ratio: float) -> tuple[str, Image.Image]:
    """The label and image of one index; depends on (seed, index) only, not on the count."""
    rng = np.random.default_rng([seed, index])
    if not _is_defective(index, defect_ratio):
        return GOOD, draw_tire(rng, size, None)
    kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
    return DEFECTIVE, draw_tire(rng, size, kind)


def _save_png(image: Image.Image, path: Path) -> None:
    """Write through a temporary name, so an interrupted run leaves no truncated PNG behind."""
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG")
    partial.replace(path)


# --- the tire -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _polar(side: int) -> tuple[_Array, _Array]:
    """Radius (in tire radii) and angle of every canvas pixel about the centre (read-only)."""
    axis = (np.arange(side, dtype=np.float32) - (side - 1) / 2) / (_RADIUS * side)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    rho, phi = np.hypot(x, y), np.arctan2(y, x)
    rho.flags.writeable = phi.flags.writeable = False
    return rho, phi


def _box(tire: _Tire, extent: float) -> tuple[slice, slice]:
    """The square of canvas pixels within ``extent`` tire radii of the centre."""
    half = math.ceil(extent * tire.radius) + 1
    low, high = max(int(tire.center) - half, 0), min(int(tire.center) + half + 1, tire.side)
    return slice(low, high), slice(low, high)


def _sample_tire(rng: np.random.Generator, side: int) -> _Tire:
    return _Tire(
        side=side,
        radius=_RADIUS * side,
        tread=rng.uniform(0.76, 0.82),
        rim=rng.uniform(0.45, 0.52),
        rubber=rng.uniform(50.0, 80.0),
    )


def _draw_sidewall(rng: np.random.Generator, rho: _Array, tire: _Tire) -> _Array:
    """Rubber everywhere, shaded like a rounded sidewall, with a few moulded rings."""
    t = np.clip((rho - tire.rim) / (tire.tread - tire.rim), 0.0, 1.0)
    lum = tire.rubber + rng.uniform(4.0, 14.0) * np.sin(np.pi * t) - 4.0 * t
    for _ in range(int(rng.integers(1, 4))):
        ring = rng.uniform(tire.rim + 0.03, tire.tread - 0.02)
        lum -= rng.uniform(3.0, 8.0) * (np.abs(rho - ring) < 0.006)
    return lum.astype(np.float32)


def _wear(rng: np.random.Generator, rho: _Array, phi: _Array) -> tuple[_Array, _Array]:
    """A worn sector: how much of the grooves is gone (0-1), and the shine of the bare rubber.

    Where the rubber is worn through, the wires of the steel belt show as pale stripes.
    """
    centre, half_width = rng.uniform(-np.pi, np.pi), rng.uniform(1.2, 1.8)
    distance = np.abs((phi - centre + np.pi) % (2 * np.pi) - np.pi)
    weight = np.clip((half_width - distance) / 0.15, 0.0, 1.0).astype(np.float32)
    belt = np.sin(rho * rng.uniform(60.0, 80.0) + rng.uniform(0, 2 * np.pi)) > 0.3
    shine = weight * (rng.uniform(30.0, 45.0) + rng.uniform(15.0, 40.0) * belt)
    return rng.uniform(0.9, 1.0) * weight, shine


def _draw_tread(
    rng: np.random.Generator,
    lum: _Array,
    rho: _Array,
    phi: _Array,
    tire: _Tire,
    wear: tuple[_Array, _Array] | None,
) -> None:
    """Tread blocks around the outer edge: cross grooves, and a groove running round the middle.

    ``wear`` (see :func:`_wear`) flattens the grooves and brightens the rubber where it is worn.
    """
    band = (rho >= tire.tread) & (rho <= 1.0)
    blocks = int(rng.integers(18, 30))
    slant = rng.uniform(-3.0, 3.0)  # grooves lean: a fraction of a block per tread width
    depth = rng.uniform(25.0, 40.0)
    position = (phi / (2 * np.pi) * blocks + slant * (rho - tire.tread) + rng.random()) % 1.0
    groove = np.clip((rng.uniform(0.3, 0.45) - position) * 8.0, 0.0, 1.0)
    middle = (tire.tread + 1.0) / 2
    groove = np.maximum(groove, np.abs(rho - middle) < rng.uniform(0.008, 0.018))
    surface = np.full_like(lum, tire.rubber - rng.uniform(5.0, 15.0))
    if wear is not None:
        flat, shine = wear
        groove = groove * (1.0 - flat)
        surface += shine
    lum[band] = (surface - depth * groove)[band]


def _draw_lettering(
    rng: np.random.Generator, lum: _Array, rho: _Array, phi: _Array, tire: _Tire
) -> None:
    """Raised, lighter letters along an arc of the sidewall: texture every tire has."""
    if rng.random() < 0.2:
        return
    height = rng.uniform(0.05, 0.08)
    bottom = rng.uniform(tire.rim + 0.02, tire.tread - height - 0.02)
    start, letters = rng.uniform(-np.pi, np.pi), int(rng.integers(5, 11))
    letter_width = rng.uniform(0.07, 0.1)
    glyphs = rng.random((letters, 5, 3)) < 0.6  # random 3x5 bitmaps
    ring = np.flatnonzero((rho >= bottom) & (rho < bottom + height))
    along = ((phi.flat[ring] - start) % (2 * np.pi)) / letter_width
    letter = along.astype(np.int64)
    row = ((rho.flat[ring] - bottom) / height * 5).astype(np.int64).clip(0, 4)
    col = ((along % 1.0) * 4).astype(np.int64)  # the fourth column is the gap between letters
    inside = (letter < letters) & (col < 3)
    lit = ring[inside][glyphs[letter[inside], 4 - row[inside], col[inside]]]
    lum.flat[lit] += rng.uniform(5.0, 14.0)


def _draw_rim(rng: np.random.Generator, lum: _Array, rho: _Array, phi: _Array, tire: _Tire) -> None:
    """A metal wheel inside the rubber: flange, spokes with dark windows, hub and lug nuts."""
    metal = rng.uniform(130.0, 210.0)
    box = _box(tire, tire.rim)
    wheel, rho_w, phi_w = lum[box], rho[box], phi[box]  # views: writes land in the canvas
    inside = rho_w < tire.rim
    wheel[inside] = (metal - 30.0 * rho_w / tire.rim + 40.0 * (rho_w > tire.rim - 0.04))[inside]
    spokes = int(rng.integers(5, 9))
    spoke = (phi_w / (2 * np.pi) * spokes + rng.random()) % 1.0
    window = (rho_w > 0.3 * tire.rim) & (rho_w < 0.82 * tire.rim)
    wheel[window & (spoke < rng.uniform(0.4, 0.7))] = rng.uniform(40.0, 80.0)

    box = _box(tire, 0.26 * tire.rim)
    hub, rho_h, phi_h = lum[box], rho[box], phi[box]
    hub[rho_h < rng.uniform(0.18, 0.26) * tire.rim] = metal + 15.0
    nuts, nut_radius = int(rng.integers(4, 7)), 0.15 * tire.rim
    x, y = rho_h * np.cos(phi_h), rho_h * np.sin(phi_h)
    for k in range(nuts):
        angle = 2 * np.pi * k / nuts
        dx, dy = x - nut_radius * np.cos(angle), y - nut_radius * np.sin(angle)
        hub[dx * dx + dy * dy < 0.025**2] = metal - 50.0


def _mask(weight: _Array) -> Image.Image:
    """A 0-1 (or boolean) array as an 8-bit mask for compositing."""
    return Image.fromarray((255 * weight.astype(np.float32) + 0.5).astype(np.uint8))


def _to_rgb(lum: _Array, tint: _Array) -> Image.Image:
    """Luminance to colour: rubber and metal are grey with a slight cast."""
    gray = Image.fromarray((lum.clip(0, 255) + 0.5).astype(np.uint8))
    levels = np.arange(256, dtype=np.float32)
    bands = [gray.point((levels * t).clip(0, 255).round().astype(int).tolist()) for t in tint]
    return Image.merge("RGB", bands)


# --- defects ------------------------------------------------------------------------------------


def _sidewall_point(rng: np.random.Generator, tire: _Tire, low: float, high: float) -> _Array:
    """A random point (x, y) on the canvas at ``low``-``high`` times the tire's radius."""
    angle, fraction = rng.uniform(-np.pi, np.pi), rng.uniform(low, high)
    offset = fraction * tire.radius * np.array([np.cos(angle), np.sin(angle)])
    return (tire.center + offset).astype(np.float32)


def _shade(tire: _Tire, tint: _Array, factor: float) -> tuple[int, int, int]:
    """The colour of this tire's rubber with its luminance times ``factor``."""
    r, g, b = (int(c) for c in np.clip(tire.rubber * factor * tint, 0, 255))
    return r, g, b


def _draw_crack(rng: np.random.Generator, layer: Image.Image, tire: _Tire, tint: _Array) -> None:
    """Dark lines that wander and branch, with pale weathered edges: rubber cracked with age."""
    step = tire.radius * rng.uniform(0.05, 0.07)
    walks = [
        (_sidewall_point(rng, tire, tire.rim + 0.06, 0.95), rng.uniform(-np.pi, np.pi), 30)
        for _ in range(int(rng.integers(3, 6)))
    ]
    lines = []
    while walks:
        point, heading, steps = walks.pop()
        line = [tuple(point)]
        for _ in range(int(rng.integers(steps // 2, steps + 1))):
            heading += rng.normal(0.0, 0.45)
            point = point + step * np.array([np.cos(heading), np.sin(heading)])
            if not tire.rim + 0.02 < np.hypot(*(point - tire.center)) / tire.radius < 0.98:
                break
            line.append(tuple(point))
            if rng.random() < 0.3 and steps > 4:
                walks.append((point, heading + rng.choice([-1.0, 1.0]) * 0.8, steps // 2))
        lines.append(line)
    width = max(1, round(tire.side * rng.uniform(0.018, 0.028)))
    draw = ImageDraw.Draw(layer)
    edge = _shade(tire, tint, rng.uniform(1.5, 2.0))
    core = _shade(tire, tint, rng.uniform(0.0, 0.1))
    for colour, stroke in ((edge, 2 * width), (core, width)):
        for line in lines:
            draw.line(line, fill=colour, width=stroke, joint="curve")


def _draw_cut(rng: np.random.Generator, layer: Image.Image, tire: _Tire, tint: _Array) -> None:
    """A short, thick, dark gash with a lighter lip, the pale cords of the carcass showing."""
    centre = _sidewall_point(rng, tire, tire.rim + 0.12, 0.9)
    dx, dy = centre - tire.center
    heading = math.atan2(dy, dx) + np.pi / 2 + rng.uniform(-0.5, 0.5)  # roughly along the wall
    along = np.array([np.cos(heading), np.sin(heading)]) * tire.radius * rng.uniform(0.25, 0.38)
    across = np.array([-along[1], along[0]]) * rng.uniform(0.28, 0.42)
    draw = ImageDraw.Draw(layer)
    lip = _shade(tire, tint, rng.uniform(1.6, 2.2))
    draw.polygon([tuple(p) for p in _lens(centre + across * 0.35, along, across)], fill=lip)
    gash = _shade(tire, tint, rng.uniform(0.0, 0.15))
    draw.polygon([tuple(p) for p in _lens(centre, along, across)], fill=gash)
    cord = tuple(int(c) for c in rng.uniform(130.0, 200.0) * tint)
    width = max(1, round(tire.side * rng.uniform(0.005, 0.01)))
    for s in rng.uniform(-0.6, 0.6, size=int(rng.integers(2, 6))):
        reach = across * (1 - s * s) * 0.8  # cords bridge the gash from lip to lip
        ends = centre + along * s - reach, centre + along * s + reach
        draw.line([tuple(p) for p in ends], fill=cord, width=width)


def _lens(centre: _Array, along: _Array, across: _Array) -> list[_Array]:
    """Points of a lens shape: pointed at both ends of ``along``, ``across`` wide at the middle."""
    t = np.linspace(-1.0, 1.0, 9)
    top = [centre + along * s + across * (1 - s * s) for s in t]
    bottom = [centre + along * s - across * (1 - s * s) for s in t[::-1]]
    return top + bottom


def _draw_bulge(rng: np.random.Generator, lum: _Array, tire: _Tire, light: float) -> None:
    """An elliptical bump on the sidewall, lit from one side: a highlight and a shadow."""
    middle = (tire.rim + tire.tread) / 2
    cx, cy = _sidewall_point(rng, tire, middle - 0.04, middle + 0.04)
    radial = np.array([cx - tire.center, cy - tire.center]) / np.hypot(
        cx - tire.center, cy - tire.center
    )
    along = tire.radius * rng.uniform(0.22, 0.32)
    across = tire.radius * rng.uniform(0.13, 0.17)
    reach = int(2.5 * along) + 1
    x0, y0 = max(int(cx) - reach, 0), max(int(cy) - reach, 0)
    x1, y1 = min(int(cx) + reach, tire.side), min(int(cy) + reach, tire.side)
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = x - cx, y - cy
    normal = dx * radial[0] + dy * radial[1]
    tangent = -dx * radial[1] + dy * radial[0]
    height = np.exp(-((tangent / along) ** 2 + (normal / across) ** 2) * 2.0)
    gy, gx = np.gradient(height)
    slope = -(gx * np.cos(light) + gy * np.sin(light)) * across  # the side facing the light
    strength = rng.uniform(100.0, 150.0)
    lum[y0:y1, x0:x1] += strength * (slope * 2.0 + 0.6 * height)


# --- camera -------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A floor or backdrop: a random colour with a soft gradient across it."""
    colour = rng.uniform(60.0, 200.0) * rng.uniform(0.85, 1.15, size=3)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gradient = rng.uniform(-25.0, 25.0) * ramp[:, None] + rng.uniform(-25.0, 25.0) * ramp[None, :]
    rgb = np.clip(colour + gradient[..., None], 0, 255)
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def _place(
    rng: np.random.Generator, layer: Image.Image, background: Image.Image, size: int
) -> Image.Image:
    """Scale, squash (a slightly oblique view), rotate and shift the tire onto the background."""
    scale = rng.uniform(0.88, 1.04) / _SUPERSAMPLE
    squash = rng.uniform(0.88, 1.0)
    angle = rng.uniform(-0.26, 0.26)
    shift = rng.uniform(-0.06, 0.06, size=2) * size + size / 2
    cos, sin = math.cos(angle), math.sin(angle)
    # PIL's affine maps each output pixel back into the layer: the inverse of the forward map.
    a, b = cos / scale, sin / scale
    d, e = -sin / (scale * squash), cos / (scale * squash)
    c = layer.width / 2 - a * shift[0] - b * shift[1]
    f = layer.height / 2 - d * shift[0] - e * shift[1]
    placed = layer.transform(
        (size, size), Image.Transform.AFFINE, (a, b, c, d, e, f), Image.Resampling.BILINEAR
    )
    return Image.alpha_composite(background.convert("RGBA"), placed).convert("RGB")


def _expose(rng: np.random.Generator, image: Image.Image, light: float) -> Image.Image:
    """Uneven lighting, an exposure change and sensor noise."""
    pixels = np.asarray(image, dtype=np.float32)
    size = pixels.shape[0]
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    falloff = 1.0 + rng.uniform(0.0, 0.3) * (
        np.cos(light) * ramp[None, :] + np.sin(light) * ramp[:, None]
    )
    pixels = pixels * (falloff * rng.uniform(0.8, 1.2))[..., None]
    pixels += rng.normal(0.0, rng.uniform(1.0, 5.0), size=pixels.shape)
    return Image.fromarray(np.round(np.clip(pixels, 0, 255)).astype(np.uint8))

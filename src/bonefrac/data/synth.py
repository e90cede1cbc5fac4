"""Phantom radiographs: the synthetic data set bonefrac ships instead of real images.

Each image is a parallel-beam projection through an analytic 3-D phantom of a limb: a soft-tissue envelope,
one or two long bones (hollow elliptic cylinders that flare into a rounded end) and a few small bones beyond
the joint. The detector sees I = I0 * exp(-sum(mu * L)) where the chord lengths L are computed in closed form
per pixel, so no voxel volume is ever built. A fracture splits one bone along cut surfaces into fragments that
are moved and rotated in the image plane before projection; a hairline fracture is a thin, partial lucent
band instead. Blur, quantum noise, exposure, windowing, pose, collimation borders and a side marker follow
the same distributions for every class, so nothing but the fracture tells the label.

These images are synthetic. They exist so that the tests and the demo run without real data; they are not
radiographs of people and must never be used for anything clinical.

Units: lengths are in "limb units" where 1.0 is half the image width at pose scale 1; attenuation
coefficients are per limb unit.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bonefrac import __version__
from bonefrac.data.dataset import BOXES_FILE, SYNTHETIC_NOTICE
from bonefrac.errors import DatasetError

FRACTURE_TYPES = ("transverse", "oblique", "spiral", "comminuted", "hairline")
NOT_FRACTURED = "not_fractured"
ANATOMIES = ("forearm", "leg", "arm")
SPLITS = ("train", "val", "test")

# Attenuation coefficients per limb unit (1 unit ~ 6 cm of a forearm at scale 1). Their ratios follow soft
# tissue, cortical bone and marrow at diagnostic energies (cortex ~ 5-8x tissue); absolute values are chosen
# so that the thickest part of a limb transmits a few percent of the beam, like a real extremity exposure.
MU_TISSUE = 1.3
MU_CORTEX = 9.0
MU_MARROW = 1.6
MU_CANCELLOUS = 4.2  # spongy bone in the flared ends and the small bones of the wrist / ankle

# A pool pays for itself only when there is enough work to share.
_POOL_MIN_IMAGES = 16


# --------------------------------------------------------------------------------------------------------
# Parameters of one phantom
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bone:
    """A long bone: a hollow elliptic cylinder along the limb axis that flares into a rounded distal end."""

    offset: float  # across-limb position of the shaft axis
    radius: float  # in-plane outer semi-axis of the shaft
    depth_ratio: float  # depth semi-axis / in-plane semi-axis (an elliptic, not round, cross-section)
    cortex: float  # cortical wall thickness at the shaft
    end: float  # along-limb position where the articular end starts to round off
    flare: float  # relative widening over the metaphysis (0.6 -> the end is 1.6x the shaft)
    flare_length: float  # along-limb length of the metaphysis
    bow: float  # gentle curvature: the axis moves across by bow * u**2


@dataclass(frozen=True)
class SmallBone:
    """A carpal / tarsal bone beyond the joint: an ellipsoid of cancellous bone."""

    center: tuple[float, float]  # (across, along) in limb units
    axes: tuple[float, float, float]  # (across, along, depth) semi-axes before rotation
    angle: float  # in-plane rotation, radians


@dataclass(frozen=True)
class Cut:
    """A fracture surface across a bone.

    In the bone's own frame (s along the axis, t across it) the surface crosses the wall at
    s = position + slope * t (+ a helical term). A planar cut contains the beam direction, so the front and
    back walls are cut at the same height. A spiral cut is a helix of the given pitch around the axis: the
    front wall (angle phi = +arccos(t / r)) and the back wall (-phi) are cut at different heights, which is
    what draws the typical two curved lines and the longitudinal spike on a radiograph.
    """

    position: float
    slope: float = 0.0  # tan of the angle from the perpendicular to the axis; 0 is transverse
    pitch: float = 0.0  # helix pitch (along-bone advance per turn); 0 for a planar cut
    phase: float = 0.0  # angle around the axis where the helix has its longitudinal seam
    gap: float = 0.0  # bone removed around the surface (fracture line width)


@dataclass(frozen=True)
class Fragment:
    """The part of the broken bone between two cuts, and how it moved.

    The fragment is {proximal(t) + gap/2 < s < distal(t) - gap/2, across[0] < t < across[1]}; it is then
    rotated by `rotation` about `pivot` and translated by `shift` (both in limb coordinates, across first).
    """

    proximal: Cut | None = None  # None: the fragment runs on out of view
    distal: Cut | None = None
    across: tuple[float, float] = (-math.inf, math.inf)  # a butterfly piece is only part of the width
    shift: tuple[float, float] = (0.0, 0.0)
    rotation: float = 0.0
    pivot: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Crack:
    """A hairline fracture: a thin band where the bone is partly lucent, undisplaced, maybe incomplete."""

    position: float
    slope: float
    width: float  # limb units; about one or two pixels at 256 px
    depth: float  # fraction of the bone's attenuation missing in the band (the crack's contrast)
    span: tuple[float, float]  # across-bone extent as fractions of the radius, -1 .. 1 is complete


@dataclass(frozen=True)
class Fracture:
    """Which bone is broken and how: fragments (displaced types) or a crack (hairline)."""

    kind: str
    bone: int  # index into Phantom.bones
    fragments: tuple[Fragment, ...]
    crack: Crack | None = None


@dataclass(frozen=True)
class Pose:
    """Where the limb lies in the image: image = shift + scale * rotate(rotation) @ (across, along)."""

    rotation: float
    shift: tuple[float, float]
    scale: float


@dataclass(frozen=True)
class Detector:
    """Exposure, detector and display settings."""

    photons: float  # unattenuated counts per pixel; sets the quantum noise
    heel: float  # beam intensity gradient across the field (anode heel effect)
    heel_angle: float
    blur: float  # detector PSF sigma in pixels at 256 px (scaled with the image size)
    bone_contrast: float  # beam-energy factor on bone attenuation (lower kVp -> more bone contrast)
    window: tuple[float, float]  # attenuation shown as black .. white
    gamma: float


@dataclass(frozen=True)
class Phantom:
    """Everything sampled for one image; `render` turns it into pixels without further randomness."""

    anatomy: str
    side: str  # "L" or "R": the marker letter, and which way the anatomy is mirrored
    bones: tuple[Bone, ...]
    small_bones: tuple[SmallBone, ...]
    tissue: tuple[float, float, float, float]  # (offset, half-width, depth ratio, taper) of the envelope
    pose: Pose
    detector: Detector
    borders: tuple[float, float, float, float]  # collimation width per side (top, right, bottom, left)
    border_value: int  # shutter grey level: dark or bright, one per image
    marker_corner: int  # 0 top-left, 1 top-right, 2 bottom-right, 3 bottom-left
    marker_value: int
    noise_seed: int
    fracture: Fracture | None = None

    @property
    def fracture_type(self) -> str | None:
        """The fracture type, or None when the bone is intact."""
        return None if self.fracture is None else self.fracture.kind

    def intact(self) -> Phantom:
        """The same limb, pose, exposure and noise, without the fracture."""
        return replace(self, fracture=None)


# --------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------


def sample_phantom(rng: np.random.Generator, *, fracture: str | None) -> Phantom:
    """Draw one phantom; `fracture` is one of FRACTURE_TYPES, or None for an intact limb.

    The fracture is drawn last, so the same generator state gives the same limb, pose and exposure with or
    without a fracture: `sample_phantom(g1, fracture="oblique").intact() == sample_phantom(g2, fracture=None)`
    for two generators in the same state.
    """
    if fracture is not None and fracture not in FRACTURE_TYPES:
        raise ValueError(f"unknown fracture type {fracture!r}; expected one of {FRACTURE_TYPES} or None")
    anatomy = ANATOMIES[int(rng.integers(len(ANATOMIES)))]
    side = "L" if rng.random() < 0.5 else "R"
    mirror = 1.0 if side == "L" else -1.0
    bones = _sample_bones(rng, anatomy, mirror)
    small_bones = _sample_small_bones(rng, anatomy, bones)
    offsets = [b.offset for b in bones]
    half_span = (max(offsets) - min(offsets)) / 2 + max(b.radius for b in bones)
    tissue = (
        float(np.mean(offsets) + rng.uniform(-0.03, 0.03)),
        float(half_span * rng.uniform(1.7, 2.3) + 0.08),
        float(rng.uniform(0.75, 0.95)),
        float(rng.uniform(0.0, 0.15)),
    )
    # Wrist/ankle at the bottom or the top of the image, with a moderate tilt.
    rotation = math.radians(rng.uniform(-25, 25)) + (math.pi if rng.random() < 0.5 else 0.0)
    pose = Pose(rotation, (float(rng.uniform(-0.08, 0.08)), float(rng.uniform(-0.08, 0.08))),
                float(rng.uniform(0.75, 1.05)))
    low = float(rng.uniform(-0.1, 0.3))
    detector = Detector(
        photons=float(math.exp(rng.uniform(math.log(300), math.log(3000)))),
        heel=float(rng.uniform(0.0, 0.2)),
        heel_angle=float(rng.uniform(0, 2 * math.pi)),
        blur=float(rng.uniform(0.6, 1.4)),
        bone_contrast=float(rng.uniform(0.85, 1.15)),
        window=(low, low + float(rng.uniform(2.6, 3.6))),
        gamma=float(rng.uniform(0.75, 1.3)),
    )
    borders = tuple(float(rng.uniform(0.02, 0.1)) if rng.random() < 0.35 else 0.0 for _ in range(4))
    border_value = int(rng.integers(0, 25)) if rng.random() < 0.5 else int(rng.integers(225, 256))
    marker_corner = int(rng.integers(4))
    marker_value = int(rng.integers(215, 256))
    noise_seed = int(rng.integers(2**63))
    broken = None if fracture is None else _sample_fracture(rng, fracture, bones)
    return Phantom(anatomy, side, bones, small_bones, tissue, pose, detector, borders,
                   border_value, marker_corner, marker_value, noise_seed, broken)


def _sample_bones(rng: np.random.Generator, anatomy: str, mirror: float) -> tuple[Bone, ...]:
    """Shaft sizes loosely follow adult anatomy: radius+ulna, tibia+fibula, or one humerus-like bone."""

    def bone(offset, radius, cortex, end, flare, flare_length) -> Bone:
        return Bone(offset=mirror * offset, radius=radius, depth_ratio=float(rng.uniform(0.8, 1.05)),
                    cortex=cortex * radius, end=end, flare=flare, flare_length=flare_length,
                    bow=float(rng.uniform(-0.06, 0.06)))

    end = float(rng.uniform(0.5, 1.0))
    if anatomy == "forearm":
        gap = rng.uniform(0.12, 0.2)
        r_radius, r_ulna = rng.uniform(0.075, 0.095), rng.uniform(0.055, 0.07)
        return (
            bone(gap / 2 + r_radius / 2, r_radius, rng.uniform(0.25, 0.35), end, rng.uniform(0.6, 0.9),
                 rng.uniform(0.2, 0.3)),
            bone(-gap / 2 - r_ulna / 2, r_ulna, rng.uniform(0.28, 0.38), end - rng.uniform(0.0, 0.05),
                 rng.uniform(0.15, 0.35), rng.uniform(0.1, 0.2)),
        )
    if anatomy == "leg":
        r_tibia, r_fibula = rng.uniform(0.12, 0.15), rng.uniform(0.04, 0.055)
        gap = rng.uniform(0.08, 0.14)
        return (
            bone(-r_tibia / 2, r_tibia, rng.uniform(0.22, 0.3), end, rng.uniform(0.45, 0.65),
                 rng.uniform(0.25, 0.35)),
            bone(r_tibia / 2 + gap + r_fibula, r_fibula, rng.uniform(0.3, 0.4), end + rng.uniform(0.02, 0.06),
                 rng.uniform(0.3, 0.5), rng.uniform(0.1, 0.15)),
        )
    r = rng.uniform(0.11, 0.15)
    return (bone(rng.uniform(-0.03, 0.03), r, rng.uniform(0.22, 0.3), end, rng.uniform(0.6, 0.9),
                 rng.uniform(0.25, 0.35)),)


def _sample_small_bones(rng: np.random.Generator, anatomy: str,
                        bones: Sequence[Bone]) -> tuple[SmallBone, ...]:
    """A cluster of carpals / tarsals, or an opposing joint surface for a single bone."""
    lo = min(b.offset - b.radius * (1 + b.flare) for b in bones)
    hi = max(b.offset + b.radius * (1 + b.flare) for b in bones)
    start = max(b.end for b in bones) + 0.03
    count = {"forearm": int(rng.integers(4, 7)), "leg": int(rng.integers(2, 4)), "arm": 1}[anatomy]
    size = {"forearm": (0.045, 0.075), "leg": (0.08, 0.13), "arm": (0.12, 0.16)}[anatomy]
    small = []
    for k in range(count):
        a, b = rng.uniform(*size), rng.uniform(*size)
        across = lo + (hi - lo) * (k + 0.5) / count + rng.uniform(-0.02, 0.02)
        along = start + b + rng.uniform(0.0, 0.04) + (0.1 * (k % 2) if anatomy == "forearm" else 0.0)
        depth = rng.uniform(0.7, 1.0) * a
        small.append(SmallBone((float(across), float(along)), (float(a), float(b), float(depth)),
                               float(rng.uniform(-0.6, 0.6))))
    return tuple(small)


def _sample_fracture(rng: np.random.Generator, kind: str, bones: Sequence[Bone]) -> Fracture:
    """Cut surfaces and fragment displacements for one fracture type, scaled to the broken bone."""
    # The main bone (radius, tibia) breaks more often than its thin companion.
    index = 0 if len(bones) == 1 or rng.random() < 0.7 else 1
    bone = bones[index]
    r = bone.radius
    # Keep the fracture in the central part of the image so borders and markers never hide it.
    position = float(rng.uniform(-0.4, min(0.4, bone.end - 0.1)))
    pivot = (bone.offset + bone.bow * position**2, position)
    gap = float(rng.uniform(0.004, 0.012))

    def sign() -> float:
        return 1.0 if rng.random() < 0.5 else -1.0

    def distal_displacement() -> dict:
        return dict(
            shift=(float(sign() * rng.uniform(0.15, 0.9) * r), float(rng.uniform(-0.5, 0.25) * r)),
            rotation=float(sign() * math.radians(rng.uniform(2, 12))),
            pivot=pivot,
        )

    if kind in ("transverse", "oblique"):
        angle = rng.uniform(-10, 10) if kind == "transverse" else sign() * rng.uniform(30, 60)
        cut = Cut(position, slope=float(math.tan(math.radians(angle))), gap=gap)
        return Fracture(kind, index, (Fragment(distal=cut), Fragment(proximal=cut, **distal_displacement())))

    if kind == "spiral":
        # Fragments slide along the helix: mostly shortening, little sideways shift.
        pitch = sign() * rng.uniform(4.0, 7.0) * r
        cut = Cut(position, slope=float(rng.uniform(-0.2, 0.2)), pitch=float(pitch),
                  phase=float(rng.uniform(-0.8, 0.8)), gap=gap)
        moved = Fragment(proximal=cut, shift=(float(sign() * rng.uniform(0.1, 0.4) * r),
                                              float(-rng.uniform(0.2, 0.8) * r)),
                         rotation=float(sign() * math.radians(rng.uniform(1, 8))), pivot=pivot)
        return Fracture(kind, index, (Fragment(distal=cut), moved))

    if kind == "comminuted":
        # Two cuts leaning towards each other bound a wedge ("butterfly") that may split in two.
        a1, a2 = (math.tan(math.radians(rng.uniform(15, 40))) for _ in range(2))
        length = r * (a1 + a2) * rng.uniform(1.0, 1.5) + r * rng.uniform(0.4, 0.9)
        lean = sign()
        first = Cut(position - length / 2, slope=float(lean * a1), gap=gap)
        second = Cut(position + length / 2, slope=float(-lean * a2), gap=gap)
        pieces = [Fragment(distal=first), Fragment(proximal=second, **distal_displacement())]
        split = float(rng.uniform(-0.3, 0.3) * r)
        middle = [(-math.inf, split - gap / 2), (split + gap / 2, math.inf)] if rng.random() < 0.7 else [
            (-math.inf, math.inf)]
        for lo, hi in middle:
            outward = 1.0 if lo > -math.inf else -1.0 if hi < math.inf else sign()
            pieces.append(Fragment(
                proximal=first, distal=second, across=(lo, hi),
                shift=(float(outward * rng.uniform(0.15, 0.6) * r), float(rng.uniform(-0.3, 0.3) * r)),
                rotation=float(sign() * math.radians(rng.uniform(5, 25))),
                pivot=(pivot[0] + outward * r / 2, position),
            ))
        return Fracture(kind, index, tuple(pieces))

    # hairline: one undisplaced fragment with a thin, faint, often incomplete lucent band
    extent = float(rng.uniform(0.6, 1.0)) * 2
    span = (-1.0, -1.0 + extent) if rng.random() < 0.5 else (1.0 - extent, 1.0)
    crack = Crack(position, slope=float(math.tan(math.radians(rng.uniform(-40, 40)))),
                  width=float(rng.uniform(0.009, 0.014)), depth=float(rng.uniform(0.55, 0.85)), span=span)
    return Fracture(kind, index, (Fragment(),), crack)


# --------------------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------------------


def render(phantom: Phantom, size: int = 256) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """Project the phantom into a (size, size) uint8 radiograph (bone bright, air dark).

    Returns the image and the fracture region as a pixel box (x0, y0, x1, y1), x1 and y1 exclusive like a
    PIL crop box, or None when the limb is intact.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels (room for the side marker), not {size}")
    v, u = _limb_coordinates(phantom.pose, size)
    attenuation = _attenuation(phantom, v, u, pixel=2 / (size * phantom.pose.scale))
    display = _expose(attenuation, phantom.detector, phantom.noise_seed, size)
    image = np.round(display * 255).astype(np.uint8)
    widths = _collimate(image, phantom.borders, phantom.border_value)
    _burn_marker(image, phantom.side, phantom.marker_corner, phantom.marker_value, widths)
    region = None if phantom.fracture is None else _fracture_region(phantom, size)
    return image, region


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in normalized image coordinates, -1 .. 1 left to right and top to bottom."""
    centres = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1)
    x, y = np.meshgrid(centres, centres)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _limb_coordinates(pose: Pose, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's (across, along) position in the limb frame: the inverse of the pose."""
    x, y = _pixel_grid(size)
    c, s = math.cos(pose.rotation), math.sin(pose.rotation)
    dx, dy = (x - pose.shift[0]) / pose.scale, (y - pose.shift[1]) / pose.scale
    return c * dx + s * dy, -s * dx + c * dy


def _to_image(pose: Pose, across: np.ndarray, along: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Limb coordinates to pixel coordinates (column, row), pixel centres at integers."""
    c, s = math.cos(pose.rotation), math.sin(pose.rotation)
    x = pose.shift[0] + pose.scale * (c * across - s * along)
    y = pose.shift[1] + pose.scale * (s * across + c * along)
    return (x + 1) / 2 * size - 0.5, (y + 1) / 2 * size - 0.5


def _chord(radius: np.ndarray | float, t: np.ndarray, depth_ratio: float) -> np.ndarray:
    """Path length through an ellipse with semi-axes (radius, depth_ratio * radius) at in-plane distance t."""
    return 2 * depth_ratio * np.sqrt(np.maximum(np.square(radius) - np.square(t), 0))


def _attenuation(phantom: Phantom, v: np.ndarray, u: np.ndarray, pixel: float) -> np.ndarray:
    """The line integral sum(mu * L) at every pixel; `pixel` is the pixel pitch in limb units."""
    offset, half_width, depth_ratio, taper = phantom.tissue
    total = MU_TISSUE * _chord(half_width * (1 - taper * u), v - offset, depth_ratio)
    contrast = phantom.detector.bone_contrast
    fracture = phantom.fracture
    for index, bone in enumerate(phantom.bones):
        if fracture is None or fracture.bone != index:
            total += _bone_attenuation(bone, v, u, contrast)
            continue
        for fragment in fracture.fragments:
            # Render a moved fragment by moving the pixels back into the bone's original frame.
            fv, fu = _undo_displacement(fragment, v, u)
            s, t = fu, fv - bone.offset - bone.bow * np.square(fu)
            weight = _fragment_weight(fragment, s, t, bone.radius, pixel)
            if fracture.crack is not None:
                crack = fracture.crack
                weight = weight * (1 - crack.depth * _crack_band(crack, s, t, bone.radius, pixel))
            total += _bone_attenuation(bone, fv, fu, contrast) * weight
    cancellous = MU_CANCELLOUS * contrast - MU_TISSUE
    for small in phantom.small_bones:
        c, s = math.cos(small.angle), math.sin(small.angle)
        dv, du = v - small.center[0], u - small.center[1]
        a, b, depth = small.axes
        inside = 1 - np.square((c * dv + s * du) / a) - np.square((-s * dv + c * du) / b)
        total += cancellous * 2 * depth * np.sqrt(np.maximum(inside, 0))
    return total


def _bone_attenuation(bone: Bone, v: np.ndarray, u: np.ndarray, contrast: float) -> np.ndarray:
    """Attenuation a bone adds over the soft tissue it displaces: cortex shell plus marrow core."""
    s, t = u, v - bone.offset - bone.bow * np.square(u)
    # Metaphysis: the bone widens, the cortex thins and the marrow turns into denser cancellous bone.
    w = np.clip((s - (bone.end - bone.flare_length)) / bone.flare_length, 0, 1)
    w = w * w * (3 - 2 * w)
    outer = bone.radius * (1 + bone.flare * w)
    cap = 0.35 * bone.radius * (1 + bone.flare)
    beyond = np.clip((s - bone.end) / cap, 0, 1)
    outer = outer * np.sqrt(1 - np.square(beyond))  # rounded articular end
    inner = np.maximum(outer - bone.cortex * (1 - 0.7 * w), 0)
    l_outer, l_inner = _chord(outer, t, bone.depth_ratio), _chord(inner, t, bone.depth_ratio)
    marrow = MU_MARROW + (MU_CANCELLOUS - MU_MARROW) * w
    cortex_excess = MU_CORTEX * contrast - MU_TISSUE
    return cortex_excess * (l_outer - l_inner) + (marrow * contrast - MU_TISSUE) * l_inner


def _undo_displacement(fragment: Fragment, v: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map displaced positions back to where that piece of bone was before the fracture."""
    if fragment.rotation == 0 and fragment.shift == (0.0, 0.0):
        return v, u
    pv, pu = fragment.pivot
    dv, du = v - pv - fragment.shift[0], u - pu - fragment.shift[1]
    c, s = math.cos(fragment.rotation), math.sin(fragment.rotation)
    return pv + c * dv + s * du, pu - s * dv + c * du


def _cut_heights(cut: Cut, t: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Along-bone height of the cut surface on the front and on the back wall at across position t."""
    planar = cut.position + cut.slope * t
    if cut.pitch == 0:
        return planar, planar
    phi = np.arccos(np.clip(t / radius, -1, 1))
    turn = cut.pitch / (2 * math.pi)
    # Angles measured from the seam, wrapped to -pi .. pi: the helix jumps by one pitch at the seam.
    front = np.mod(phi - cut.phase + math.pi, 2 * math.pi) - math.pi
    back = np.mod(-phi - cut.phase + math.pi, 2 * math.pi) - math.pi
    return planar + turn * front, planar + turn * back


def _fragment_weight(fragment: Fragment, s: np.ndarray, t: np.ndarray, radius: float,
                     pixel: float) -> np.ndarray | float:
    """Fraction of the ray's path through the bone that belongs to this fragment (front and back halves).

    Edges are ramps one pixel wide, an area-coverage estimate, so a gap thinner than a pixel still shows
    as a faint line instead of vanishing between pixel centres.
    """
    front = back = 1.0
    for cut, side in ((fragment.proximal, 1.0), (fragment.distal, -1.0)):
        if cut is None:
            continue
        # Distance across the cut line, not along the axis, sets how much of a pixel is covered.
        scale = 1 / (pixel * math.hypot(1.0, cut.slope))
        f, b = _cut_heights(cut, t, radius)
        front = front * _ramp((side * (s - f) - cut.gap / 2) * scale)
        back = back * _ramp((side * (s - b) - cut.gap / 2) * scale)
    weight = (front + back) / 2
    lo, hi = fragment.across
    if lo > -math.inf:
        weight = weight * _ramp((t - lo) / pixel)
    if hi < math.inf:
        weight = weight * _ramp((hi - t) / pixel)
    return weight


def _ramp(x: np.ndarray) -> np.ndarray:
    """0 below -1/2, 1 above 1/2, linear between: a pixel's coverage by a half-plane at signed distance x."""
    return np.clip(x + 0.5, 0, 1)


def _crack_band(crack: Crack, s: np.ndarray, t: np.ndarray, radius: float, pixel: float) -> np.ndarray:
    """How much of each pixel the hairline's lucent band covers (0 .. 1)."""
    distance = np.abs(s - crack.position - crack.slope * t) / math.hypot(1.0, crack.slope)
    # Overlap of the pixel [d - p/2, d + p/2] with the band [-w/2, w/2], as a fraction of the pixel.
    half = crack.width / 2
    overlap = np.minimum(distance + pixel / 2, half) - np.maximum(distance - pixel / 2, -half)
    lo, hi = crack.span
    within = _ramp((t - lo * radius) / pixel) * _ramp((hi * radius - t) / pixel)
    return np.clip(overlap / pixel, 0, 1) * within


# --------------------------------------------------------------------------------------------------------
# Detector and display
# --------------------------------------------------------------------------------------------------------


def _expose(attenuation: np.ndarray, detector: Detector, noise_seed: int, size: int) -> np.ndarray:
    """Beer-Lambert transmission, detector blur, quantum noise, then log display windowing (0 .. 1)."""
    x, y = _pixel_grid(size)
    beam = detector.photons * (1 + detector.heel * (x * math.cos(detector.heel_angle)
                                                    + y * math.sin(detector.heel_angle)))
    transmitted = _gaussian_blur(np.exp(-attenuation), detector.blur * size / 256)
    counts = beam * transmitted
    # Gaussian approximation of Poisson noise: one fixed normal field per seed, so a fractured phantom and
    # its intact twin differ only where the bone differs.
    noise = np.random.default_rng(noise_seed).standard_normal((size, size), dtype=np.float32)
    counts = np.maximum(counts + np.sqrt(counts) * noise, 0.5)
    shown = -np.log(counts / beam)
    low, high = detector.window
    return np.clip((shown - low) / (high - low), 0, 1) ** detector.gamma


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected edges (the detector's point spread function)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    for axis in (0, 1):
        padded = np.pad(image, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="reflect")
        n = image.shape[axis]
        image = sum(w * padded[k:k + n] if axis == 0 else w * padded[:, k:k + n] for k, w in enumerate(taps))
    return image


def _collimate(image: np.ndarray, borders: Sequence[float], value: int) -> tuple[int, int, int, int]:
    """Paint the shutter edges in place; returns their widths in pixels (top, right, bottom, left)."""
    size = image.shape[0]
    top, right, bottom, left = (int(round(b * size)) for b in borders)
    image[:top] = value
    image[size - bottom:] = value
    image[:, :left] = value
    image[:, size - right:] = value
    return top, right, bottom, left


@lru_cache(maxsize=16)
def _marker_glyph(letter: str, scale: int) -> np.ndarray:
    """The side letter in PIL's default font, enlarged with hard edges like a lead marker."""
    glyph = Image.new("L", (16, 16))
    ImageDraw.Draw(glyph).text((3, 1), letter, fill=255, font=ImageFont.load_default())
    glyph = glyph.crop(glyph.getbbox())
    glyph = glyph.resize((glyph.width * scale, glyph.height * scale), Image.Resampling.NEAREST)
    array = np.asarray(glyph)
    array.setflags(write=False)
    return array


def _burn_marker(image: np.ndarray, letter: str, corner: int, value: int, borders: Sequence[int]) -> None:
    """Burn the bright L/R marker into a corner of the exposed field, in place."""
    size = image.shape[0]
    glyph = _marker_glyph(letter, max(1, round(size / 100)))
    h, w = glyph.shape
    margin = max(2, size // 32)
    top, right, bottom, left = borders
    row = top + margin if corner in (0, 1) else size - bottom - margin - h
    col = left + margin if corner in (0, 3) else size - right - margin - w
    patch = image[row:row + h, col:col + w]
    np.maximum(patch, (glyph.astype(np.float32) / 255 * value).astype(np.uint8), out=patch)


def _fracture_region(phantom: Phantom, size: int) -> tuple[int, int, int, int]:
    """Pixel box around the fracture lines, at their displaced positions, padded by about half a shaft."""
    fracture = phantom.fracture
    assert fracture is not None
    bone = phantom.bones[fracture.bone]
    r = bone.radius * (1 + bone.flare)
    points: list[tuple[np.ndarray, np.ndarray]] = []  # (across, along) in limb units
    t = np.linspace(-bone.radius, bone.radius, 33)
    for fragment in fracture.fragments:
        lo, hi = fragment.across
        tt = t[(t > lo) & (t < hi)] if lo > -math.inf or hi < math.inf else t
        for cut in (fragment.proximal, fragment.distal):
            if cut is None:
                continue
            for height in _cut_heights(cut, tt, bone.radius):
                across = tt + bone.offset + bone.bow * np.square(height)
                points.append(_apply_displacement(fragment, across, height))
    if fracture.crack is not None:
        crack = fracture.crack
        tt = np.linspace(crack.span[0], crack.span[1], 17) * bone.radius
        height = crack.position + crack.slope * tt
        points.append((tt + bone.offset + bone.bow * np.square(height), height))
    across = np.concatenate([p[0] for p in points])
    along = np.concatenate([p[1] for p in points])
    col, row = _to_image(phantom.pose, across, along, size)
    pad = max(2.0, 0.4 * r * phantom.pose.scale * size / 2)
    x0, y0 = int(max(0, math.floor(col.min() - pad))), int(max(0, math.floor(row.min() - pad)))
    x1, y1 = int(min(size, math.ceil(col.max() + pad) + 1)), int(min(size, math.ceil(row.max() + pad) + 1))
    return x0, y0, x1, y1


def _apply_displacement(fragment: Fragment, v: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where a point of the fragment ends up after the fracture (the inverse of _undo_displacement)."""
    pv, pu = fragment.pivot
    c, s = math.cos(fragment.rotation), math.sin(fragment.rotation)
    dv, du = v - pv, u - pu
    return pv + c * dv - s * du + fragment.shift[0], pu + s * dv + c * du + fragment.shift[1]


# --------------------------------------------------------------------------------------------------------
# Data set on disk
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One image to write: its seed index, where it goes and what it shows."""

    index: int
    split: str
    label: str
    fracture_type: str | None

    @property
    def path(self) -> str:
        return f"{self.split}/{self.label}/phantom_{self.index:06d}.png"


def classes_for(labels: str) -> tuple[str, ...]:
    """Class folder names for labels="binary" or labels="types"."""
    if labels == "binary":
        return ("fractured", NOT_FRACTURED)
    if labels == "types":
        return (NOT_FRACTURED, *FRACTURE_TYPES)
    raise ValueError(f"labels must be 'binary' or 'types', not {labels!r}")


def _plan(n: int, labels: str, split: tuple[float, float, float]) -> list[_Item]:
    """Balanced classes (image i is class i mod k), each split in order: deterministic and stratified."""
    classes = classes_for(labels)
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if len(split) != 3 or min(split) < 0 or not math.isclose(sum(split), 1.0, abs_tol=1e-6):
        raise ValueError(f"split must be three non-negative fractions that sum to 1, not {split}")
    members: dict[str, list[int]] = {c: [] for c in classes}
    for i in range(n):
        members[classes[i % len(classes)]].append(i)
    items = []
    for label, indices in members.items():
        n_train = round(len(indices) * split[0])
        n_val = min(round(len(indices) * split[1]), len(indices) - n_train)
        for k, i in enumerate(indices):
            part = "train" if k < n_train else "val" if k < n_train + n_val else "test"
            if label == "fractured":
                # Types cycle through the fractured images, so every split gets an even mix.
                kind: str | None = FRACTURE_TYPES[(i // len(classes)) % len(FRACTURE_TYPES)]
            else:
                kind = None if label == NOT_FRACTURED else label
            items.append(_Item(i, part, label, kind))
    return sorted(items, key=lambda item: item.index)


def _write_items(out: Path, size: int, seed: int, items: Sequence[_Item]) -> list[dict]:
    """Sample, render and save some images; returns their phantoms.csv rows. Runs in worker processes."""
    rows = []
    for item in items:
        rng = np.random.default_rng(np.random.SeedSequence([seed, item.index]))
        image, region = render(sample_phantom(rng, fracture=item.fracture_type), size)
        path = out / item.path
        Image.fromarray(image).save(path, format="PNG")
        x0, y0, x1, y1 = region if region is not None else ("", "", "", "")
        rows.append(dict(split=item.split, label=item.label, file=item.path,
                         fracture_type=item.fracture_type or "", x0=x0, y0=y0, x1=x1, y1=y1,
                         seed_index=item.index))
    return rows


CSV_COLUMNS = ("split", "label", "file", "fracture_type", "x0", "y0", "x1", "y1", "seed_index")


def generate_dataset(
    out: str | Path,
    *,
    n: int = 1000,
    size: int = 256,
    labels: str = "binary",
    seed: int = 0,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write n phantom radiographs as out/{train,val,test}/<class>/<name>.png, plus phantoms.csv and a notice.

    labels="binary" gives `fractured` / `not_fractured` (fracture types evenly mixed among the fractured);
    labels="types" gives `not_fractured` and one class per fracture type. Classes are balanced and each class
    is split train/val/test by `split`. Image i is drawn from SeedSequence([seed, i]), so the files are
    byte-identical for a seed whatever `workers` is. `progress(done, total)` is called as images complete.
    Refuses to write into a folder that is not empty.
    """
    out = Path(out)
    items = _plan(n, labels, split)
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: folder is not empty; choose a new folder for the phantom data set")
    for part in SPLITS:
        for label in classes_for(labels):
            (out / part / label).mkdir(parents=True, exist_ok=True)

    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    rows: list[dict] = []
    if workers == 1 or n < _POOL_MIN_IMAGES:
        for k, item in enumerate(items):
            rows += _write_items(out, size, seed, [item])
            if progress is not None:
                progress(k + 1, n)
    else:
        # A few chunks per worker: large enough to amortize process overhead, small enough to balance.
        chunk = max(1, min(64, n // (workers * 4)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            jobs = [pool.submit(_write_items, out, size, seed, items[k:k + chunk])
                    for k in range(0, n, chunk)]
            for job in as_completed(jobs):
                rows += job.result()
                if progress is not None:
                    progress(len(rows), n)

    rows.sort(key=lambda row: row["seed_index"])
    with open(out / "phantoms.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with open(out / BOXES_FILE, "w", newline="") as f:  # the fracture regions as any data folder's boxes
        writer = csv.DictWriter(f, fieldnames=("split", "label", "file", "x0", "y0", "x1", "y1"), lineterminator="\n")
        writer.writeheader()
        writer.writerows({"split": row["split"], "label": row["label"], "file": Path(row["file"]).name,
                          **{k: row[k] for k in ("x0", "y0", "x1", "y1")}} for row in rows if row["x0"] != "")
    (out / SYNTHETIC_NOTICE).write_text(_notice(n, size, labels, seed, split))
    return out


def _notice(n: int, size: int, labels: str, seed: int, split: tuple[float, float, float]) -> str:
    """The notice written next to every generated data set."""
    return (
        "SYNTHETIC DATA - NOT REAL RADIOGRAPHS - NOT FOR CLINICAL USE\n"
        "\n"
        "Every image in this folder is a synthetic phantom generated by bonefrac.data.synth: a simulated\n"
        "projection through a mathematical model of a limb, with simulated fractures. None shows a person.\n"
        "It exists so that bonefrac's tests and demo run without real data. A model trained on it says\n"
        "nothing about real radiographs.\n"
        "\n"
        f"bonefrac version: {__version__}\n"
        f"seed: {seed}\n"
        f"n: {n}\n"
        f"size: {size}\n"
        f"labels: {labels} (classes: {', '.join(classes_for(labels))})\n"
        f"split (train, val, test): {split}\n"
        "regions and per-image details: phantoms.csv\n"
    )


# --------------------------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------------------------


def contact_sheet(out_png: str | Path, *, n_per_class: int = 6, size: int = 128, seed: int = 0) -> Path:
    """Save a grid of examples, one row per class (not_fractured, then each fracture type), labeled."""
    rows = (NOT_FRACTURED, *FRACTURE_TYPES)
    label_width, header, gap = 100, 24, 4
    sheet = Image.new("L", (label_width + n_per_class * (size + gap), header + len(rows) * (size + gap)), 32)
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), f"bonefrac SYNTHETIC phantoms (not real radiographs) - seed {seed}", fill=255)
    for r, label in enumerate(rows):
        top = header + r * (size + gap)
        draw.text((6, top + size // 2 - 6), label, fill=255)
        for c in range(n_per_class):
            rng = np.random.default_rng(np.random.SeedSequence([seed, r, c]))
            image, _ = render(sample_phantom(rng, fracture=None if label == NOT_FRACTURED else label), size)
            sheet.paste(Image.fromarray(image), (label_width + c * (size + gap), top))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, format="PNG", optimize=True)
    return out_png

#!/usr/bin/env python
"""Generate small, learnable, fully deterministic demo datasets.

Usage::

    python tools/dataset_converters/make_demo_data.py [OUT_DIR] [--force] [--seed N]

OUT_DIR defaults to ``<repo root>/data/demo``. Three datasets are written:

* ``OUT_DIR/coco``     COCO-format instance segmentation (circle/square/triangle)
* ``OUT_DIR/ade``      ADE20K-layout semantic segmentation (labels 1..4, 0 unused)
* ``OUT_DIR/imagenet`` ImageNet-layout classification (circle/square/triangle/cross)

Every object is a filled polygon with a class-specific shape and a class-typical
hue (with jitter) on a low-saturation, textured, noisy background, so even a tiny
model can learn it. The polygon written to the annotations is exactly the polygon
that was rasterised into the image (pixel centres inside the polygon are painted).

No downloads; only numpy, Pillow and the standard library are used. Output bytes
are identical on every run (fixed seeds, no PNG metadata). A stamp file
``OUT_DIR/.complete`` is written last; without ``--force`` an up-to-date OUT_DIR is
left alone.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------
# Constants (configs may reference these in comments)
# ---------------------------------------------------------------------------
VERSION = 'mmdat-demo-data v2'
STAMP_NAME = '.complete'
DEFAULT_SEED = 0
DEFAULT_OUT_DIR = Path(__file__).resolve().parents[2] / 'data/demo'

#: COCO categories; category id = index + 1.
COCO_CLASSES: Tuple[str, ...] = ('circle', 'square', 'triangle')
#: ADE-layout classes *after* reduce_zero_label (label PNG value = index + 1).
ADE_CLASSES: Tuple[str, ...] = ('background', 'circle', 'square', 'triangle')
ADE_PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (120, 120, 120), (220, 40, 40), (40, 200, 40), (40, 80, 220))
#: ImageNet-layout classes; class index = position in this tuple.
IMAGENET_CLASSES: Tuple[str, ...] = ('circle', 'square', 'triangle', 'cross')

#: Class-typical hue in degrees (jittered by +-HUE_JITTER per object).
CLASS_HUES: Dict[str, float] = {
    'circle': 0.0,      # red
    'square': 120.0,    # green
    'triangle': 235.0,  # blue
    'cross': 55.0,      # yellow
}
HUE_JITTER = 12.0

#: COCO / ADE image width and height choices (px). Objects are large against
#: the image (at most about half its side) and few, so that a small model
#: trained for minutes on a CPU localises them precisely (COCO mAP@[.5:.95]).
IMAGE_SIZES: Tuple[int, ...] = (112, 128, 144)
OBJ_SIZE_RANGE: Tuple[int, int] = (40, 72)      # nominal object size in px
MAX_OBJECTS = 3                                 # per COCO / ADE image
COCO_SPLITS: Dict[str, int] = {'train': 160, 'val': 24}
ADE_SPLITS: Dict[str, int] = {'training': 96, 'validation': 24}
IMAGENET_SPLITS: Dict[str, int] = {'train': 48, 'val': 16}  # images per class
IMAGENET_SIZE = 64
#: nominal object size of the classification crops (px): the shapes fill
#: about as much of the 64 px crop as the dense sets' objects fill of a
#: 128 px image, so the classifier is a fitting pretraining for them.
IMAGENET_OBJ_SIZE_RANGE: Tuple[float, float] = (28.0, 46.0)
CIRCLE_VERTICES = 32
#: pixel noise (standard deviation, 0..255 scale) of background and objects
BACKGROUND_NOISE = 5.0
OBJECT_NOISE = 4.0

Polygon = List[Tuple[float, float]]


# ---------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------
def _rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy Generator seeded from ``seed`` and integer sub-keys."""
    return np.random.default_rng([seed, *keys])


def shape_polygon(kind: str, size: float, angle: float) -> Polygon:
    """Vertices of ``kind`` centred at the origin with nominal ``size`` (px).

    The circle is a regular 24-gon of diameter ``size``; the other shapes are
    rotated by ``angle`` (radians).
    """
    if kind == 'circle':
        r = size / 2.0
        pts = [(r * math.cos(2 * math.pi * k / CIRCLE_VERTICES),
                r * math.sin(2 * math.pi * k / CIRCLE_VERTICES))
               for k in range(CIRCLE_VERTICES)]
        angle = 0.0
    elif kind == 'square':
        h = 0.42 * size
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif kind == 'triangle':
        r = 0.6 * size
        pts = [(r * math.cos(-math.pi / 2 + 2 * math.pi * k / 3),
                r * math.sin(-math.pi / 2 + 2 * math.pi * k / 3))
               for k in range(3)]
    elif kind == 'cross':
        a, b = 0.5 * size, 0.17 * size
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b),
               (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    else:
        raise ValueError(f'unknown shape {kind!r}')
    c, s = math.cos(angle), math.sin(angle)
    return [(x * c - y * s, x * s + y * c) for x, y in pts]


def polygon_mask(poly: Polygon, height: int, width: int) -> np.ndarray:
    """Boolean mask of pixels whose centre (x+0.5, y+0.5) lies inside ``poly``.

    Coordinates follow the COCO convention (pixel ``(i, j)`` covers
    ``[j, j+1) x [i, i+1)``). Even-odd crossing rule, vectorised over pixels.
    """
    px = np.arange(width, dtype=np.float64)[None, :] + 0.5
    py = np.arange(height, dtype=np.float64)[:, None] + 0.5
    inside = np.zeros((height, width), dtype=bool)
    n = len(poly)
    for k in range(n):
        x1, y1 = poly[k]
        x2, y2 = poly[(k + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > py) != (y2 > py)                 # (H, 1)
        xint = x1 + (py - y1) * (x2 - x1) / (y2 - y1)    # (H, 1)
        inside ^= crosses & (px < xint)
    return inside


def polygon_area(poly: Polygon) -> float:
    """Shoelace area of a simple polygon."""
    n = len(poly)
    s = 0.0
    for k in range(n):
        x1, y1 = poly[k]
        x2, y2 = poly[(k + 1) % n]
        s += x1 * y2 - x2 * y1
    return abs(s) / 2.0


def class_color(rng: np.random.Generator, cls: str) -> np.ndarray:
    """Random RGB (0..255 float) in the hue family of ``cls``."""
    hue = (CLASS_HUES[cls] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360.0
    sat = rng.uniform(0.65, 0.95)
    val = rng.uniform(0.6, 0.95)
    return np.array(colorsys.hsv_to_rgb(hue / 360.0, sat, val)) * 255.0


def textured_background(rng: np.random.Generator, height: int,
                        width: int) -> np.ndarray:
    """Low-saturation background with smooth waves, a gradient and pixel noise.

    Returns a float64 ``(H, W, 3)`` array (not yet clipped).
    """
    gray = rng.uniform(70, 170)
    base = gray + rng.uniform(-15, 15, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    tex = np.zeros((height, width), dtype=np.float64)
    for _ in range(3):
        fx, fy = rng.uniform(-0.25, 0.25, size=2)
        phase = rng.uniform(0, 2 * math.pi)
        tex += rng.uniform(4, 12) * np.sin(fx * xx + fy * yy + phase)
    gx, gy = rng.uniform(-0.15, 0.15, size=2)
    tex += gx * (xx - width / 2) + gy * (yy - height / 2)
    img = base[None, None, :] + tex[:, :, None]
    img += rng.normal(0.0, BACKGROUND_NOISE, size=(height, width, 3))
    return img


def paint_object(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray,
                 cls: str) -> None:
    """Paint ``mask`` of ``img`` (float, in place) with a noisy class colour."""
    color = class_color(rng, cls)
    ys, xs = np.nonzero(mask)
    shade = 1.0 + rng.uniform(-0.003, 0.003) * (xs - xs.mean()) \
        + rng.uniform(-0.003, 0.003) * (ys - ys.mean())
    noise = rng.normal(0.0, OBJECT_NOISE, size=(len(ys), 3))
    img[ys, xs] = color[None, :] * shade[:, None] + noise


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Round and clip a float image to uint8."""
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def save_png(arr: np.ndarray, path: Path) -> None:
    """Write ``arr`` as a PNG without metadata (byte-deterministic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert arr.dtype == np.uint8 and arr.ndim in (2, 3)
    Image.fromarray(arr).save(
        path, format='PNG', optimize=False, compress_level=6)


def _bbox(poly: Polygon, margin: float = 0.0
          ) -> Tuple[float, float, float, float]:
    xs = [p[0] for p in poly]
    ys = [p[1] for p in poly]
    return (min(xs) - margin, min(ys) - margin,
            max(xs) + margin, max(ys) + margin)


def _boxes_overlap(a: Tuple[float, ...], b: Tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_shapes(rng: np.random.Generator, height: int, width: int,
                 classes: Sequence[str], n_objects: int,
                 first_class: Optional[str] = None,
                 max_tries: int = 200) -> List[Tuple[str, Polygon]]:
    """Place up to ``n_objects`` non-overlapping shapes (at least one).

    ``first_class``, if given, fixes the class of the first object. Shapes are
    rejected and redrawn when their bounding box (grown by 2 px)
    overlaps a previous one or leaves the image. Vertex coordinates are rounded
    to 2 decimals so that the annotation and the painted pixels agree exactly.
    """
    placed: List[Tuple[str, Polygon, Tuple[float, float, float, float]]] = []
    tries = 0
    while len(placed) < n_objects and tries < max_tries:
        tries += 1
        if first_class is not None and not placed:
            cls = first_class
        else:
            cls = classes[int(rng.integers(len(classes)))]
        size = rng.uniform(*OBJ_SIZE_RANGE)
        angle = rng.uniform(-math.pi / 6, math.pi / 6)
        rel = shape_polygon(cls, size, angle)
        xs = [p[0] for p in rel]
        ys = [p[1] for p in rel]
        lo_x, hi_x = 1 - min(xs), width - 1 - max(xs)
        lo_y, hi_y = 1 - min(ys), height - 1 - max(ys)
        if lo_x >= hi_x or lo_y >= hi_y:
            continue
        cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
        poly = [(round(cx + x, 2), round(cy + y, 2)) for x, y in rel]
        box = _bbox(poly, 2.0)
        if any(_boxes_overlap(box, b) for _, _, b in placed):
            continue
        placed.append((cls, poly, box))
    if not placed:
        raise RuntimeError('could not place any object')
    return [(cls, poly) for cls, poly, _ in placed]


def _draw_scene(rng: np.random.Generator, height: int, width: int,
                objects: Sequence[Tuple[str, Polygon]]
                ) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Render background + objects; return uint8 image and per-object masks."""
    img = textured_background(rng, height, width)
    masks = []
    for cls, poly in objects:
        mask = polygon_mask(poly, height, width)
        paint_object(rng, img, mask, cls)
        masks.append(mask)
    return to_uint8(img), masks


def _write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', encoding='utf-8', newline='\n') as f:
        json.dump(obj, f, separators=(',', ':'))
        f.write('\n')


# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------
def make_coco(out_dir: Path, seed: int = DEFAULT_SEED) -> Dict[str, int]:
    """COCO instance segmentation under ``out_dir`` (``train/``, ``val/``,
    ``annotations/instances_{train,val}.json``). Returns images per split."""
    out_dir = Path(out_dir)
    categories = [{'id': i + 1, 'name': n, 'supercategory': 'shape'}
                  for i, n in enumerate(COCO_CLASSES)]
    counts = {}
    for split_idx, (split, n_img) in enumerate(COCO_SPLITS.items()):
        rng = _rng(seed, 1, split_idx)
        images, anns = [], []
        for i in range(1, n_img + 1):
            w = int(rng.choice(IMAGE_SIZES))
            h = int(rng.choice(IMAGE_SIZES))
            objects = place_shapes(rng, h, w, COCO_CLASSES,
                                   int(rng.integers(1, MAX_OBJECTS + 1)))
            img, masks = _draw_scene(rng, h, w, objects)
            fname = f'{i:06d}.png'
            save_png(img, out_dir / split / fname)
            images.append({'id': i, 'file_name': fname,
                           'width': w, 'height': h})
            for (cls, poly), mask in zip(objects, masks):
                xs = [p[0] for p in poly]
                ys = [p[1] for p in poly]
                x0, y0 = min(xs), min(ys)
                anns.append({
                    'id': len(anns) + 1,
                    'image_id': i,
                    'category_id': COCO_CLASSES.index(cls) + 1,
                    'bbox': [round(x0, 2), round(y0, 2),
                             round(max(xs) - x0, 2), round(max(ys) - y0, 2)],
                    'area': round(polygon_area(poly), 2),
                    'iscrowd': 0,
                    'segmentation': [[c for p in poly for c in p]],
                })
        _write_json({
            'info': {'description': f'{VERSION} coco {split}',
                     'version': VERSION},
            'licenses': [],
            'images': images,
            'annotations': anns,
            'categories': categories,
        }, out_dir / 'annotations' / f'instances_{split}.json')
        counts[split] = n_img
    return counts


def make_ade(out_dir: Path, seed: int = DEFAULT_SEED) -> Dict[str, int]:
    """ADE20K-layout semantic segmentation under ``out_dir``
    (``images/{training,validation}/*.png``, ``annotations/...`` mode-'L' PNGs
    with background=1, circle=2, square=3, triangle=4). Returns images/split."""
    out_dir = Path(out_dir)
    shape_classes = ADE_CLASSES[1:]
    counts = {}
    for split_idx, (split, n_img) in enumerate(ADE_SPLITS.items()):
        rng = _rng(seed, 2, split_idx)
        for i in range(1, n_img + 1):
            w = int(rng.choice(IMAGE_SIZES))
            h = int(rng.choice(IMAGE_SIZES))
            # The first object cycles through the classes so that every class
            # occurs in each split; the other 0-3 objects are random.
            first = shape_classes[(i - 1) % len(shape_classes)]
            objects = place_shapes(rng, h, w, shape_classes,
                                   int(rng.integers(1, MAX_OBJECTS + 1)),
                                   first_class=first)
            img, masks = _draw_scene(rng, h, w, objects)
            label = np.ones((h, w), dtype=np.uint8)
            for (cls, _), mask in zip(objects, masks):
                label[mask] = ADE_CLASSES.index(cls) + 1
            fname = f'{i:06d}.png'
            save_png(img, out_dir / 'images' / split / fname)
            save_png(label, out_dir / 'annotations' / split / fname)
        counts[split] = n_img
    return counts


def make_imagenet(out_dir: Path, seed: int = DEFAULT_SEED) -> Dict[str, int]:
    """ImageNet-layout classification under ``out_dir``
    (``{train,val}/<class>/<class>_NNNN.png``, ``meta/{train,val,classes}.txt``).
    Returns total images per split."""
    out_dir = Path(out_dir)
    s = IMAGENET_SIZE
    counts = {}
    meta = out_dir / 'meta'
    meta.mkdir(parents=True, exist_ok=True)
    for split_idx, (split, n_per) in enumerate(IMAGENET_SPLITS.items()):
        rng = _rng(seed, 3, split_idx)
        lines = []
        for cls_idx, cls in enumerate(IMAGENET_CLASSES):
            for i in range(1, n_per + 1):
                size = rng.uniform(*IMAGENET_OBJ_SIZE_RANGE)
                angle = rng.uniform(-math.pi / 6, math.pi / 6)
                rel = shape_polygon(cls, size, angle)
                xs = [p[0] for p in rel]
                ys = [p[1] for p in rel]
                cx = float(np.clip(s / 2 + rng.uniform(-8, 8),
                                   1 - min(xs), s - 1 - max(xs)))
                cy = float(np.clip(s / 2 + rng.uniform(-8, 8),
                                   1 - min(ys), s - 1 - max(ys)))
                poly = [(round(cx + x, 2), round(cy + y, 2)) for x, y in rel]
                img, _ = _draw_scene(rng, s, s, [(cls, poly)])
                rel_path = f'{cls}/{cls}_{i:04d}.png'
                save_png(img, out_dir / split / rel_path)
                lines.append(f'{rel_path} {cls_idx}')
        (meta / f'{split}.txt').write_text('\n'.join(lines) + '\n',
                                           encoding='utf-8')
        counts[split] = len(lines)
    (meta / 'classes.txt').write_text('\n'.join(IMAGENET_CLASSES) + '\n',
                                      encoding='utf-8')
    return counts


README_TEXT = f"""\
{VERSION}: synthetic demo datasets generated by
tools/dataset_converters/make_demo_data.py (deterministic, no downloads).
Objects are filled polygons with a class-specific shape and a class-typical hue
(circle=red, square=green, triangle=blue, cross=yellow; +-{HUE_JITTER:g} deg jitter)
on a low-saturation textured, noisy background.

coco/      COCO instance segmentation, classes {COCO_CLASSES} (ids 1..3)
           train/NNNNNN.png ({COCO_SPLITS['train']}), val/NNNNNN.png ({COCO_SPLITS['val']}),
           annotations/instances_{{train,val}}.json; sizes W,H in {IMAGE_SIZES};
           1-{MAX_OBJECTS} non-overlapping objects of {OBJ_SIZE_RANGE[0]}-{OBJ_SIZE_RANGE[1]} px per image,
           polygon segmentation.
ade/       ADE20K-layout semantic segmentation, classes {ADE_CLASSES}
           images/{{training,validation}}/NNNNNN.png ({ADE_SPLITS['training']}/{ADE_SPLITS['validation']}),
           annotations/{{training,validation}}/NNNNNN.png (mode L; background=1,
           circle=2, square=3, triangle=4, 0 unused -> use reduce_zero_label=True).
imagenet/  ImageNet-layout classification, classes {IMAGENET_CLASSES}
           {{train,val}}/<class>/<class>_NNNN.png, 64x64, {IMAGENET_SPLITS['train']}/{IMAGENET_SPLITS['val']} per class;
           meta/train.txt, meta/val.txt ("circle/circle_0001.png 0"), meta/classes.txt.
"""

_OWNED = ('coco', 'ade', 'imagenet', 'README.txt', STAMP_NAME)


def stamp_text(seed: int) -> str:
    """Content of the completion stamp for ``seed``."""
    return f'{VERSION} seed={seed}\n'


def is_complete(out_dir: Path, seed: int = DEFAULT_SEED) -> bool:
    """Whether ``out_dir`` holds a complete set made by this version/seed."""
    stamp = Path(out_dir) / STAMP_NAME
    try:
        return stamp.read_text(encoding='utf-8') == stamp_text(seed)
    except OSError:
        return False


def generate(out_dir: Path, seed: int = DEFAULT_SEED) -> Dict[str, Dict[str, int]]:
    """Remove previous outputs of this script in ``out_dir`` and write all sets."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _OWNED[::-1]:  # stamp first, so a partial set is never "complete"
        p = out_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    counts = {
        'coco': make_coco(out_dir / 'coco', seed),
        'ade': make_ade(out_dir / 'ade', seed),
        'imagenet': make_imagenet(out_dir / 'imagenet', seed),
    }
    (out_dir / 'README.txt').write_text(README_TEXT, encoding='utf-8')
    (out_dir / STAMP_NAME).write_text(stamp_text(seed), encoding='utf-8')
    return counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out_dir', nargs='?', default=str(DEFAULT_OUT_DIR),
                        help=f'output folder (default: {DEFAULT_OUT_DIR})')
    parser.add_argument('--force', action='store_true',
                        help='regenerate even if the output is up to date')
    parser.add_argument('--seed', type=int, default=DEFAULT_SEED,
                        help='base random seed (default: %(default)s)')
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if not args.force and is_complete(out_dir, args.seed):
        print(f'{out_dir} is up to date ({VERSION}, seed={args.seed}); '
              'use --force to regenerate')
        return 0
    t0 = time.perf_counter()
    counts = generate(out_dir, args.seed)
    print(f'wrote demo data to {out_dir} in {time.perf_counter() - t0:.1f}s: '
          f'{json.dumps(counts)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

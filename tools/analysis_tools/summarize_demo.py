#!/usr/bin/env python
"""Summarise a demo run of tools/run_demo.sh: metrics, quality floors, the
time of every stage and one overview image.

Reads, below DEMO_DIR (default ``work_dirs/demo``):

* ``<run>/test/<timestamp>/<timestamp>.json``: the metrics that
  ``tools/test.py --work-dir <run>/test`` logged, for every run folder; the
  task of a run is told by its metrics (``accuracy/top1``: classification,
  ``mIoU``: segmentation, ``coco/bbox_mAP``: detection);
* ``<run>/vis/**.png``: the painted test predictions (``--show-dir``);
  detection and segmentation images show the ground truth on the left and
  the prediction on the right, classification images print both labels;
* ``timings.tsv``: one line per stage, ``name<TAB>wall<TAB>user<TAB>sys``
  (seconds; user and sys are CPU times of the stage's processes).

Writes ``DEMO_DIR/summary.json`` (metrics, floors, stage times) and
``DEMO_DIR/overview.png`` (a few predictions of each task beside the ground
truth) and prints both paths. Exits with status 1, naming every missed
floor, when a metric is below its floor (``--no-floors`` only reports), and
with status 2 when a task has no metrics or no images.
"""
import argparse
import glob
import json
import math
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence, Tuple

#: task -> (metric that identifies it, metrics to print)
TASKS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    'classification': ('accuracy/top1', ('accuracy/top1', )),
    'segmentation': ('mIoU', ('mIoU', 'mAcc', 'aAcc')),
    'detection': ('coco/bbox_mAP',
                  ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75',
                   'coco/segm_mAP', 'coco/segm_mAP_50', 'coco/segm_mAP_75')),
}
#: Quality floors of the demo (issue 14): top-1 and mIoU in percent, COCO
#: mAP@[.5:.95] as a fraction.
FLOORS: Dict[str, float] = {
    'accuracy/top1': 95.0,
    'mIoU': 85.0,
    'coco/bbox_mAP': 0.5,
    'coco/segm_mAP': 0.4,
}
#: painted predictions per task in the overview (evenly spread over the
#: sorted file names: one per class for the classifier's val/<class>/ files)
SAMPLES = 4
#: height of one overview cell (px); images are scaled to it
CELL_HEIGHT = 192


def last_metrics(test_dir: str) -> dict:
    """Metrics of the newest ``<timestamp>/<timestamp>.json`` of a test run
    (the last record that holds a known metric); ``{}`` if there is none."""
    known = {key for _, keys in TASKS.values() for key in keys}
    runs = sorted(glob.glob(osp.join(test_dir, '*', '*.json')),
                  key=osp.getmtime)
    for path in reversed(runs):
        with open(path, encoding='utf-8') as f:
            records = [json.loads(line) for line in f if line.strip()]
        for rec in reversed(records):
            if isinstance(rec, dict) and known & set(rec):
                return rec
    return {}


def task_of(metrics: dict) -> Optional[str]:
    """The task whose identifying metric is in ``metrics``."""
    for task, (key, _) in TASKS.items():
        if key in metrics:
            return task
    return None


def read_timings(path: str) -> List[dict]:
    """Stage times from ``timings.tsv`` (missing file: no stages)."""
    stages = []
    if not osp.isfile(path):
        return stages
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip('\n').split('\t')
            if len(parts) != 4:
                raise ValueError(f'{path}:{n}: expected 4 tab-separated '
                                 f'fields (name, wall, user, sys), got '
                                 f'{line!r}')
            name, wall, user, sys_ = parts
            stages.append(dict(name=name, wall_s=float(wall),
                               user_s=float(user), sys_s=float(sys_)))
    return stages


def check_floors(metrics: Dict[str, dict],
                 floors: Dict[str, float]) -> List[str]:
    """A message per missed floor (a metric below it or not measured)."""
    found = {k: v for task in metrics.values() for k, v in task.items()}
    missed = []
    for key, floor in floors.items():
        value = found.get(key)
        if not isinstance(value, (int, float)) or math.isnan(value):
            missed.append(f'{key}: not measured (floor {floor:g})')
        elif value < floor:
            missed.append(f'{key} = {value:g} is below its floor {floor:g}')
    return missed


def _label(image, text: str):
    """``image`` with a white caption strip on top."""
    from PIL import Image, ImageDraw
    pad = 16
    out = Image.new('RGB', (max(image.width, 8 * len(text)),
                            image.height + pad), 'white')
    out.paste(image, (0, pad))
    ImageDraw.Draw(out).text((2, 2), text, fill=(0, 0, 0))
    return out


def spread(items: Sequence[str], k: int) -> List[str]:
    """``k`` items evenly spread over ``items`` (all when there are fewer)."""
    n = len(items)
    if n <= k:
        return list(items)
    return [items[i * n // k] for i in range(k)]


def make_overview(rows: Sequence[Tuple[str, Sequence[str], bool]],
                  out_file: str) -> str:
    """Grid of painted predictions: one row per (caption, image paths,
    whether to swap red and blue)."""
    from PIL import Image
    tiles = []
    for caption, paths, swap in rows:
        cells = []
        for path in paths:
            with Image.open(path) as im:
                im = im.convert('RGB')
                if swap:
                    r, g, b = im.split()
                    im = Image.merge('RGB', (b, g, r))
                scale = CELL_HEIGHT / im.height
                cells.append(im.resize(
                    (max(1, round(im.width * scale)), CELL_HEIGHT),
                    Image.NEAREST))
        width = sum(c.width for c in cells) + 8 * max(len(cells) - 1, 0)
        row = Image.new('RGB', (max(width, 1), CELL_HEIGHT), 'white')
        x = 0
        for cell in cells:
            row.paste(cell, (x, 0))
            x += cell.width + 8
        tiles.append(_label(row, caption))
    width = max(t.width for t in tiles)
    height = sum(t.height for t in tiles) + 8 * (len(tiles) - 1)
    canvas = Image.new('RGB', (width, height), 'white')
    y = 0
    for tile in tiles:
        canvas.paste(tile, (0, y))
        y += tile.height + 8
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    canvas.save(out_file)
    return out_file


#: mmpretrain's VisualizationHook paints the network input, which is still
#: in the loader's BGR order, as if it were RGB: swapped back in the overview
BGR_PAINTED = ('classification', )

CAPTIONS = {
    'classification': 'classification (top-1): ground truth and prediction '
    'printed on each image',
    'segmentation': 'segmentation: left ground truth, right prediction',
    'detection': 'detection (boxes + masks): left ground truth, right '
    'prediction',
}


def summarize(root: str, floors: Optional[Dict[str, float]] = FLOORS,
              samples: int = SAMPLES) -> Tuple[int, dict]:
    """Collect metrics, images and timings below ``root``; write the summary
    JSON and the overview PNG; return (exit status, summary)."""
    metrics: Dict[str, dict] = {}
    images: Dict[str, List[str]] = {}
    runs: Dict[str, str] = {}
    problems = []
    for run in sorted(glob.glob(osp.join(root, '*'))):
        if not osp.isdir(osp.join(run, 'test')):
            continue
        found = last_metrics(osp.join(run, 'test'))
        task = task_of(found)
        if task is None:
            problems.append(f'{run}: no metrics in {run}/test')
            continue
        metrics[task] = {k: found[k] for k in TASKS[task][1] if k in found}
        runs[task] = run
        images[task] = sorted(
            glob.glob(osp.join(run, 'vis', '**', '*.png'), recursive=True))
        if not images[task]:
            problems.append(f'{task}: no painted predictions in {run}/vis')
    for task in TASKS:
        if task not in metrics:
            problems.append(f'{task}: no test metrics found below {root}')
    stages = read_timings(osp.join(root, 'timings.tsv'))
    missed = check_floors(metrics, floors) if floors else []

    overview = None
    rows = [(CAPTIONS[t], spread(images[t], samples), t in BGR_PAINTED)
            for t in TASKS if images.get(t)]
    if rows:
        overview = make_overview(rows, osp.join(root, 'overview.png'))

    summary = dict(
        metrics=metrics,
        runs=runs,
        floors=dict(floors or {}),
        missed_floors=missed,
        problems=problems,
        stages=stages,
        total_wall_s=round(sum(s['wall_s'] for s in stages), 1),
        total_cpu_s=round(sum(s['user_s'] + s['sys_s'] for s in stages), 1),
        overview=overview)
    summary_file = osp.join(root, 'summary.json')
    with open(summary_file, 'w', encoding='utf-8') as f:
        json.dump(summary, f, indent=1)
        f.write('\n')

    print('=' * 72)
    print(f'DAT++ demo summary ({root})')
    for task in (t for t in TASKS if t in metrics):
        values = metrics[task]
        shown = ', '.join(f'{k}={v:.3f}' if isinstance(v, float) else
                          f'{k}={v}' for k, v in values.items())
        print(f'  {task:15s} {shown}')
    if stages:
        print('  time per stage (wall / CPU user+sys, seconds):')
        for s in stages:
            print(f'    {s["name"]:28s} {s["wall_s"]:7.1f} / '
                  f'{s["user_s"] + s["sys_s"]:7.1f}')
        print(f'    {"total":28s} {summary["total_wall_s"]:7.1f} / '
              f'{summary["total_cpu_s"]:7.1f}')
    print(f'  overview: {overview or "none (no painted predictions)"}')
    print(f'  summary:  {summary_file}')
    status = 0
    for p in problems:
        print(f'  ERROR: {p}')
        status = 2
    if missed:
        print('  QUALITY FLOORS MISSED (issue 14): ' + '; '.join(missed))
        status = status or 1
    elif floors:
        print('  all quality floors met: ' + ', '.join(
            f'{k} >= {v:g}' for k, v in floors.items()))
    print('=' * 72)
    return status, summary


def parse_args(argv=None) -> argparse.Namespace:
    """Command line of the summary."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        'demo_dir', nargs='?', default='work_dirs/demo',
        help='folder of the demo runs, as given to tools/run_demo.sh '
        '(default: %(default)s)')
    parser.add_argument(
        '--no-floors', action='store_true',
        help='report the metrics without checking the quality floors '
        '(top-1 >= 95, mIoU >= 85, bbox mAP >= 0.5, segm mAP >= 0.4)')
    parser.add_argument(
        '--samples', type=int, default=SAMPLES,
        help='painted predictions per task in the overview image '
        '(default: %(default)s)')
    args = parser.parse_args(argv)
    if not osp.isdir(args.demo_dir):
        parser.error(f'demo folder not found: {args.demo_dir}')
    if args.samples < 1:
        parser.error(f'--samples must be at least 1, got {args.samples}')
    return args


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    status, _ = summarize(args.demo_dir,
                          None if args.no_floors else FLOORS, args.samples)
    return status


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/env python
"""Print the metrics and visualisations of the demo runs (tools/run_demo.sh).

Usage: python tools/analysis_tools/summarize_demo.py work_dirs/demo
"""
import glob
import json
import os
import sys

KEYS = ('accuracy/top1', 'mIoU', 'aAcc', 'coco/bbox_mAP', 'coco/bbox_mAP_50',
        'coco/segm_mAP', 'coco/segm_mAP_50')


def last_metrics(test_dir: str) -> dict:
    """Metrics from the newest ``<timestamp>/<timestamp>.json`` of a test run."""
    runs = sorted(glob.glob(os.path.join(test_dir, '*', '*.json')),
                  key=os.path.getmtime)
    for path in reversed(runs):
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        for rec in reversed(lines):
            if any(k in rec for k in KEYS):
                return rec
    return {}


def main(root: str) -> int:
    ok = True
    for run in sorted(glob.glob(os.path.join(root, '*'))):
        if not os.path.isdir(run):
            continue
        metrics = last_metrics(os.path.join(run, 'test'))
        pngs = glob.glob(os.path.join(run, 'vis', '**', '*.png'),
                         recursive=True)
        shown = ', '.join(f'{k}={metrics[k]:.3f}' if isinstance(
            metrics[k], float) else f'{k}={metrics[k]}'
                          for k in KEYS if k in metrics)
        print(f'{os.path.basename(run):24s} {shown or "NO METRICS"}; '
              f'{len(pngs)} PNGs in {os.path.join(run, "vis")}')
        ok &= bool(metrics) and bool(pngs)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else 'work_dirs/demo'))

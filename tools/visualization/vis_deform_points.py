"""Draw where the deformable attention blocks of a DAT++ backbone look.

For every deformable block (letter ``D``; module name like
``stages.2.attns.5``, selected on the command line as ``2.5``) the sampled key
positions of each offset group are drawn as dots (one colour per group) over
the input image, together with the block's reference grid (faint crosses).
One PNG per block is written into ``--out``, named after the block
(``stages.2.attns.5.png``).

    python tools/visualization/vis_deform_points.py CONFIG IMAGE --out DIR \
        [--checkpoint CKPT] [--blocks 0.1 2.3 ...] [--img-size H W] \
        [--mapping {stretch,centers}] [--save-npz]

The model is built from CONFIG in the registry of its ``default_scope``
(mmdet, mmseg or mmpretrain) and only its backbone is run. ``--checkpoint``
takes an OpenMMLab 2 checkpoint of the whole model (``mmengine``'s
``load_checkpoint``; e.g. the output of ``tools/model_converters/dat2mmdat.py``
or of ``tools/train.py``) or an official DAT++ file (its backbone part is
loaded). Without a checkpoint the weights are random, which is only useful to
try the tool.

The image is resized to ``--img-size`` (default: its own size) and normalised
with the mean/std of the config's data preprocessor (ImageNet mean/std if the
config has none); it is not padded.

Coordinates. ``DeformableAttention.sampling_positions`` gives (y, x)
positions normalised to [-1, 1] over the stage's feature map
(``grid_sample`` with ``align_corners=True``: -1 and 1 are the centres of the
first and last feature pixels). They are drawn in image pixels with
``--mapping``:

* ``stretch`` (default): ``y_img = (y + 1) / 2 * (H_img - 1)`` (and likewise
  x): the feature map is taken to span the whole image. This is an
  approximation: the stem and the down-sampling convolutions (kernel 3,
  stride 2, padding 1) make feature pixel ``j`` of a stage of stride ``s``
  (4, 8, 16, 32) centred on image pixel ``j * s``, and the feature map has
  ``ceil(H_img / s)`` rows, so the last row sits at
  ``(ceil(H_img / s) - 1) * s``, up to ``s - 1`` pixels above the image's last
  row (the feature map covers the image padded to a multiple of ``s``).
* ``centers``: ``y_img = (y + 1) / 2 * (H_feat - 1) * s``, i.e. the
  receptive-field centres described above (exact for the centres of feature
  pixels, linear in between).
"""
import argparse
import importlib
import os
import os.path as osp
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
BLOCK_RE = re.compile(r'^stages\.(\d+)\.attns\.(\d+)$')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Draw where the deformable attention blocks of a DAT++ '
        'backbone look: for every deformable block, the sampled key '
        'positions of each offset group (dots, one colour per group) and '
        'the reference grid (faint crosses) over the input image, one PNG '
        'per block in --out, named after the block. The model is built '
        'from the config (mmdet, mmseg or mmpretrain); only its backbone '
        'runs.',
        epilog='example:\n'
        '  python tools/visualization/vis_deform_points.py '
        'configs/mmdet/mask_rcnn_dat_pp_t_1x.py demo.jpg \\\n'
        '      --checkpoint checkpoints/mask_rcnn_dat_pp_t_1x.pth '
        '--out vis_points --blocks 2.5',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file (mmdet/mmseg/mmpretrain)')
    parser.add_argument('image', help='input image (any format Pillow '
                        'reads)')
    parser.add_argument('--out', required=True,
                        help='output folder for the PNGs (created if '
                        'missing)')
    parser.add_argument('--checkpoint', default=None,
                        help='checkpoint of the model (OpenMMLab 2) or an '
                        'official DAT++ file; random weights if omitted')
    parser.add_argument('--blocks', nargs='+', default=None,
                        metavar='STAGE.BLOCK',
                        help='deformable blocks to draw, as stage.block '
                        '(e.g. 2.5 for stages.2.attns.5); default: all')
    parser.add_argument('--img-size', nargs=2, type=int, default=None,
                        metavar=('H', 'W'),
                        help='resize the image to H x W first (default: '
                        'keep its size)')
    parser.add_argument('--mapping', choices=('stretch', 'centers'),
                        default='stretch',
                        help='feature-map to image coordinates (see the '
                        'module docstring); default: stretch')
    parser.add_argument('--save-npz', action='store_true',
                        help='also write <block>.npz with the normalised '
                        'positions `pos` (groups, Hk, Wk, 2; y, x), the '
                        'reference grid `ref` (Hk, Wk, 2), `feat_hw` and '
                        '`img_hw`')
    parser.add_argument('--device', default='cpu',
                        help='torch device to run the backbone on (default '
                        'cpu; e.g. cuda:0)')
    parser.add_argument('--dpi', type=int, default=100,
                        help='resolution of the written PNGs in dots per '
                        'inch (default 100)')
    return parser.parse_args(argv)


# ---------------------------------------------------------------- the model
def build_backbone(config: str, checkpoint: Optional[str], device: str):
    """Build the config's model, load ``checkpoint``, return (cfg, backbone)."""
    from mmdat.apis import load_config

    cfg = load_config(config)
    registry = importlib.import_module(f'{cfg.default_scope}.registry')
    model = registry.MODELS.build(cfg.model)
    if not hasattr(model, 'backbone'):
        raise ValueError(f'{config}: the model ({type(model).__name__}) has '
                         'no backbone')
    if checkpoint:
        load_weights(model, checkpoint)
    backbone = model.backbone.to(device).eval()
    return cfg, backbone


def load_weights(model: torch.nn.Module, checkpoint: str) -> None:
    """OpenMMLab 2 checkpoints go through mmengine; official DAT++ files
    (classification or mmdet 2.x / mmseg 0.x) through mmdat's loader."""
    from mmdat.utils.checkpoint import (KIND_MMDAT, checkpoint_kind,
                                        load_dat_pretrained, read_checkpoint)
    from mmengine.runner import load_checkpoint

    try:
        kind = checkpoint_kind(read_checkpoint(checkpoint), checkpoint)
    except ValueError:
        kind = None  # not a DAT layout we know: let mmengine try
    if kind is None or kind == KIND_MMDAT:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=False)
    else:
        load_dat_pretrained(model.backbone, checkpoint)


def deformable_blocks(backbone: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    from mmdat.models.attentions import DeformableAttention

    return {
        name: m
        for name, m in backbone.named_modules()
        if isinstance(m, DeformableAttention)
    }


def select_blocks(available: Sequence[str],
                  wanted: Optional[Sequence[str]]) -> List[str]:
    """``wanted`` as ``stage.block`` (or full names) -> module names."""
    if not available:
        raise ValueError('the backbone has no deformable attention block')
    if not wanted:
        return list(available)
    out = []
    for w in wanted:
        m = re.fullmatch(r'(\d+)\.(\d+)', w)
        name = f'stages.{m.group(1)}.attns.{m.group(2)}' if m else w
        if name not in available:
            short = ['.'.join(BLOCK_RE.match(a).groups()) for a in available
                     if BLOCK_RE.match(a)]
            raise ValueError(f'--blocks {w}: no deformable block {name}; '
                             f'the deformable blocks are {short}')
        if name not in out:
            out.append(name)
    return out


def stage_stride(name: str) -> int:
    m = BLOCK_RE.match(name)
    return 4 * 2 ** int(m.group(1)) if m else 4


# ---------------------------------------------------------------- the image
def preprocessor_cfg(cfg) -> dict:
    pre = cfg.get('model', {}).get('data_preprocessor', None)
    if not pre or pre.get('mean') is None:
        pre = cfg.get('data_preprocessor', None) or pre or {}
    return dict(pre)


def load_image(path: str, img_size: Optional[Tuple[int, int]], cfg
               ) -> Tuple[np.ndarray, torch.Tensor]:
    """Return the RGB uint8 image to draw on and the normalised (1,3,H,W)
    input."""
    from PIL import Image

    if not osp.isfile(path):
        raise FileNotFoundError(f'image not found: {path}')
    img = Image.open(path).convert('RGB')
    if img_size is not None:
        h, w = img_size
        if h < 1 or w < 1:
            raise ValueError(f'--img-size must be positive, got {h} {w}')
        img = img.resize((w, h), Image.BILINEAR)
    rgb = np.asarray(img, dtype=np.uint8)
    pre = preprocessor_cfg(cfg)
    mean = pre.get('mean') or IMAGENET_MEAN
    std = pre.get('std') or IMAGENET_STD
    # OpenMMLab preprocessors read BGR images and flip them to RGB
    # (bgr_to_rgb / to_rgb); if a config keeps BGR, feed BGR.
    to_rgb = pre.get('bgr_to_rgb', pre.get('to_rgb', True))
    x = rgb.astype(np.float32)
    if not to_rgb:
        x = x[..., ::-1]
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]
    return rgb, x


# -------------------------------------------------------------- positions
@torch.no_grad()
def collect_positions(backbone, x: torch.Tensor,
                      names: Sequence[str]) -> Dict[str, dict]:
    """Run the backbone once; for each block return its sampling positions
    ``pos`` (g, Hk, Wk, 2) in (y, x) order normalised over the feature map,
    the reference grid ``ref`` (Hk, Wk, 2) and the feature size."""
    from mmdat.models.attentions.common import reference_grid

    modules = deformable_blocks(backbone)
    found: Dict[str, dict] = {}
    handles = []

    def make_hook(name):
        def hook(module, inputs, output):
            feat = inputs[0]
            pos = module.sampling_positions(module.proj_q(feat))
            Hk, Wk = pos.shape[1:3]
            ref = torch.stack(torch.meshgrid(
                reference_grid(Hk, pos.dtype, pos.device),
                reference_grid(Wk, pos.dtype, pos.device), indexing='ij'),
                dim=-1)
            found[name] = dict(
                pos=pos[:module.num_groups].float().cpu().numpy(),
                ref=ref.float().cpu().numpy(),
                feat_hw=tuple(feat.shape[-2:]),
                groups=module.num_groups)
        return hook

    for name in names:
        handles.append(modules[name].register_forward_hook(make_hook(name)))
    try:
        backbone(x)
    finally:
        for h in handles:
            h.remove()
    return found


def to_image_coords(p: np.ndarray, feat_hw: Tuple[int, int],
                    img_hw: Tuple[int, int], stride: int,
                    mapping: str) -> Tuple[np.ndarray, np.ndarray]:
    """Normalised (..., 2) (y, x) positions -> image pixel (y, x) arrays."""
    y01 = (p[..., 0] + 1) / 2
    x01 = (p[..., 1] + 1) / 2
    if mapping == 'centers':
        return (y01 * (feat_hw[0] - 1) * stride,
                x01 * (feat_hw[1] - 1) * stride)
    return y01 * (img_hw[0] - 1), x01 * (img_hw[1] - 1)


# ---------------------------------------------------------------- drawing
def draw_block(rgb: np.ndarray, name: str, info: dict, mapping: str,
               out_file: str, dpi: int = 100) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    H, W = rgb.shape[:2]
    stride = stage_stride(name)
    groups = info['groups']
    # at least ~6 inches on the long side so that small images stay readable
    scale = max(6.0 / max(H, W) * dpi, 1.0)
    fig_w, fig_h = W * scale / dpi, H * scale / dpi
    fig, ax = plt.subplots(figsize=(fig_w, fig_h + 0.6), dpi=dpi)
    ax.imshow(rgb, extent=(-0.5, W - 0.5, H - 0.5, -0.5),
              interpolation='nearest')
    ry, rx = to_image_coords(info['ref'], info['feat_hw'], (H, W), stride,
                             mapping)
    n_keys = info['ref'].shape[0] * info['ref'].shape[1]
    size = float(np.clip(3000.0 / max(n_keys, 1), 4.0, 60.0))
    ax.scatter(rx.ravel(), ry.ravel(), s=size, marker='+', c='0.55',
               alpha=0.6, linewidths=1.0, label='reference grid')
    cmap = plt.get_cmap('tab10' if groups <= 10 else 'hsv')
    for g in range(groups):
        py, px = to_image_coords(info['pos'][g], info['feat_hw'], (H, W),
                                 stride, mapping)
        color = cmap(g % 10) if groups <= 10 else cmap(g / groups)
        ax.scatter(px.ravel(), py.ravel(), s=size, c=[color],
                   edgecolors='black', linewidths=0.3, alpha=0.9,
                   label=f'group {g}')
    # The official reference grid is not centred: its last row/column lies
    # past 1 (outside the feature map) for small key grids; show it too.
    x_lo = min(-0.5, float(rx.min()) - 1)
    x_hi = max(W - 0.5, float(rx.max()) + 1)
    y_lo = min(-0.5, float(ry.min()) - 1)
    y_hi = max(H - 0.5, float(ry.max()) + 1)
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_hi, y_lo)
    ax.add_patch(plt.Rectangle((-0.5, -0.5), W, H, fill=False,
                               edgecolor='0.3', linewidth=0.8))
    ax.set_axis_off()
    Hk, Wk = info['ref'].shape[:2]
    ax.set_title(f'{name}: feature {info["feat_hw"][0]}x{info["feat_hw"][1]}'
                 f' (stride {stride}), {Hk}x{Wk} keys x {groups} groups',
                 fontsize=9)
    ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=7,
              framealpha=0.6, markerscale=max(1.0, 20.0 / size))
    fig.savefig(out_file, dpi=dpi, bbox_inches='tight', pad_inches=0.1)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    args = parse_args(argv)
    if not osp.isfile(args.image):
        raise FileNotFoundError(f'image not found: {args.image}')
    cfg, backbone = build_backbone(args.config, args.checkpoint, args.device)
    names = select_blocks(list(deformable_blocks(backbone)), args.blocks)
    rgb, x = load_image(args.image, args.img_size, cfg)
    infos = collect_positions(backbone, x.to(args.device), names)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for name in names:
        if name not in infos:
            # only reached if the backbone stops before this stage
            print(f'{name}: not run by the backbone (out_indices), skipped',
                  file=sys.stderr)
            continue
        out_file = osp.join(args.out, f'{name}.png')
        draw_block(rgb, name, infos[name], args.mapping, out_file, args.dpi)
        written.append(out_file)
        if args.save_npz:
            info = infos[name]
            np.savez(osp.join(args.out, f'{name}.npz'), pos=info['pos'],
                     ref=info['ref'], feat_hw=np.asarray(info['feat_hw']),
                     img_hw=np.asarray(rgb.shape[:2]))
        print(out_file)
    return written


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f'error: {exc}')

"""Reading official DAT/DAT++ checkpoints and turning them into mmdat ones.

Official files come in three shapes:

* classification (``{'model': sd}``): trunk keys without prefix, plus
  ``cls_norm.norm.*`` and ``cls_head.*``;
* detection (mmdet 2.x) and segmentation (mmseg 0.x): ``{'state_dict': sd}``
  with the trunk under ``backbone.`` (plus ``norms.i`` output norms) and the
  neck/heads under their own prefixes.

mmdat's classifier is mmpretrain's ``ImageClassifier`` whose backbone returns
``norms.3(stage 4)`` (= ``cls_norm``) and whose ``LinearClsHead`` holds ``fc``
(= ``cls_head``).

Dense checkpoints keep their key names: no parameter or buffer of the necks
and heads our configs use was renamed from mmdet 2.26 to 3.3 (FPN, RPNHead,
StandardRoIHead / CascadeRoIHead with Shared2FC / Shared4Conv1FC bbox heads
and FCNMaskHead, RetinaHead) or from mmseg 0.29 to 1.2.2 (FPN, UPerHead,
FCNHead, FPNHead); mmdet 3 and mmseg 1 load their own 2.x / 0.x model-zoo
files unchanged for the same reason. Everything else of an official file
(``optimizer``, ``meta`` apart from the class names, the ``attn_mask``
buffers) is left behind; ``CLASSES``/``PALETTE`` of the old ``meta`` become
the OpenMMLab 2 ``meta['dataset_meta']`` (see :func:`dataset_meta_of`).
"""
import os
import pickle
import warnings
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

KIND_CLASSIFICATION = 'official-classification'
KIND_DENSE = 'official-dense'
KIND_MMDAT = 'mmdat'

# keys of the official code that mmdat does not keep (recomputed on the fly)
_DROPPED_SUFFIXES = ('attn_mask', )


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint file with an error that names the file on failure."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'checkpoint path must be a str, got {path!r}')
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        # Official training checkpoints also pickle their config objects.
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=False)
        except Exception as exc:  # noqa: BLE001 - re-raised with the path
            raise RuntimeError(
                f'could not read checkpoint {path}: {type(exc).__name__}: '
                f'{exc}') from exc
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt file
        raise RuntimeError(
            f'could not read checkpoint {path} (truncated or not a torch '
            f'checkpoint?): {type(exc).__name__}: {exc}') from exc
    if not isinstance(ckpt, dict):
        raise ValueError(f'checkpoint {path} holds a {type(ckpt).__name__}, '
                         'expected a dict')
    return ckpt


def _tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        torch.is_tensor(v) for v in obj.values())


def checkpoint_kind(ckpt: dict, path: str = '<checkpoint>') -> str:
    """Classify a loaded checkpoint; ValueError says what was found."""
    if _tensor_dict(ckpt.get('model')) and any(
            k.startswith('patch_proj.') for k in ckpt['model']):
        return KIND_CLASSIFICATION
    sd = ckpt.get('state_dict')
    if _tensor_dict(sd):
        if any(k.startswith('backbone.patch_proj.') for k in sd):
            meta = ckpt.get('meta') or {}
            if isinstance(meta, dict) and meta.get('mmdat_converted'):
                return KIND_MMDAT
            return KIND_DENSE
    if _tensor_dict(ckpt) and any(k.startswith('patch_proj.') for k in ckpt):
        return KIND_CLASSIFICATION  # a bare official state dict
    found = sorted(ckpt)[:10]
    inner = ''
    for key in ('model', 'state_dict'):
        if isinstance(ckpt.get(key), dict):
            inner = f'; {key!r} has keys like {sorted(ckpt[key])[:5]}'
    raise ValueError(
        f'{path} is not a DAT/DAT++ checkpoint: expected an official '
        "classification file ({'model': ...} with 'patch_proj.*' keys) or a "
        "detection/segmentation file ({'state_dict': ...} with "
        f"'backbone.patch_proj.*' keys); found top-level keys {found}{inner}")


def _clean(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return OrderedDict((k, v) for k, v in sd.items()
                       if not k.endswith(_DROPPED_SUFFIXES))


def convert_official(ckpt: dict, path: str = '<checkpoint>'
                     ) -> Tuple[str, Dict[str, torch.Tensor]]:
    """Official checkpoint -> (kind, OpenMMLab 2 state dict of the model)."""
    kind = checkpoint_kind(ckpt, path)
    if kind == KIND_CLASSIFICATION:
        sd = ckpt['model'] if 'model' in ckpt else ckpt
        out = OrderedDict()
        for k, v in _clean(sd).items():
            if k.startswith('cls_norm.'):
                out['backbone.norms.3.' + k[len('cls_norm.'):]] = v
            elif k.startswith('cls_head.'):
                out['head.fc.' + k[len('cls_head.'):]] = v
            else:
                out['backbone.' + k] = v
        return kind, out
    return kind, _clean(ckpt['state_dict'])


def dataset_meta_of(ckpt: dict) -> Optional[dict]:
    """OpenMMLab 2 ``dataset_meta`` (``classes``, ``palette``) from the
    ``meta`` of an mmdet 2 / mmseg 0 file (``CLASSES``, ``PALETTE``), or the
    ``dataset_meta`` a newer file already has; None when there is none."""
    meta = ckpt.get('meta')
    if not isinstance(meta, dict):
        return None
    if isinstance(meta.get('dataset_meta'), dict):
        return dict(meta['dataset_meta'])
    out = {}
    for old, new in (('CLASSES', 'classes'), ('PALETTE', 'palette')):
        if meta.get(old) is not None:
            out[new] = meta[old]
    return out or None


def backbone_state_dict(ckpt: dict, path: str = '<checkpoint>',
                        prefix: Optional[str] = None
                        ) -> Dict[str, torch.Tensor]:
    """The DAT backbone's weights (no prefix) from any supported checkpoint."""
    kind = checkpoint_kind(ckpt, path)
    _, sd = convert_official(ckpt, path)
    prefix = prefix or 'backbone.'
    out = OrderedDict((k[len(prefix):], v) for k, v in sd.items()
                      if k.startswith(prefix))
    if kind == KIND_CLASSIFICATION:
        # cls_norm is the classifier's head norm, not a dense-output norm
        out = OrderedDict((k, v) for k, v in out.items()
                          if not k.startswith('norms.'))
    return out


def resize_rpe_tables(sd: Dict[str, torch.Tensor],
                      target: Dict[str, torch.Tensor], logger=None) -> None:
    """Bicubically resize ``rpe_table`` entries whose size differs (224 ->
    384 fine-tuning), in place."""
    for k, v in list(sd.items()):
        if k.endswith('rpe_table') and k in target and \
                target[k].shape != v.shape and v.dim() == 3 and \
                target[k].shape[0] == v.shape[0]:
            sd[k] = F.interpolate(v[None].float(), size=target[k].shape[-2:],
                                  mode='bicubic', align_corners=True)[0].to(
                                      v.dtype)
            if logger is not None:
                logger.info(f'resized {k} from {tuple(v.shape)} to '
                            f'{tuple(target[k].shape)}')


def load_dat_pretrained(model: torch.nn.Module, path: str,
                        prefix: Optional[str] = None, logger=None) -> None:
    """Load backbone weights from an official or converted checkpoint.

    Shape mismatches raise (naming key and shapes); missing/unexpected keys
    are reported through ``logger`` (the dense output norms of a
    classification checkpoint are legitimately missing).
    """
    ckpt = read_checkpoint(path)
    sd = backbone_state_dict(ckpt, path, prefix)
    own = model.state_dict()
    resize_rpe_tables(sd, own, logger)
    bad = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
           for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f'{path} does not match this DAT arch (another '
                         f'model size?): ' + '; '.join(bad[:5]) +
                         (f' (+{len(bad) - 5} more)' if len(bad) > 5 else ''))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    msg = (f'loaded DAT weights from {path}: {len(sd)} tensors; missing '
           f'{missing}; unexpected {unexpected}')
    if logger is not None:
        logger.info(msg)
    elif missing or unexpected:
        warnings.warn(msg)

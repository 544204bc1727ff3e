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
(``optimizer``, ``meta`` apart from the class names, the constant
``attn_mask`` / ``relative_position_index`` buffers of DAT v1 window blocks)
is left behind; ``CLASSES``/``PALETTE`` of the old ``meta`` become the
OpenMMLab 2 ``meta['dataset_meta']`` (see :func:`dataset_meta_of`).

Every file is read through :func:`safe_load`: ``torch.load`` with
``weights_only=True`` and an allowlist of what checkpoints legitimately
hold; anything else needs an explicit opt-in (``trusted=True``,
``$MMDAT_TRUSTED_CHECKPOINTS`` or :func:`trust_checkpoints`).
"""
import collections
import contextlib
import os
import pickle
import re
import threading
import warnings
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

KIND_CLASSIFICATION = 'official-classification'
KIND_DENSE = 'official-dense'
KIND_MMDAT = 'mmdat'

# keys of the official code that mmdat does not keep (constants it recomputes)
_DROPPED_SUFFIXES = ('attn_mask', 'relative_position_index')

# --------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------
TRUST_ENV = 'MMDAT_TRUSTED_CHECKPOINTS'
_TRUSTED: List[str] = []
_PATCH_LOCK = threading.RLock()


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs a pickled global outside :func:`safe_globals`
    (loading it could run arbitrary code). ``globals`` lists their names."""

    def __init__(self, message: str, filename: str = '',
                 globals_: Iterable[str] = ()):
        super().__init__(message)
        self.filename = filename
        self.globals = list(globals_)


def _numpy_globals() -> List[Any]:
    """numpy objects that pickled arrays, scalars and dtypes refer to, under
    both the numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) names,
    so files written with either numpy load with the other."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch users
        return []
    try:
        multiarray = np._core.multiarray  # numpy >= 2 (and 1.26 shims)
    except AttributeError:  # pragma: no cover
        multiarray = np.core.multiarray
    out: List[Any] = [np.ndarray, np.dtype]
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        out += [(multiarray._reconstruct, f'{mod}._reconstruct'),
                (multiarray.scalar, f'{mod}.scalar')]
    # dtype classes (numpy >= 1.25 pickles some dtypes by their class)
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in getattr(dtypes, '__all__', ())]
    # scalar types (np.float64(1.0) etc. pickle through their class)
    out += [np.bool_, np.float16, np.float32, np.float64, np.int8, np.int16,
            np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
    return out


def _history_buffer_getattr(obj, name: str):
    """Stand-in for ``builtins.getattr`` while unpickling: mmengine pickles
    a ``HistoryBuffer``'s statistics methods as ``getattr(HistoryBuffer,
    'mean')``; only those lookups are allowed (a general ``getattr`` would
    make the allowlist worthless)."""
    from mmengine.logging.history_buffer import HistoryBuffer
    allowed = set(getattr(HistoryBuffer, '_statistics_methods', ())) | {
        'min', 'max', 'current', 'mean'}
    if obj is HistoryBuffer and name in allowed:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'refusing getattr({obj!r}, {name!r}) while loading a checkpoint '
        '(weights only load: only HistoryBuffer statistics methods)')


def safe_globals() -> List[Any]:
    """The globals a checkpoint may refer to under safe loading, besides
    torch's own defaults (tensors, storages, ``OrderedDict``, ...), in the
    form ``torch.serialization.safe_globals`` takes: what mmengine /
    OpenMMLab checkpoints legitimately hold, i.e. the message hub's
    ``HistoryBuffer`` log scalars (and ``getattr(HistoryBuffer, <statistics
    method>)``, through a restricted getattr), numpy arrays / scalars /
    dtypes, and the ``collections.Counter`` milestones of mmengine's step
    schedulers."""
    out: List[Any] = [collections.Counter]
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
        out += [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr')]
    except ImportError:  # pragma: no cover - mmengine is a dependency
        pass
    return out + _numpy_globals()


def trust_checkpoints(*paths: str) -> None:
    """Trust checkpoint files, directories (every file below) or URL
    prefixes for this process: :func:`safe_load` may then unpickle them
    fully. Same effect as listing them in ``$MMDAT_TRUSTED_CHECKPOINTS``
    (``os.pathsep``-separated)."""
    for path in paths:
        _TRUSTED.append(_norm(path))


def _norm(path: str) -> str:
    path = os.fspath(path)
    if '://' in path:
        return path
    return os.path.realpath(os.path.expanduser(path))


def is_trusted(filename: str) -> bool:
    """Whether ``filename`` was trusted with :func:`trust_checkpoints` or
    ``$MMDAT_TRUSTED_CHECKPOINTS`` (itself or a directory above it)."""
    target = _norm(filename)
    env = [_norm(p) for p in os.environ.get(TRUST_ENV, '').split(os.pathsep)
           if p]
    for entry in _TRUSTED + env:
        if target == entry:
            return True
        if '://' in entry or '://' in target:
            if target.startswith(entry.rstrip('/') + '/'):
                return True
        elif target.startswith(entry.rstrip(os.sep) + os.sep):
            return True
    return False


def _unsafe_names(exc: BaseException, source) -> List[str]:
    """Names of the globals that made a weights-only load fail."""
    names: List[str] = []
    if isinstance(source, str) and os.path.isfile(source):
        try:
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(
                source))
        except Exception:  # noqa: BLE001 - best effort, message below
            names = []
        allowed = set()
        for g in safe_globals():
            allowed.add(g[1] if isinstance(g, tuple) else
                        f'{g.__module__}.{g.__qualname__}')
        names = [n for n in names if n not in allowed]
    if not names:
        names = re.findall(r'GLOBAL ([\w.]+)', str(exc))
    return sorted(set(names))


def _untrusted_error(filename: str, exc: BaseException,
                     names: List[str]) -> UntrustedCheckpointError:
    what = ', '.join(names) if names else f'(torch says: {exc})'
    return UntrustedCheckpointError(
        f'{filename} needs the pickled global(s) {what}, which safe loading '
        f'(torch.load(weights_only=True) with mmdat\'s allowlist) refuses: '
        'unpickling them could run arbitrary code. If you trust this file, '
        'opt in with one of: safe_load(..., trusted=True); '
        f'{TRUST_ENV}={filename} (a file, a directory or a URL prefix; '
        f'{os.pathsep!r}-separated); mmdat.utils.checkpoint.'
        'trust_checkpoints(path); or allow just those globals with '
        'torch.serialization.add_safe_globals([...]). The converter '
        '(tools/model_converters/dat2mmdat.py) takes --trust.',
        filename, names)


def _torch_load(source, map_location, trusted: bool, filename: str,
                logger=None, **kwargs):
    """torch.load under the policy (see :func:`safe_load`)."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(source, map_location=map_location,
                              weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        if 'weights only' not in str(exc).lower():
            raise  # not a refused global: a corrupt file (reported above)
        if not trusted:
            raise _untrusted_error(filename, exc,
                                   _unsafe_names(exc, source)) from None
        msg = (f'{filename}: loading with weights_only=False (trusted '
               f'checkpoint; the weights-only load failed: '
               f'{str(exc).splitlines()[0]})')
        if logger is not None:
            logger.warning(msg)
        else:
            warnings.warn(msg)
        if hasattr(source, 'seek'):
            source.seek(0)
        return torch.load(source, map_location=map_location,
                          weights_only=False, **kwargs)


@contextlib.contextmanager
def _policy_torch_load(trusted: bool, filename: str, logger=None):
    """Route every ``torch.load`` made inside (mmengine's checkpoint
    loaders for URLs and other schemes call it themselves) through the
    safe-loading policy. The swap is process-wide for the duration, hence
    the lock."""
    original = torch.load

    def policy_load(f, map_location=None, *args, weights_only=None,
                    **kwargs):
        torch.load = original  # the real one for nested loads
        try:
            return _torch_load(f, map_location, trusted, filename, logger,
                               **kwargs)
        finally:
            torch.load = policy_load

    with _PATCH_LOCK:
        torch.load = policy_load
        try:
            yield
        finally:
            torch.load = original


def safe_load(filename: Union[str, os.PathLike],
              map_location: Any = 'cpu',
              trusted: bool = False,
              logger=None) -> Any:
    """Load a checkpoint the way mmengine's ``CheckpointLoader`` finds it,
    unpickling only what a checkpoint legitimately holds.

    Args:
        filename: a local path, an ``http(s)://`` URL (downloaded once into
            the torch hub cache, ``<torch.hub.get_dir()>/checkpoints``, the
            file mmengine's ``load_url`` uses) or any other scheme
            registered with ``mmengine.runner.CheckpointLoader``
            (``torchvision://``, ``open-mmlab://``, ``s3://`` ...).
        map_location: as for ``torch.load``.
        trusted: the caller vouches for the file: when the weights-only load
            fails, load it with ``weights_only=False`` (with a warning).
            Files and directories listed in ``$MMDAT_TRUSTED_CHECKPOINTS`` or
            passed to :func:`trust_checkpoints` count as trusted too.
        logger: where the trusted fallback is reported (default: warnings).

    Returns:
        What ``torch.load`` returns (usually a dict).

    Raises:
        FileNotFoundError: a local file that does not exist (path named).
        UntrustedCheckpointError: the file needs a pickled global outside
            :func:`safe_globals`; the message names it and the ways to opt
            in.
        RuntimeError: a truncated or corrupt file (path named).
    """
    if not isinstance(filename, (str, os.PathLike)):
        raise TypeError(f'checkpoint must be a path or URL string, got '
                        f'{filename!r}')
    filename = os.fspath(filename)
    trusted = bool(trusted) or is_trusted(filename)
    try:
        if '://' not in filename:
            path = os.path.expanduser(filename)
            if not os.path.isfile(path):
                raise FileNotFoundError(f'checkpoint file not found: '
                                        f'{filename}')
            return _torch_load(path, map_location, trusted, filename, logger)
        from mmengine.runner.checkpoint import CheckpointLoader
        loader = CheckpointLoader._get_checkpoint_loader(filename)
        with _policy_torch_load(trusted, filename, logger):
            return loader(filename, map_location=map_location)
    except (FileNotFoundError, UntrustedCheckpointError):
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt file
        raise RuntimeError(
            f'could not read checkpoint {filename} (truncated or not a torch '
            f'checkpoint?): {type(exc).__name__}: {exc}') from exc


def read_checkpoint(path: Union[str, os.PathLike], trusted: bool = False,
                    logger=None) -> dict:
    """:func:`safe_load` a checkpoint that must hold a dict."""
    ckpt = safe_load(path, 'cpu', trusted=trusted, logger=logger)
    if not isinstance(ckpt, dict):
        raise ValueError(f'checkpoint {os.fspath(path)} holds a '
                         f'{type(ckpt).__name__}, expected a dict')
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


def is_classifier_checkpoint(ckpt: dict) -> bool:
    """Whether ``ckpt`` is an image classifier (official, converted, or an
    mmpretrain ``ImageClassifier`` of ours): its ``norms.3``/``cls_norm`` is
    then the classifier's head norm."""
    if checkpoint_kind(ckpt) == KIND_CLASSIFICATION:
        return True
    meta = ckpt.get('meta')
    if isinstance(meta, dict) and meta.get(
            'source_kind') == KIND_CLASSIFICATION:
        return True
    sd = ckpt.get('state_dict')
    return isinstance(sd, dict) and any(k.startswith('head.fc.') for k in sd)


def backbone_state_dict(ckpt: dict, path: str = '<checkpoint>',
                        prefix: Optional[str] = None
                        ) -> Dict[str, torch.Tensor]:
    """The DAT backbone's weights (no prefix) from any supported checkpoint.

    From a classifier (see :func:`is_classifier_checkpoint`) the output
    norms are left out: the official dense fine-tuning never copies
    ``cls_norm``, its ``norms.i`` start at weight 1 / bias 0.
    """
    checkpoint_kind(ckpt, path)  # a clear error for a foreign file
    _, sd = convert_official(ckpt, path)
    prefix = prefix or 'backbone.'
    out = OrderedDict((k[len(prefix):], v) for k, v in sd.items()
                      if k.startswith(prefix))
    if is_classifier_checkpoint(ckpt):
        out = OrderedDict((k, v) for k, v in out.items()
                          if not k.startswith('norms.'))
    return out


def resize_rpe_table(table: torch.Tensor, size) -> torch.Tensor:
    """A deformable position-bias table (heads, 2Hq-1, 2Wq-1) resized to
    ``size`` bicubically, corners kept (the table is sampled with
    ``align_corners=True``), in the table's dtype."""
    return F.interpolate(table[None].float(), size=tuple(size),
                         mode='bicubic', align_corners=True)[0].to(
                             table.dtype)


def resize_rpe_tables(sd: Dict[str, torch.Tensor],
                      target: Dict[str, torch.Tensor], logger=None) -> None:
    """Resize, in place, the ``rpe_table`` entries of ``sd`` whose size
    differs from ``target``'s (224 -> 384 fine-tuning)."""
    for k, v in list(sd.items()):
        if k.endswith('rpe_table') and k in target and \
                target[k].shape != v.shape and v.dim() == 3 and \
                target[k].shape[0] == v.shape[0]:
            sd[k] = resize_rpe_table(v, target[k].shape[-2:])
            if logger is not None:
                logger.info(f'resized {k} from {tuple(v.shape)} to '
                            f'{tuple(target[k].shape)} (bicubic)')


def load_dat_pretrained(model: torch.nn.Module, path: str,
                        prefix: Optional[str] = None, logger=None,
                        trusted: bool = False) -> None:
    """Load backbone weights from an official or converted checkpoint.

    ``path``: whatever :func:`safe_load` accepts (local path, URL, mmengine
    scheme); ``trusted`` as there. Shape mismatches raise (naming key and
    shapes); missing/unexpected keys are reported through ``logger`` (the
    dense output norms are legitimately missing when the file is a
    classifier).
    """
    ckpt = read_checkpoint(path, trusted=trusted, logger=logger)
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

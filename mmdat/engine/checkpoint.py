"""mmengine's local checkpoint loader on torch >= 2.6, without
``weights_only=False`` for files the run did not write.

mmengine 0.10.7 calls ``torch.load(filename, map_location)``; since torch 2.6
that means ``weights_only=True``, and a checkpoint written by the runner no
longer loads (its message hub holds ``HistoryBuffer`` objects and numpy
values). :func:`install_checkpoint_loader` re-registers mmengine's local
('' prefix) scheme with :func:`mmdat.utils.checkpoint.safe_load`:
``weights_only=True`` with an allowlist of what mmengine checkpoints hold;
``weights_only=False`` only as a last resort for files inside a trusted
directory (the run's own ``work_dir``, see :func:`trust_work_dir`), and
never silently. Other schemes (http, s3, ...) and ``torch.load`` itself
are untouched.
"""
import os
import os.path as osp
from typing import List

from mmengine.runner.checkpoint import CheckpointLoader

_TRUSTED_DIRS: List[str] = []


def trust_work_dir(path: str) -> None:
    """Trust checkpoints below ``path`` (the run's own work_dir): they may
    fall back to ``weights_only=False`` (with a warning) if the allowlist
    does not cover them."""
    path = osp.realpath(osp.expanduser(path))
    if path not in _TRUSTED_DIRS:
        _TRUSTED_DIRS.append(path)


def is_trusted(filename: str) -> bool:
    """Whether ``filename`` lies in a directory given to
    :func:`trust_work_dir`."""
    real = osp.realpath(osp.expanduser(filename))
    return any(real == d or real.startswith(d.rstrip(os.sep) + os.sep)
               for d in _TRUSTED_DIRS)


def load_from_local(filename: str, map_location=None):
    """mmengine's local loader: :func:`~mmdat.utils.checkpoint.safe_load`,
    trusted only inside a trusted work_dir."""
    from mmengine.logging import MMLogger

    from mmdat.utils.checkpoint import safe_load
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return safe_load(filename, map_location=map_location,
                     trusted=is_trusted(filename),
                     logger=MMLogger.get_current_instance())


def install_checkpoint_loader() -> None:
    """Register :func:`load_from_local` for mmengine's local scheme
    (idempotent)."""
    if CheckpointLoader._schemes.get('') is not load_from_local:
        CheckpointLoader.register_scheme(
            prefixes='', loader=load_from_local, force=True)

"""Shared helpers for ``tools/train.py`` and ``tools/test.py``.

One way for every tool to load a config and build the right runner, whatever
OpenMMLab library (mmdet, mmseg or mmpretrain) the config belongs to:

* :func:`load_config` reads the config, merges ``--cfg-options``, imports
  ``mmdat`` (it registers the ``DAT`` backbone), resolves ``default_scope`` and
  registers the matching library's modules.
* :func:`build_runner` builds ``Runner`` (or ``cfg.runner_type``) after
  :func:`prepare_dist` made the config runnable without CUDA and
  :func:`add_iteration_seed_hook` made resumed runs draw the same random
  numbers as uninterrupted ones.
* :func:`setup_work_dir`, :func:`apply_amp`, :func:`apply_auto_scale_lr`,
  :func:`apply_resume`, :func:`enable_visualization`, :func:`apply_tta` and
  :func:`add_dump_results` translate the command line options of the tools.

Importing this module also installs :func:`install_checkpoint_loader` (see
there) so that checkpoints written by an mmengine runner load again under
torch >= 2.6, whose ``torch.load`` defaults to ``weights_only=True``.
"""
import contextlib
import importlib
import logging
import os
import os.path as osp
import pickle
import warnings
from copy import deepcopy
from typing import Iterable, List, Optional, Union

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel
from mmengine.model.utils import revert_sync_batchnorm
from mmengine.optim import OptimWrapper
from mmengine.registry import MODEL_WRAPPERS, OPTIM_WRAPPERS

SUPPORTED_SCOPES = ('mmdet', 'mmseg', 'mmpretrain')

__all__ = [
    'SUPPORTED_SCOPES', 'load_config', 'resolve_scope', 'build_runner',
    'setup_work_dir', 'apply_amp', 'apply_auto_scale_lr', 'apply_resume',
    'prepare_dist', 'enable_visualization', 'apply_tta', 'add_dump_results',
    'apply_out_before_build', 'add_iteration_seed_hook',
    'install_checkpoint_loader', 'trust_checkpoint_path',
    'checkpoint_safe_globals', 'CPUDistributedDataParallel',
    'CPUAmpOptimWrapper'
]


# ---------------------------------------------------------------------------
# Config loading
# ---------------------------------------------------------------------------
def _scope_from_path(path: str) -> Optional[str]:
    """``configs/mmdet/foo.py`` -> ``'mmdet'`` (nearest matching folder)."""
    parts = osp.normpath(osp.abspath(path)).split(os.sep)[:-1]
    for part in reversed(parts):
        if part in SUPPORTED_SCOPES:
            return part
    return None


def resolve_scope(cfg: Config, path: Optional[str] = None) -> str:
    """Return the config's ``default_scope`` (one of :data:`SUPPORTED_SCOPES`).

    A config without ``default_scope`` gets the library named by its folder
    (``configs/<library>/...``). Anything else raises a ``ValueError`` that
    names the config file and the offending value.
    """
    path = path or getattr(cfg, 'filename', None) or '<config>'
    scope = cfg.get('default_scope', None)
    if scope is None:
        scope = _scope_from_path(path)
        if scope is None:
            raise ValueError(
                f'{path}: the config sets no `default_scope` and does not '
                f'live under a folder named after a library; set '
                f'`default_scope` to one of {", ".join(SUPPORTED_SCOPES)}.')
        cfg.default_scope = scope
    if scope not in SUPPORTED_SCOPES:
        raise ValueError(
            f'{path}: unsupported default_scope={scope!r}; mmdat tools '
            f'support {", ".join(repr(s) for s in SUPPORTED_SCOPES)}.')
    return scope


def _ensure_custom_import(cfg: Config, module: str = 'mmdat') -> None:
    custom = cfg.get('custom_imports', None)
    if custom is None:
        cfg.custom_imports = dict(imports=[module], allow_failed_imports=False)
        return
    imports = custom.get('imports', [])
    if isinstance(imports, str):
        imports = [imports]
    imports = list(imports)
    if module not in imports:
        imports.append(module)
    custom['imports'] = imports


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """Load a config the same way for every tool.

    ``Config.fromfile`` + ``--cfg-options``; ``custom_imports`` is made to
    include ``'mmdat'`` (and ``mmdat`` is imported, which registers ``DAT``);
    ``default_scope`` is resolved (see :func:`resolve_scope`) and the matching
    ``<library>.utils.register_all_modules(init_default_scope=True)`` is
    called.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file not found: {path}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = resolve_scope(cfg, path)
    _ensure_custom_import(cfg)
    allow_failed = cfg.custom_imports.get('allow_failed_imports', False)
    for module in cfg.custom_imports['imports']:
        try:
            importlib.import_module(module)
        except ImportError:
            if not allow_failed or module == 'mmdat':
                raise
            warnings.warn(f'{path}: failed to import {module}, skipped.')
    importlib.import_module(f'{scope}.utils').register_all_modules(
        init_default_scope=True)
    if scope == 'mmdet':
        # Same as mmdet's tools: fewer dynamo recompilations.
        from mmdet.utils import setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()
    elif scope == 'mmpretrain':
        # mmpretrain's tools default every dataloader to `default_collate`.
        for field in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            if cfg.get(field, None) is not None:
                cfg[field].setdefault('collate_fn',
                                      dict(type='default_collate'))
    install_checkpoint_loader()
    return cfg


# ---------------------------------------------------------------------------
# Command line options -> config
# ---------------------------------------------------------------------------
def setup_work_dir(cfg: Config, args=None, config_path: Optional[str] = None):
    """work_dir priority: CLI ``--work-dir`` > ``cfg.work_dir`` >
    ``./work_dirs/<config stem>``."""
    work_dir = getattr(args, 'work_dir', None) if args is not None else None
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        config_path = config_path or getattr(args, 'config', None) \
            or cfg.filename
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(config_path))[0])
    return cfg.work_dir


def apply_amp(cfg: Config) -> Config:
    """Enable automatic mixed precision.

    With CUDA: ``AmpOptimWrapper`` with dynamic loss scaling (as the
    libraries' tools do). mmengine's ``AmpOptimWrapper`` refuses to run
    without a GPU, so on CPU :class:`CPUAmpOptimWrapper` (bfloat16 autocast,
    no loss scaling needed) is used instead.
    """
    optim_wrapper = cfg.optim_wrapper
    current = optim_wrapper.get('type', 'OptimWrapper')
    wanted = 'AmpOptimWrapper' if torch.cuda.is_available() \
        else 'CPUAmpOptimWrapper'
    if current == wanted:
        print_log('AMP training is already enabled in the config.',
                  logger='current', level=logging.WARNING)
        return cfg
    if current not in ('OptimWrapper', 'AmpOptimWrapper'):
        raise ValueError('`--amp` is only supported when optim_wrapper.type '
                         f'is `OptimWrapper`, but got `{current}`.')
    if wanted == 'AmpOptimWrapper':
        optim_wrapper.type = 'AmpOptimWrapper'
        optim_wrapper.setdefault('loss_scale', 'dynamic')
    else:
        print_log(
            'CUDA is not available: `--amp` uses bfloat16 autocast on CPU '
            '(CPUAmpOptimWrapper) instead of AmpOptimWrapper, which needs a '
            'GPU.',
            logger='current', level=logging.WARNING)
        optim_wrapper.type = 'CPUAmpOptimWrapper'
        optim_wrapper.pop('loss_scale', None)
        optim_wrapper.dtype = 'bfloat16'
    return cfg


def apply_auto_scale_lr(cfg: Config) -> Config:
    """Turn on ``auto_scale_lr`` (needs ``base_batch_size`` in the config)."""
    auto = cfg.get('auto_scale_lr', None)
    if not auto or 'base_batch_size' not in auto:
        raise RuntimeError(
            f'{cfg.filename}: `--auto-scale-lr` needs '
            '`auto_scale_lr = dict(enable=False, base_batch_size=N)` in the '
            'config.')
    auto.enable = True
    return cfg


def apply_resume(cfg: Config, resume: Optional[Union[str, bool]]) -> Config:
    """``--resume`` semantics shared by the tools.

    * ``None``/``False``: no change (the config's own ``resume``/``load_from``
      apply).
    * ``'auto'``/``True`` (``--resume`` without a value): resume from the
      latest checkpoint in ``work_dir`` (``cfg.resume=True``,
      ``cfg.load_from=None``).
    * a path: resume from that checkpoint.
    """
    if resume is None or resume is False:
        return cfg
    cfg.resume = True
    if resume is True or resume == 'auto':
        cfg.load_from = None
    else:
        if '://' not in resume and not osp.isfile(resume):
            raise FileNotFoundError(f'checkpoint to resume from not found: '
                                    f'{resume}')
        cfg.load_from = resume
    return cfg


# ---------------------------------------------------------------------------
# Distributed training without CUDA
# ---------------------------------------------------------------------------
def prepare_dist(cfg: Config) -> Config:
    """Make ``launcher != 'none'`` work on machines without CUDA.

    * ``env_cfg.dist_cfg.backend='nccl'`` -> ``'gloo'`` (NCCL needs GPUs).
    * the model is wrapped by :class:`CPUDistributedDataParallel`, because
      mmengine passes ``device_ids=[LOCAL_RANK]`` to DDP, which DDP rejects
      for CPU modules.

    Idempotent; a no-op when CUDA is available (without CUDA the backend is
    switched even for non-distributed runs, which never use it).
    """
    if torch.cuda.is_available():
        return cfg
    env_cfg = cfg.get('env_cfg', None)
    if env_cfg is None:
        cfg.env_cfg = env_cfg = ConfigDict()
    dist_cfg = env_cfg.get('dist_cfg', None)
    if dist_cfg is None:
        env_cfg.dist_cfg = dist_cfg = ConfigDict(backend='gloo')
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        dist_cfg.backend = 'gloo'
    if cfg.get('launcher', 'none') == 'none':
        return cfg
    wrapper = cfg.get('model_wrapper_cfg', None)
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(
            type='CPUDistributedDataParallel',
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    elif wrapper.get('type', 'MMDistributedDataParallel') \
            == 'MMDistributedDataParallel':
        wrapper.type = 'CPUDistributedDataParallel'
    return cfg


def _init_cpu_process_group(cfg: Config) -> None:
    """mmengine's ``init_dist`` calls ``torch.cuda.set_device`` first, which
    fails without a GPU; for ``--launcher pytorch`` (torchrun) we create the
    process group ourselves so that the runner finds it already set up."""
    import torch.distributed as dist
    if torch.cuda.is_available() or cfg.get('launcher', 'none') != 'pytorch' \
            or not dist.is_available() or dist.is_initialized():
        return
    kwargs = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    backend = kwargs.pop('backend', 'gloo')
    timeout = kwargs.pop('timeout', None)
    if timeout is not None:
        import datetime
        kwargs['timeout'] = datetime.timedelta(seconds=timeout)
    dist.init_process_group(backend=backend, **kwargs)


def add_iteration_seed_hook(cfg: Config) -> Config:
    """Append :class:`~mmdat.apis.hooks.IterationSeedHook` to
    ``cfg.custom_hooks`` unless the config lists it already: a run resumed
    from a checkpoint then draws the same random numbers (drop path, ...) as
    the uninterrupted run."""
    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(str(h.get('type', '')).split('.')[-1] == 'IterationSeedHook'
               for h in hooks):
        hooks.append(dict(type='IterationSeedHook'))
    cfg.custom_hooks = hooks
    return cfg


def build_runner(cfg: Config):
    """Build the runner the way mmdet's ``tools/train.py`` does:
    ``Runner.from_cfg(cfg)`` unless ``cfg.runner_type`` is set, in which case
    ``RUNNERS.build(cfg)`` (resolved in the config's ``default_scope``).
    :func:`add_iteration_seed_hook` is applied first."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    add_iteration_seed_hook(cfg)
    prepare_dist(cfg)
    _init_cpu_process_group(cfg)
    install_checkpoint_loader()
    if cfg.get('load_from', None) and cfg.get('resume', False):
        # Resuming from an explicit checkpoint: the user vouches for it.
        trust_checkpoint_path(cfg.load_from)
    if cfg.get('work_dir', None):
        # Checkpoints that this runner (or an earlier run) wrote here.
        trust_checkpoint_path(cfg.work_dir)
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


# ---------------------------------------------------------------------------
# test.py options
# ---------------------------------------------------------------------------
def enable_visualization(cfg: Config,
                         show_dir: Optional[str] = None,
                         show: bool = False,
                         wait_time: float = 2.,
                         interval: int = 1) -> Config:
    """Make the runner's visualization hook draw test predictions.

    * mmdet: ``draw=True``, ``test_out_dir=show_dir`` (a relative path is
      put under ``work_dir/<timestamp>/`` by mmdet's hook).
    * mmseg: ``draw=True``, ``interval``; images go to the visualizer's
      ``save_dir=show_dir`` (``<show_dir>/vis_data/vis_image/``).
    * mmpretrain: ``enable=True``, ``out_dir=show_dir``, ``interval``.
    """
    scope = resolve_scope(cfg)
    hooks = cfg.get('default_hooks', None) or {}
    if 'visualization' not in hooks or hooks['visualization'] is None:
        raise RuntimeError(
            f'{cfg.filename}: VisualizationHook must be included in '
            "default_hooks: visualization=dict(type='...VisualizationHook')")
    vis = hooks['visualization']
    if scope == 'mmpretrain':
        vis.enable = True
        vis.show = show
        vis.wait_time = wait_time
        vis.interval = interval
        if show_dir is not None:
            vis.out_dir = show_dir
    else:
        vis.draw = True
        if show:
            vis.show = True
            vis.wait_time = wait_time
        if scope == 'mmdet':
            if show_dir is not None:
                vis.test_out_dir = show_dir
        else:  # mmseg
            vis.interval = interval
            if show_dir is not None:
                cfg.visualizer.save_dir = show_dir
    return cfg


def apply_tta(cfg: Config) -> Config:
    """Wrap the model for test-time augmentation.

    Uses the config's ``tta_model``/``tta_pipeline``; mmdet and mmpretrain
    fall back to horizontal-flip TTA like their own tools, mmseg requires
    both fields (mmseg's configs define them).
    """
    scope = resolve_scope(cfg)
    test_data_cfg = cfg.test_dataloader.dataset
    while 'dataset' in test_data_cfg:
        test_data_cfg = test_data_cfg['dataset']
    if scope == 'mmseg':
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise RuntimeError(f'{cfg.filename}: `--tta` needs `tta_model` '
                               'and `tta_pipeline` in the config.')
    else:
        if 'tta_model' not in cfg:
            warnings.warn('Cannot find `tta_model` in config, using the '
                          'default one.')
            if scope == 'mmdet':
                cfg.tta_model = dict(
                    type='DetTTAModel',
                    tta_cfg=dict(
                        nms=dict(type='nms', iou_threshold=0.5),
                        max_per_img=100))
            else:
                cfg.tta_model = dict(type='mmpretrain.AverageClsScoreTTA')
        if 'tta_pipeline' not in cfg:
            warnings.warn('Cannot find `tta_pipeline` in config, using '
                          'horizontal flip TTA.')
            pipeline = deepcopy(test_data_cfg.pipeline)
            pack = pipeline[-1]
            if scope == 'mmdet':
                pack = dict(
                    type='PackDetInputs',
                    meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                               'scale_factor', 'flip', 'flip_direction'))
            pipeline[-1] = dict(
                type='TestTimeAug',
                transforms=[[
                    dict(type='RandomFlip', prob=1.),
                    dict(type='RandomFlip', prob=0.)
                ], [pack]])
            cfg.tta_pipeline = pipeline
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    test_data_cfg.pipeline = cfg.tta_pipeline
    return cfg


def add_dump_results(cfg: Config, runner, out: str) -> None:
    """``--out``: dump predictions (mmdet/mmpretrain: a pickle file; mmseg:
    a directory of prediction PNGs, set up before the runner is built via
    ``cfg.test_evaluator.output_dir``)."""
    scope = resolve_scope(cfg)
    if scope == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        if not out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out must be a .pkl/.pickle file for mmdet.')
        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=out))
    elif scope == 'mmpretrain':
        from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=out))


def apply_out_before_build(cfg: Config, out: Optional[str]) -> Config:
    """mmseg writes ``--out`` prediction PNGs through its IoUMetric."""
    if out is not None and resolve_scope(cfg) == 'mmseg':
        evaluator = cfg.test_evaluator
        evaluators = evaluator if isinstance(evaluator, list) else [evaluator]
        for ev in evaluators:
            ev['output_dir'] = out
            ev['keep_results'] = True
    return cfg


# ---------------------------------------------------------------------------
# Optimizer / model wrappers registered into mmengine's root registries
# ---------------------------------------------------------------------------
@MODEL_WRAPPERS.register_module(force=True)
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that also works for CPU modules.

    mmengine always passes ``device_ids=[LOCAL_RANK]``; DDP only accepts
    ``device_ids`` for GPU modules, so they are dropped for CPU modules.
    SyncBN cannot run on CPU either and is reverted to plain BN (the
    statistics are then per process).
    """

    def __init__(self, module, device_ids=None, **kwargs):
        param = next(module.parameters(), None)
        if param is None or param.device.type == 'cpu':
            device_ids = None
            kwargs.pop('output_device', None)
            module = revert_sync_batchnorm(module)
        super().__init__(module=module, device_ids=device_ids, **kwargs)


@OPTIM_WRAPPERS.register_module(force=True)
class CPUAmpOptimWrapper(OptimWrapper):
    """Mixed precision on CPU: ``torch.autocast('cpu', dtype=bfloat16)``.

    mmengine's ``AmpOptimWrapper`` asserts that a GPU is present; bfloat16
    has the float32 exponent range, so no loss scaling is needed.
    """

    def __init__(self, dtype='bfloat16', loss_scale=None, **kwargs):
        super().__init__(**kwargs)
        self.cast_dtype = getattr(torch, dtype) \
            if isinstance(dtype, str) else dtype

    @contextlib.contextmanager
    def optim_context(self, model):
        with super().optim_context(model), torch.autocast(
                device_type='cpu', dtype=self.cast_dtype):
            yield


# ---------------------------------------------------------------------------
# torch >= 2.6: torch.load(weights_only=True) vs. mmengine checkpoints
# ---------------------------------------------------------------------------
# mmengine 0.10.7 calls ``torch.load(filename, map_location)``; since torch 2.6
# that means ``weights_only=True`` and a checkpoint written by the runner no
# longer loads: it holds the message hub (``HistoryBuffer`` objects with numpy
# arrays, numpy dtypes/scalars and, for their statistics methods,
# ``getattr(HistoryBuffer, 'mean')``). Choice:
#
# 1. Keep ``weights_only=True`` and allow exactly those globals, only for the
#    duration of mmengine's local-file loads (``torch.serialization.
#    safe_globals`` context, not a global ``add_safe_globals``). ``builtins.
#    getattr`` is NOT allowed as such (it would make the allowlist useless);
#    it is mapped to a getattr that only returns HistoryBuffer's registered
#    statistics methods. This covers every checkpoint mmengine writes, from
#    any source, without giving up the safe unpickler.
# 2. Only if that still fails (e.g. a hook stored other objects) and the file
#    lies in a trusted place - the run's work_dir, i.e. checkpoints the runner
#    itself wrote, or a checkpoint the user named with ``--resume PATH`` /
#    ``test.py CHECKPOINT`` - retry with ``weights_only=False`` and warn.
#
# ``torch.load`` itself is not patched; only mmengine's local ('' prefix)
# checkpoint scheme is re-registered, so http/s3/... loaders are unchanged.
_TRUSTED_PATHS: List[str] = []
_LOADER_INSTALLED = False


def _stats_getattr(obj, name):
    """Stand-in for ``builtins.getattr`` in the unpickler: only
    ``HistoryBuffer.<statistics method>`` may be looked up."""
    from mmengine.logging.history_buffer import HistoryBuffer
    allowed = set(HistoryBuffer._statistics_methods) | {
        'min', 'max', 'current', 'mean'}
    if obj is HistoryBuffer and name in allowed:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'refusing getattr({obj!r}, {name!r}) while loading a checkpoint')


def checkpoint_safe_globals() -> list:
    """Globals (beyond torch's defaults) in a checkpoint written by an
    mmengine runner, in the form ``torch.serialization.safe_globals``
    takes."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer
    try:
        from numpy.core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy >= 2 without the numpy.core alias
        from numpy._core.multiarray import _reconstruct, scalar
    safe = [HistoryBuffer, np.ndarray, np.dtype, (_stats_getattr,
                                                  'builtins.getattr')]
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        safe += [(_reconstruct, f'{mod}._reconstruct'),
                 (scalar, f'{mod}.scalar')]
    dtypes = getattr(np, 'dtypes', None)  # numpy >= 1.25
    if dtypes is not None:
        safe += [getattr(dtypes, n) for n in dtypes.__all__]
    return safe


def trust_checkpoint_path(path: str) -> None:
    """Allow ``weights_only=False`` as a last resort for checkpoints at
    ``path`` (a file or a directory, recursively)."""
    path = osp.realpath(osp.expanduser(path))
    if path not in _TRUSTED_PATHS:
        _TRUSTED_PATHS.append(path)


def _is_trusted(filename: str) -> bool:
    real = osp.realpath(filename)
    return any(real == p or real.startswith(p.rstrip(os.sep) + os.sep)
               for p in _TRUSTED_PATHS)


def _load_from_local(filename, map_location):
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            return torch.load(
                filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not _is_trusted(filename):
            raise pickle.UnpicklingError(
                f'{filename}: not loadable with weights_only=True and not in '
                'a trusted location (the work_dir, or a path given to '
                '--resume / test.py). ' + str(err)) from None
        print_log(
            f'{filename}: weights_only=True failed ({str(err)[-200:]!r}); '
            'loading with weights_only=False because the file is in a '
            'trusted location.',
            logger='current',
            level=logging.WARNING)
        return torch.load(
            filename, map_location=map_location, weights_only=False)


_load_from_local.__name__ = 'load_from_local'  # mmengine logs name[10:]


def install_checkpoint_loader(trusted: Iterable[str] = ()) -> None:
    """Register :func:`_load_from_local` as mmengine's local checkpoint
    loader (idempotent); ``trusted`` paths are passed to
    :func:`trust_checkpoint_path`."""
    global _LOADER_INSTALLED
    for path in trusted:
        trust_checkpoint_path(path)
    if _LOADER_INSTALLED:
        return
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(
        prefixes='', loader=_load_from_local, force=True)
    _LOADER_INSTALLED = True


install_checkpoint_loader()


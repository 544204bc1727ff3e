"""What ``tools/train.py`` and ``tools/test.py`` add to the upstream
(mmdet / mmseg / mmpretrain) tools of the same name.

* One entry point for the three libraries: :func:`load_config` picks the
  library from ``default_scope`` (or the ``configs/<library>/`` folder) and
  registers its modules, :func:`enable_visualization`, :func:`apply_tta` and
  :func:`add_dump_results` apply each library's own meaning of ``--show-dir``
  / ``--tta`` / ``--out``.
* Machines without CUDA: :func:`prepare_dist` (gloo, a DDP wrapper for CPU
  modules, a process group created without ``torch.cuda.set_device``) and
  :func:`apply_amp` (``AmpOptimWrapper`` -> :class:`~mmdat.engine.
  CPUAmpOptimWrapper`, for ``--amp`` and for configs that ask for AMP).
* The opt-in engine shims: the tools import :mod:`mmdat.engine`, and
  :func:`build_runner` trusts the run's own work_dir for checkpoint loading.
"""
import importlib
import logging
import os
import os.path as osp
import warnings
from copy import deepcopy
from typing import Optional, Union

import mmengine
import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

import mmdat.engine as engine

SUPPORTED_SCOPES = ('mmdet', 'mmseg', 'mmpretrain')
IMPORTS = ('mmdat', 'mmdat.engine')

__all__ = [
    'SUPPORTED_SCOPES', 'load_config', 'resolve_scope', 'build_runner',
    'setup_work_dir', 'apply_amp', 'apply_auto_scale_lr', 'apply_resume',
    'prepare_dist', 'enable_visualization', 'apply_tta', 'add_dump_results',
    'apply_out_before_build'
]


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


def _ensure_custom_imports(cfg: Config, modules=IMPORTS) -> None:
    """Add ``modules`` to ``cfg.custom_imports`` (kept in the dumped config,
    so the runner's copy imports them too)."""
    custom = cfg.get('custom_imports', None)
    if custom is None:
        cfg.custom_imports = dict(imports=list(modules),
                                  allow_failed_imports=False)
        return
    imports = custom.get('imports', [])
    imports = [imports] if isinstance(imports, str) else list(imports)
    custom['imports'] = imports + [m for m in modules if m not in imports]


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """``Config.fromfile`` + ``--cfg-options``, then: ``custom_imports`` gets
    ``mmdat`` and ``mmdat.engine`` (and all are imported),
    ``default_scope`` is resolved (:func:`resolve_scope`) and that library's
    ``register_all_modules(init_default_scope=True)`` runs."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file not found: {path}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = resolve_scope(cfg, path)
    _ensure_custom_imports(cfg)
    allow_failed = cfg.custom_imports.get('allow_failed_imports', False)
    for module in cfg.custom_imports['imports']:
        try:
            importlib.import_module(module)
        except ImportError:
            if not allow_failed or module in IMPORTS:
                raise
            warnings.warn(f'{path}: failed to import {module}, skipped.')
    importlib.import_module(f'{scope}.utils').register_all_modules(
        init_default_scope=True)
    if scope == 'mmdet':  # as mmdet's tools: fewer dynamo recompilations
        from mmdet.utils import setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()
    elif scope == 'mmpretrain':  # as mmpretrain's tools
        for field in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            if cfg.get(field, None) is not None:
                cfg[field].setdefault('collate_fn',
                                      dict(type='default_collate'))
    return cfg


def setup_work_dir(cfg: Config, args=None,
                   config_path: Optional[str] = None) -> str:
    """work_dir priority: CLI ``--work-dir`` > ``cfg.work_dir`` >
    ``./work_dirs/<config stem>`` (as the upstream tools)."""
    work_dir = getattr(args, 'work_dir', None)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        config_path = config_path or getattr(args, 'config', None) \
            or cfg.filename
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(config_path))[0])
    return cfg.work_dir


def apply_amp(cfg: Config, requested: bool = False) -> Config:
    """Mixed precision for ``--amp`` (``requested``) and for configs whose
    ``optim_wrapper.type`` is ``AmpOptimWrapper``.

    With CUDA, ``--amp`` sets ``AmpOptimWrapper`` with dynamic loss scaling
    (as the upstream tools). Without CUDA, mmengine's ``AmpOptimWrapper``
    asserts, so it becomes :class:`~mmdat.engine.CPUAmpOptimWrapper`
    (bfloat16 autocast in the backbone, float32 elsewhere), with a log line.
    """
    optim_wrapper = cfg.optim_wrapper
    current = optim_wrapper.get('type', 'OptimWrapper')
    if requested:
        if current in ('AmpOptimWrapper', 'CPUAmpOptimWrapper'):
            print_log('AMP training is already enabled in the config.',
                      logger='current', level=logging.WARNING)
        elif current != 'OptimWrapper':
            raise ValueError('`--amp` is only supported when '
                             'optim_wrapper.type is `OptimWrapper`, but got '
                             f'`{current}`.')
        else:
            optim_wrapper.type = current = 'AmpOptimWrapper'
            optim_wrapper.setdefault('loss_scale', 'dynamic')
    if current == 'AmpOptimWrapper' and not torch.cuda.is_available():
        print_log(
            'CUDA is not available: AmpOptimWrapper (fp16, needs a GPU) is '
            'replaced by CPUAmpOptimWrapper (bfloat16 autocast in the '
            'backbone; necks, heads and mmcv ops in float32).',
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
    """``--resume``: ``None``/``False`` keeps the config's
    ``resume``/``load_from``; ``'auto'``/``True`` resumes from the latest
    checkpoint in ``work_dir``; a path resumes from that checkpoint."""
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


def prepare_dist(cfg: Config) -> Config:
    """Make ``launcher != 'none'`` work on machines without CUDA: the
    ``nccl`` backend becomes ``gloo`` and the model wrapper
    :class:`~mmdat.engine.CPUDistributedDataParallel` (mmengine passes
    ``device_ids=[LOCAL_RANK]``, which DDP rejects for CPU modules).
    Idempotent; a no-op with CUDA."""
    if torch.cuda.is_available():
        return cfg
    env_cfg = cfg.setdefault('env_cfg', ConfigDict())
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
    fails without a GPU; for ``--launcher pytorch`` (torchrun) the process
    group is created here, and the runner finds it already set up."""
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


def build_runner(cfg: Config) -> 'mmengine.runner.Runner':
    """``Runner.from_cfg(cfg)``, or ``RUNNERS.build(cfg)`` when
    ``cfg.runner_type`` is set (as the upstream tools), after
    :func:`prepare_dist`; checkpoints inside ``cfg.work_dir`` (written by
    this or an earlier run) are trusted by the checkpoint loader."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    prepare_dist(cfg)
    _init_cpu_process_group(cfg)
    engine.install_checkpoint_loader()
    if cfg.get('work_dir', None):
        engine.trust_work_dir(cfg.work_dir)
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


def enable_visualization(cfg: Config,
                         show_dir: Optional[str] = None,
                         show: bool = False,
                         wait_time: float = 2.,
                         interval: int = 1) -> Config:
    """Make the visualization hook draw test predictions; with ``show_dir``
    the images of all three libraries go to that directory (relative to the
    current directory), not below ``work_dir`` or ``vis_data/``."""
    scope = resolve_scope(cfg)
    hooks = cfg.get('default_hooks', None) or {}
    if hooks.get('visualization', None) is None:
        raise RuntimeError(
            f'{cfg.filename}: VisualizationHook must be included in '
            "default_hooks: visualization=dict(type='...VisualizationHook')")
    vis = hooks['visualization']
    show_dir = osp.abspath(show_dir) if show_dir else None
    vis.update(show=show, wait_time=wait_time)
    if scope == 'mmpretrain':
        vis.update(enable=True, interval=interval)
        if show_dir:
            vis.out_dir = show_dir
    elif scope == 'mmdet':
        vis.draw = True
        if show_dir:  # the hook joins it to work_dir/<timestamp>/
            vis.test_out_dir = show_dir
    else:  # mmseg: images go through the visualizer's LocalVisBackend
        vis.update(draw=True, interval=interval)
        if show_dir:
            visualizer = cfg.visualizer
            backends = list(visualizer.get('vis_backends', None) or [])
            local = [b for b in backends
                     if str(b.get('type', '')).endswith('LocalVisBackend')]
            if not local:
                backends.append(dict(type='LocalVisBackend'))
                local = backends[-1:]
            for backend in local:  # joined to <save_dir>/vis_data/
                backend['img_save_dir'] = show_dir
            visualizer.vis_backends = backends
    return cfg


def apply_tta(cfg: Config) -> Config:
    """Wrap the model for test-time augmentation with the config's
    ``tta_model``/``tta_pipeline``; mmdet and mmpretrain fall back to
    horizontal-flip TTA like their own tools, mmseg requires both."""
    scope = resolve_scope(cfg)
    test_data_cfg = cfg.test_dataloader.dataset
    while 'dataset' in test_data_cfg:
        test_data_cfg = test_data_cfg['dataset']
    if scope == 'mmseg' and ('tta_model' not in cfg
                             or 'tta_pipeline' not in cfg):
        raise RuntimeError(f'{cfg.filename}: `--tta` needs `tta_model` '
                           'and `tta_pipeline` in the config.')
    if 'tta_model' not in cfg:
        warnings.warn('Cannot find `tta_model` in config, using the '
                      'default one.')
        cfg.tta_model = dict(
            type='DetTTAModel',
            tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5),
                         max_per_img=100)) if scope == 'mmdet' else dict(
                             type='mmpretrain.AverageClsScoreTTA')
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
            transforms=[[dict(type='RandomFlip', prob=1.),
                         dict(type='RandomFlip', prob=0.)], [pack]])
        cfg.tta_pipeline = pipeline
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    test_data_cfg.pipeline = cfg.tta_pipeline
    return cfg


def apply_out_before_build(cfg: Config, out: Optional[str]) -> Config:
    """mmseg writes ``--out`` prediction PNGs through its IoUMetric."""
    if out is not None and resolve_scope(cfg) == 'mmseg':
        evaluator = cfg.test_evaluator
        for ev in evaluator if isinstance(evaluator, list) else [evaluator]:
            ev['output_dir'] = out
            ev['keep_results'] = True
    return cfg


def add_dump_results(cfg: Config, runner, out: str) -> None:
    """``--out``: dump predictions (mmdet/mmpretrain: a pickle file; mmseg:
    a directory of PNGs, see :func:`apply_out_before_build`)."""
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

"""Runner helpers shared by ``tools/train.py`` and ``tools/test.py``.

Importing this package also makes mmengine's local checkpoint loader cope with
torch >= 2.6 (see :func:`mmdat.apis.runner.install_checkpoint_loader`).
"""
from .hooks import IterationSeedHook, reseed
from .runner import (SUPPORTED_SCOPES, CPUAmpOptimWrapper,
                     CPUDistributedDataParallel, add_dump_results,
                     add_iteration_seed_hook, apply_amp,
                     apply_auto_scale_lr, apply_out_before_build,
                     apply_resume, apply_tta, build_runner,
                     checkpoint_safe_globals, enable_visualization,
                     install_checkpoint_loader, load_config, prepare_dist,
                     resolve_scope, setup_work_dir, trust_checkpoint_path)

__all__ = [
    'SUPPORTED_SCOPES', 'load_config', 'resolve_scope', 'build_runner',
    'setup_work_dir', 'apply_amp', 'apply_auto_scale_lr', 'apply_resume',
    'prepare_dist', 'enable_visualization', 'apply_tta', 'add_dump_results',
    'apply_out_before_build', 'install_checkpoint_loader',
    'trust_checkpoint_path', 'checkpoint_safe_globals',
    'CPUDistributedDataParallel', 'CPUAmpOptimWrapper',
    'add_iteration_seed_hook', 'IterationSeedHook', 'reseed'
]

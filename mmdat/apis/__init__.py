"""Helpers of ``tools/train.py`` and ``tools/test.py`` (see
:mod:`mmdat.apis.runner`). Importing this package imports the opt-in
engine shims (:mod:`mmdat.engine`)."""
from .runner import (SUPPORTED_SCOPES, add_dump_results, apply_amp,
                     apply_auto_scale_lr, apply_out_before_build,
                     apply_resume, apply_tta, build_runner,
                     enable_visualization, load_config, prepare_dist,
                     resolve_scope, setup_work_dir)

__all__ = [
    'SUPPORTED_SCOPES', 'load_config', 'resolve_scope', 'build_runner',
    'setup_work_dir', 'apply_amp', 'apply_auto_scale_lr', 'apply_resume',
    'prepare_dist', 'enable_visualization', 'apply_tta', 'add_dump_results',
    'apply_out_before_build'
]

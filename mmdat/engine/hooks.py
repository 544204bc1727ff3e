"""``IterationSeedHook``: resumed runs draw the same random numbers as
uninterrupted ones. Switched on per config::

    custom_imports = dict(imports=['mmdat', 'mmdat.engine'])
    custom_hooks = [dict(type='IterationSeedHook')]
"""
import random

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

_EPOCH, _ITER = 0, 1  # separate streams for the two reseeding points


def reseed(seed: int, *keys: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (CPU and CUDA) from
    ``(seed, *keys)`` only."""
    words = np.random.SeedSequence([seed % 2**64, *keys]).generate_state(2)
    first, second = int(words[0]), int(words[1])
    random.seed(first)
    np.random.seed(first)
    torch.manual_seed(first << 32 | second)


@HOOKS.register_module()
class IterationSeedHook(Hook):
    """Reseed the global random generators from ``(runner.seed, epoch)``
    before every training epoch and from ``(runner.seed, iteration)`` before
    every training iteration.

    A checkpoint does not hold the generators' states, and the main process
    draws from them between iterations too (a new dataloader iterator at
    every epoch, validation), so after ``--resume`` drop path, dropout and
    the batch augments of the data preprocessors would otherwise draw other
    numbers than the uninterrupted run did at the same iteration. With this
    hook they depend on the seed and the iteration alone (after a resume
    ``runner.seed`` is the checkpoint's).

    The data pipeline runs in dataloader workers that mmengine seeds itself
    (``worker_init_fn``), and the sample order comes from the sampler's seed
    and epoch; both replay on resume. With ``num_workers=0`` the pipeline
    draws from the main process's generators: the epoch reseed makes
    epoch-based resumes exact, but an iteration-based resume (mmengine
    fast-forwards the dataloader without calling hooks) gives the first
    resumed batch other augmentations.
    """

    priority = 'VERY_HIGH'  # before any other hook of the iteration draws

    def before_train_epoch(self, runner) -> None:
        reseed(runner.seed, _EPOCH, runner.epoch)

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch=None) -> None:
        reseed(runner.seed, _ITER, runner.iter)

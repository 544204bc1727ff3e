"""SIGKILL in the middle of training, then ``tools/train.py --resume``.

A small classifier (the mmpretrain demo config: DAT with drop path,
``DefaultSampler`` with shuffling, 2 dataloader workers; shrunk to 16
images of batch 4 and 8 iterations of an ``IterBasedTrainLoop`` with a
checkpoint every 2 and a log line every iteration,
``randomness=dict(seed=0, deterministic=True)``) is trained on the CPU:

* run A goes through uninterrupted;
* run B is the same training (plus a hook that only sleeps), killed with
  SIGKILL once the checkpoint of iteration 4 is complete, i.e. at an epoch
  boundary, then started again with ``--resume``.

B must continue right after its last checkpoint (nothing before it trained
again, nothing after it skipped), log the same losses as A for every
iteration, before and after the kill, and end with the same weights. This
needs ``IterationSeedHook`` (``custom_hooks`` of the config, from
``mmdat.engine``): without it the losses after the resume differ, since drop
path draws from torch's global generator, whose state no checkpoint holds.
"""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

MAX_ITERS, INTERVAL, KILL_AFTER = 8, 2, 4

# Only the killed run loads this: a pause after every iteration from
# KILL_AFTER on, so that the kill reliably lands before the end of training
# (an iteration takes ~0.1 s). Sleeping draws no random numbers.
SLOW_HOOK = '''
import time

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class SlowAfterHook(Hook):
    priority = 'LOWEST'  # after the checkpoint hook

    def __init__(self, after, seconds):
        self.after, self.seconds = after, seconds

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 >= self.after:
            time.sleep(self.seconds)
'''


def _config(data_root: Path) -> str:
    return textwrap.dedent(f'''\
        _base_ = [{str(ROOT / 'configs/mmpretrain/dat_pp_demo.py')!r}]
        train_dataloader = dict(
            batch_size=4,
            num_workers=2,
            dataset=dict(data_root={str(data_root)!r}, indices=16))
        val_dataloader = val_cfg = val_evaluator = None
        test_dataloader = test_cfg = test_evaluator = None
        train_cfg = dict(
            _delete_=True, type='IterBasedTrainLoop', max_iters={MAX_ITERS})
        param_scheduler = [
            dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
                 end=3),
            dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=False,
                 begin=3, end={MAX_ITERS})
        ]
        default_hooks = dict(
            logger=dict(interval=1),
            checkpoint=dict(interval={INTERVAL}, by_epoch=False))
        log_processor = dict(by_epoch=False, window_size=1)
        randomness = dict(seed=0, deterministic=True)
        custom_imports = dict(
            imports=['mmdat', 'mmdat.engine'], allow_failed_imports=False)
        custom_hooks = [dict(type='IterationSeedHook')]
        ''')


def _env(extra_path: Path) -> dict:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(ROOT), str(extra_path)] +
        [p for p in [env.get('PYTHONPATH')] if p])
    env['OMP_NUM_THREADS'] = '1'
    return env


def _train_cmd(config: Path, work_dir: Path) -> list:
    return [sys.executable, str(ROOT / 'tools/train.py'), str(config),
            '--work-dir', str(work_dir)]


def _losses(work_dir: Path) -> dict:
    """iteration -> logged loss, from every run's scalars.json in work_dir
    (a later run overwrites an iteration an earlier one logged too)."""
    out = {}
    for path in sorted(glob.glob(str(work_dir / '*/vis_data/scalars.json'))):
        with open(path) as f:
            for line in f:
                entry = json.loads(line)
                if 'loss' in entry:
                    out[entry['iter']] = entry['loss']
    return out


def _runs(work_dir: Path) -> list:
    """Per run (timestamp folder, oldest first): the iterations it logged."""
    runs = []
    for path in sorted(glob.glob(str(work_dir / '*/vis_data/scalars.json'))):
        with open(path) as f:
            runs.append([json.loads(line)['iter'] for line in f
                         if 'loss' in json.loads(line)])
    return runs


def _last_checkpoint(work_dir: Path):
    path = work_dir / 'last_checkpoint'
    return path.read_text().strip() if path.is_file() else None


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('resume')
    subprocess.run(
        [sys.executable,
         str(ROOT / 'tools/dataset_converters/make_demo_data.py'),
         str(tmp / 'demo')], check=True, capture_output=True)
    config = tmp / 'cfg.py'
    config.write_text(_config(tmp / 'demo' / 'imagenet'))
    (tmp / 'slow_after_hook.py').write_text(SLOW_HOOK)
    slow = tmp / 'cfg_slow.py'
    slow.write_text(textwrap.dedent(f'''\
        _base_ = ['./cfg.py']
        custom_imports = dict(
            imports=['mmdat', 'mmdat.engine', 'slow_after_hook'],
            allow_failed_imports=False)
        custom_hooks = [
            dict(type='IterationSeedHook'),
            dict(type='SlowAfterHook', after={KILL_AFTER}, seconds=1.0)]
        '''))
    return tmp, config, slow


def _check(proc):
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def test_sigkill_and_resume_matches_uninterrupted(setup):
    tmp, config, slow = setup
    env = _env(tmp)

    work_a = tmp / 'A'
    _check(subprocess.run(_train_cmd(config, work_a), env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300))
    losses_a = _losses(work_a)
    assert sorted(losses_a) == list(range(1, MAX_ITERS + 1))

    work_b = tmp / 'B'
    target = str(work_b / f'iter_{KILL_AFTER}.pth')
    with open(tmp / 'B_killed.log', 'w') as log:
        proc = subprocess.Popen(_train_cmd(slow, work_b), env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        # last_checkpoint is written once the .pth file is complete
        while _last_checkpoint(work_b) != target:
            assert proc.poll() is None, (tmp / 'B_killed.log').read_text()
            assert time.monotonic() < deadline, 'no checkpoint in 300 s'
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_iters = _runs(work_b)[-1]
    saved = int(Path(_last_checkpoint(work_b)).stem.split('_')[1])
    on_disk = [int(p.stem.split('_')[1]) for p in work_b.glob('iter_*.pth')]
    assert saved == max(on_disk) >= KILL_AFTER
    assert killed_iters == list(range(1, max(killed_iters) + 1))
    assert max(killed_iters) < MAX_ITERS, 'the kill came after the end'

    out = _check(subprocess.run(
        _train_cmd(config, work_b) + ['--resume'], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300))
    assert re.search(rf'resumed epoch: \d+, iter: {saved}\b', out), out[-3000:]
    resumed_iters = _runs(work_b)[-1]
    # continues right after the last checkpoint: nothing skipped, and redone
    # (lost) only what the killed run did after that checkpoint
    assert resumed_iters == list(range(saved + 1, MAX_ITERS + 1))
    assert 0 <= max(killed_iters) - saved < INTERVAL

    losses_b = _losses(work_b)
    assert sorted(losses_b) == list(range(1, MAX_ITERS + 1))
    for it in range(1, MAX_ITERS + 1):
        assert losses_b[it] == pytest.approx(losses_a[it], rel=1e-6,
                                             abs=1e-7), (it, losses_a,
                                                         losses_b)

    final_a = torch.load(work_a / f'iter_{MAX_ITERS}.pth', map_location='cpu',
                         weights_only=False)['state_dict']
    final_b = torch.load(work_b / f'iter_{MAX_ITERS}.pth', map_location='cpu',
                         weights_only=False)['state_dict']
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=1e-5,
                                   atol=1e-6, msg=key)


def test_reseed_depends_on_seed_and_keys_only():
    import random

    import numpy as np

    from mmdat.engine import reseed

    def draw(*args):
        reseed(*args)
        return (random.random(), float(np.random.rand()),
                float(torch.rand(())))

    torch.rand(100)  # the state before must not matter
    first = draw(0, 1, 5)
    np.random.rand(7)
    assert draw(0, 1, 5) == first
    assert len({first, draw(0, 1, 6), draw(1, 1, 5), draw(0, 0, 5)}) == 4

"""Shared helpers of the tool tests (imported by conftest and tests)."""
import glob
import importlib.util
import os
import os.path as osp
import subprocess

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = osp.join(ROOT, 'tools')
TOY_CONFIG = osp.join(ROOT, 'configs', 'toy',
                      'retinanet_repvgg-tiny_repvgg-fpn_toy.py')


def tool_path(name):
    """tools/<name>.py or tools/<folder>/<name>.py."""
    found = glob.glob(osp.join(TOOLS, f'{name}.py')) + glob.glob(
        osp.join(TOOLS, '*', f'{name}.py'))
    assert len(found) == 1, (name, found)
    return found[0]


def load_tool(name):
    """Import a tool as a module (to call its main() in-process)."""
    spec = importlib.util.spec_from_file_location(f'_tool_{name}',
                                                  tool_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(args, cwd, timeout=600, env_extra=None):
    env = dict(os.environ, PYTHONWARNINGS='ignore',
               OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    env.update(env_extra or {})
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc


def toy_train_options(epochs):
    return ['--cfg-options', f'train_cfg.max_epochs={epochs}',
            f'train_cfg.val_interval={epochs}',
            'default_hooks.checkpoint.interval=1',
            'default_hooks.checkpoint.max_keep_ckpts=3',
            'default_hooks.logger.interval=1',
            'param_scheduler.0.end=2']

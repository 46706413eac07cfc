"""``import mmrepvgg`` and building models load no checkpoint code.

Checked in a fresh interpreter: the test process itself has imported
everything already.
"""
import os.path as osp
import subprocess
import sys
import textwrap

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

CHILD = textwrap.dedent('''
    import sys

    import torch
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import mmrepvgg

    init_default_scope('mmdet')
    x = torch.randn(1, 3, 64, 64)
    MODELS.build(dict(type='RepVGG', arch='A0')).eval()(x)
    for name in ('retinanet_repvgg-tiny_repvgg-fpn_toy.py',
                 'retinanet_qarepvgg-tiny_qarepvgg-fpn_toy.py'):
        cfg = Config.fromfile('configs/toy/' + name)
        detector = MODELS.build(cfg.model).eval()
        mmrepvgg.switch_to_deploy(detector, verbose=False)._forward(x)
    loaded = sorted(m for m in sys.modules if m.startswith(
        ('mmrepvgg.deploy.checkpoint', 'mmrepvgg.deploy.unpickle',
         'mmrepvgg.deploy.pickle_types', 'mmrepvgg.engine.resume')))
    print('LOADED', loaded)
    mmrepvgg.safe_loading  # the lazy names still resolve
    from mmrepvgg.deploy import load_checkpoint  # noqa: F401
    from mmrepvgg.engine import find_resume_checkpoint  # noqa: F401
    assert 'mmrepvgg.deploy.checkpoint' in sys.modules
''')


def test_building_models_loads_no_checkpoint_code():
    proc = subprocess.run([sys.executable, '-c', CHILD], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'LOADED []' in proc.stdout.splitlines(), proc.stdout

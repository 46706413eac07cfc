"""Hook that fuses every RepVGG block of the model before testing."""
from mmdet.registry import HOOKS
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from mmrepvgg.deploy import count_reparam_blocks, switch_to_deploy


@HOOKS.register_module()
class SwitchToDeployHook(Hook):
    """Switch the model to its deploy (fused) form at ``before_test``.

    ``before_test`` runs after the runner has loaded ``load_from``, so the
    trained multi-branch weights are fused. Use it in a config as
    ``custom_hooks = [dict(type='SwitchToDeployHook')]`` or through
    ``tools/test.py --deploy``. Validation during training is left alone:
    switching is one-way and would end training.
    """

    priority = 'VERY_LOW'

    def before_test(self, runner) -> None:
        model = runner.model
        if is_model_wrapper(model):
            model = model.module
        counts = count_reparam_blocks(model)
        if counts['total'] == 0:
            print_log('SwitchToDeployHook: the model has no '
                      're-parameterizable block; nothing to switch',
                      logger='current', level=30)
            return
        switch_to_deploy(model, inplace=True)

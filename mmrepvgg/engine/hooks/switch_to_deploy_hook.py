"""Hook that fuses every RepVGG block of the model before testing."""
from mmdet.registry import HOOKS
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from mmrepvgg.deploy import count_reparam_blocks, switch_to_deploy


@HOOKS.register_module()
class SwitchToDeployHook(Hook):
    """Fuse the model at ``before_test``, once ``load_from`` is loaded
    (not for validation: switching is one-way); ``tools/test.py --deploy``."""

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

"""The deploy-form model that gets exported: a training checkpoint is
switched after loading, a deploy checkpoint (``conv_reparam`` weights) is
loaded into the config's deploy twin; strictly and safely either way.
"""
from typing import Tuple

import torch.nn as nn
from mmengine.config import Config

from mmrepvgg.apis.convert import (ConvertError, build_model,
                                   is_deploy_state_dict, load_weights,
                                   read_state_dict)
from mmrepvgg.deploy import (count_reparam_blocks, make_deploy_config,
                             switch_to_deploy)


class ExportError(ConvertError):
    """Export refused or failed; the message names the file or argument."""


def load_deploy_model(cfg: Config,
                      config_path: str,
                      checkpoint: str,
                      unsafe_load: bool = False) -> Tuple[nn.Module, dict]:
    """The model of ``cfg`` with ``checkpoint``'s weights in deploy form
    (CPU, eval) and ``info`` (``checkpoint_form``, ``blocks``)."""
    sd, _ = read_state_dict(checkpoint, unsafe_load)
    deploy_ckpt = is_deploy_state_dict(sd)
    if deploy_ckpt:
        from mmdet.registry import MODELS
        try:
            cfg = make_deploy_config(cfg, MODELS.get)
        except ValueError as e:
            raise ExportError(f'{config_path}: {e}; cannot load the deploy '
                              f'checkpoint {checkpoint}') from None
    model = build_model(cfg)
    load_weights(model, sd, checkpoint, config_path)
    model.eval()
    blocks = count_reparam_blocks(model)
    if not deploy_ckpt:
        model = switch_to_deploy(model, inplace=True, verbose=False)
    counts = count_reparam_blocks(model)
    if counts['deployed'] != counts['total']:
        left = counts['total'] - counts['deployed']
        raise ExportError(f'{checkpoint}: {left} RepVGG block(s) are not in '
                          'deploy form')
    info = dict(checkpoint_form='deploy' if deploy_ckpt else 'training',
                blocks=blocks['total'])
    return model, info

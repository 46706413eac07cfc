"""The deploy-form model that gets exported, from a config and a checkpoint.

A training-form checkpoint is loaded into the model built from the config
and converted with :func:`mmrepvgg.deploy.switch_to_deploy`. A deploy
checkpoint (``conv_reparam`` weights, e.g. from ``tools/convert_deploy.py``;
detected with :func:`~mmrepvgg.apis.convert.is_deploy_state_dict`) is loaded
into the model built from :func:`mmrepvgg.deploy.make_deploy_config` of the
config (every RepVGG module with ``deploy=True``). Either way the load is
strict and safe (``weights_only``) unless ``unsafe_load``.
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
    """Build the model of ``cfg`` with the weights of ``checkpoint`` in
    deploy form (CPU, eval mode).

    Args:
        cfg (Config): the (training or deploy) config.
        config_path (str): its file, for messages.
        checkpoint (str): training-form or deploy checkpoint.
        unsafe_load (bool): unpickle freely (trusted files only).

    Returns:
        tuple[nn.Module, dict]: the model and ``info`` (``checkpoint_form``:
        ``'training'`` or ``'deploy'``, ``blocks``: RepVGG blocks).

    Raises:
        ExportError / ConvertError / CheckpointError: naming the file.
    """
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

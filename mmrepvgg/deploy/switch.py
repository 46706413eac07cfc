"""Model-level switch to the deploy (fused) form."""
import copy
from typing import Optional

import torch.nn as nn
from mmengine.logging import print_log

from mmrepvgg.models.layers.repvgg_block import is_reparam_block


def deepcopy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that shares process groups instead of copying them.

    mmcv's MMSyncBN keeps its ``torch.distributed`` process group as an
    attribute, which cannot be copied; the copy refers to the same group.
    """
    memo = {}
    try:
        from torch.distributed import ProcessGroup
    except ImportError:  # torch built without distributed support
        ProcessGroup = ()
    if ProcessGroup:
        for m in model.modules():
            for value in vars(m).values():
                if isinstance(value, ProcessGroup):
                    memo[id(value)] = value
    return copy.deepcopy(model, memo)


def count_reparam_blocks(model: nn.Module) -> dict:
    """Count re-parameterizable blocks of ``model``.

    A block is what :func:`~mmrepvgg.models.is_reparam_block` accepts
    (RepVGGBlock, QARepVGGBlock and any compatible block).

    Returns:
        dict: ``{'total': n, 'deployed': n_deployed}``.
    """
    total = deployed = 0
    for m in model.modules():
        if is_reparam_block(m):
            total += 1
            deployed += int(m.deploy)
    return dict(total=total, deployed=deployed)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters())


def switch_to_deploy(model: nn.Module,
                     inplace: bool = False,
                     test_cfg: Optional[dict] = None,
                     verbose: bool = True) -> nn.Module:
    """Convert every re-parameterizable submodule of ``model`` to deploy form.

    Every submodule (the model itself included) that has a
    ``switch_to_deploy`` method is switched, so a whole detector (backbone,
    neck and heads built from RepVGG blocks) is converted, not only the
    backbone. The result is put in eval mode.

    Args:
        model (nn.Module): any model.
        inplace (bool): convert ``model`` itself. By default a deep copy is
            converted and ``model`` is left untouched.
        test_cfg (dict, optional): passed to each ``switch_to_deploy``.
        verbose (bool): log how many blocks were converted.

    Returns:
        nn.Module: the converted model (``model`` itself when ``inplace``).
        The number of blocks converted is logged; use
        :func:`count_reparam_blocks` to query it programmatically.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f'model must be a torch.nn.Module, got {type(model).__name__}')
    if not inplace:
        model = deepcopy_model(model)
    model.eval()
    before = count_reparam_blocks(model)['deployed']
    # Parents first; every switch is idempotent, so a backbone that switches
    # its own blocks and the blocks themselves may both be visited.
    for module in list(model.modules()):
        if callable(getattr(module, 'switch_to_deploy', None)):
            module.switch_to_deploy(test_cfg)
    model.eval()
    counts = count_reparam_blocks(model)
    switched = counts['deployed'] - before
    if verbose:
        print_log(
            f'switch_to_deploy: converted {switched} block(s); '
            f'{counts["deployed"]}/{counts["total"]} now in deploy form',
            logger='current')
    return model

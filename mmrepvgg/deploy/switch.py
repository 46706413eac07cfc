"""Model-level switch to the deploy (fused) form."""
import copy
from typing import Optional

import torch.nn as nn
from mmengine.logging import print_log

from mmrepvgg.models.layers.repvgg_block import is_reparam_block


def deepcopy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` sharing process groups (mmcv's MMSyncBN holds one,
    which cannot be copied) instead of copying them."""
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
    """``{'total': n, 'deployed': n_deployed}`` of the re-parameterizable
    blocks of ``model``."""
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
    """Call ``switch_to_deploy(test_cfg)`` of every submodule that has it
    (the model included) on a deep copy, or on ``model`` when ``inplace``;
    return it in eval mode (``verbose``: log the number of blocks)."""
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
    if verbose:
        print_log(
            f'switch_to_deploy: converted {counts["deployed"] - before} '
            f'block(s); {counts["deployed"]}/{counts["total"]} now in deploy '
            'form', logger='current')
    return model

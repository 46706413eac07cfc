"""Distributed training on CPU-only machines with mmengine 0.10."""
import functools

import torch


def allow_cpu_distributed() -> bool:
    """Let mmengine's ``pytorch`` launcher run on a torch without CUDA.

    mmengine 0.10's ``init_dist`` calls ``torch.cuda.set_device(local_rank)``
    unconditionally, which raises on a CPU-only torch build, so ``torchrun``
    with the gloo backend cannot start. When CUDA is unavailable this makes
    ``torch.cuda.set_device`` a no-op (there is no device to select); with
    CUDA nothing changes.

    Returns:
        bool: whether the patch was applied.
    """
    if torch.cuda.is_available():
        return False
    original = torch.cuda.set_device
    if getattr(original, '_mmrepvgg_cpu_noop', False):
        return True

    @functools.wraps(original)
    def set_device(device) -> None:
        return None

    set_device._mmrepvgg_cpu_noop = True
    torch.cuda.set_device = set_device
    return True


def cpu_model_wrapper_cfg(cfg) -> None:
    """Give a CPU-only distributed run a DDP wrapper without device ids.

    mmengine's runner wraps the model as ``MMDistributedDataParallel(
    device_ids=[LOCAL_RANK])``, which torch rejects for CPU modules. A config
    without ``model_wrapper_cfg`` gets one with ``device_ids=None`` when CUDA
    is unavailable; a config that sets its own is left alone.
    """
    if torch.cuda.is_available() or cfg.get('model_wrapper_cfg') is not None:
        return
    cfg.model_wrapper_cfg = dict(
        type='MMDistributedDataParallel',
        device_ids=None,
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))

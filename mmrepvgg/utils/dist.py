"""Distributed training on CPU-only machines with mmengine 0.10."""
import functools
import logging
import sys
from typing import NoReturn, Optional, Sequence

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


def torchrun_main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """``torchrun`` (``python -m torch.distributed.run``), quiet on failure.

    torchrun reports a failed worker with log lines, a ``ChildFailedError``
    traceback and a table, after the worker itself has printed its one
    ``error: ...`` line. This runs the same launcher with the elastic
    agent's log quiet below CRITICAL and exits with the first failed
    worker's exit code instead (130 when the launcher itself is
    interrupted); a worker killed by signal N (which could print nothing)
    is reported as one ``error:`` line, exit 128 + N.
    ``tools/dist_train.sh`` and ``tools/dist_test.sh`` start it with
    ``runpy`` (this file imports only torch, not the package).

    Args:
        argv: torchrun's arguments (default ``sys.argv[1:]``).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import \
        ChildFailedError
    from torch.distributed.run import parse_args, run
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.getLogger('torch.distributed.elastic').setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code < 0:
            print(f'error: worker rank {rank} (pid {failure.pid}) was killed '
                  f'by {failure.signal_name()}', file=sys.stderr)
            sys.exit(128 - code)
        sys.exit(code or 1)
    except SignalException as e:
        sys.exit(128 + int(e.sigval))
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)

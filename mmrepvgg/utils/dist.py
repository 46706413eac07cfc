"""Distributed training on CPU-only machines with mmengine 0.10."""
import logging
import sys
from typing import NoReturn, Optional, Sequence

import torch


def allow_cpu_distributed() -> bool:
    """Let mmengine's ``pytorch`` launcher run on a torch without CUDA:
    mmengine 0.10's ``init_dist`` calls ``torch.cuda.set_device``, which
    raises there; without CUDA it becomes a no-op. Returns whether it is."""
    if torch.cuda.is_available():
        return False
    torch.cuda.set_device = _no_device_to_set
    return True


def _no_device_to_set(device) -> None:
    return None


def cpu_model_wrapper_cfg(cfg) -> None:
    """Without CUDA, give a config without ``model_wrapper_cfg`` a DDP
    wrapper with ``device_ids=None`` (mmengine's default passes
    ``[LOCAL_RANK]``, which torch rejects for CPU modules)."""
    if torch.cuda.is_available() or cfg.get('model_wrapper_cfg') is not None:
        return
    cfg.model_wrapper_cfg = dict(
        type='MMDistributedDataParallel',
        device_ids=None,
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))


def torchrun_main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """``torchrun`` on ``argv`` without its log, traceback and table after
    a worker's own ``error:`` line: the first failed worker's exit code (one
    line and 128 + N if signal N killed it). Run by path by
    ``tools/dist_*.sh``."""
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

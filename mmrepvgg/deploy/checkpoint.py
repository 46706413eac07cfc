"""Safe checkpoint I/O.

torch >= 2.6 loads with ``weights_only=True`` by default, which refuses the
objects mmengine's runner pickles into its checkpoints (``HistoryBuffer`` in
``message_hub``, numpy arrays, scalars and dtypes in ``meta``). Rather than
unpickling arbitrary code, :func:`register_safe_globals` allowlists exactly
those globals (``torch.serialization.add_safe_globals``); everything else is
still refused, with the offending global named in the error.
"""
import os
import os.path as osp
import pickle
import tempfile
from typing import Any, Callable, List, Optional

import torch

from mmrepvgg.utils.cli import ToolError
from mmrepvgg.utils.fileio import atomic_write


class CheckpointError(ToolError, RuntimeError):
    """A checkpoint file that cannot be read (message names the file)."""


def _numpy_globals() -> List[Any]:
    import numpy as np
    out: List[Any] = [np.ndarray, np.dtype]
    # Array and scalar reconstruction helpers, under the numpy 2 name
    # (numpy._core) and the numpy 1 name (numpy.core), whichever exist.
    for modname in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        try:
            mod = __import__(modname, fromlist=['_reconstruct'])
        except ImportError:
            continue
        for name in ('_reconstruct', 'scalar'):
            fn = getattr(mod, name, None)
            if fn is not None:
                out.append((fn, f'{modname}.{name}'))
    # dtype classes (numpy >= 1.25 pickles dtypes as numpy.dtypes.XDType).
    dtypes = getattr(np, 'dtypes', None)
    scalar_types = [np.bool_, np.int8, np.int16, np.int32, np.int64,
                    np.uint8, np.uint16, np.uint32, np.uint64, np.float16,
                    np.float32, np.float64, np.complex64, np.complex128]
    out.extend(scalar_types)
    if dtypes is not None:
        for t in scalar_types:
            dt = type(np.dtype(t))
            if dt is not np.dtype:
                out.append(dt)
    return out


#: HistoryBuffer's built-in statistics (registered lazily by mmengine).
_HISTORY_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """Stand-in for ``builtins.getattr`` while unpickling.

    mmengine pickles ``HistoryBuffer`` statistics methods (``min``, ``max``,
    ``mean``, ``current`` and registered ones) as ``getattr(HistoryBuffer,
    'min')``. Only that is allowed; any other use is refused, so the
    allowlisted name cannot reach arbitrary attributes.
    """
    from mmengine.logging import HistoryBuffer
    if ((obj is HistoryBuffer or type(obj) is HistoryBuffer)
            and isinstance(name, str)
            and name in _HISTORY_STATISTICS + tuple(
                HistoryBuffer._statistics_methods)):
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'Unsupported global: GLOBAL builtins.getattr on '
        f'{obj!r}.{name} (only HistoryBuffer statistics '
        f'methods are allowed)')


def _mmengine_globals() -> List[Any]:
    from mmengine.logging import HistoryBuffer
    # Protocol-2 pickles (torch.save's default) name it __builtin__.getattr.
    return [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr'),
            (_history_buffer_getattr, '__builtin__.getattr')]


def safe_globals() -> List[Any]:
    """The exact list of extra globals mmengine checkpoints need."""
    return _numpy_globals() + _mmengine_globals()


_REGISTERED = False


def register_safe_globals() -> None:
    """Allowlist :func:`safe_globals` for ``torch.load(weights_only=True)``.

    Called by ``import mmrepvgg``; idempotent; a no-op on torch without
    ``add_safe_globals`` (< 2.4), where ``weights_only`` is not the default.
    """
    global _REGISTERED
    if _REGISTERED or not hasattr(torch.serialization, 'add_safe_globals'):
        return
    torch.serialization.add_safe_globals(safe_globals())
    _REGISTERED = True


def load_checkpoint(path: str,
                    map_location: Any = 'cpu',
                    unsafe: bool = False) -> Any:
    """Load a checkpoint file with ``weights_only=True`` (the safe default).

    Args:
        path (str): checkpoint file.
        map_location: passed to ``torch.load``. Defaults to 'cpu'.
        unsafe (bool): unpickle arbitrary objects (``weights_only=False``).
            Only for files you trust: a malicious pickle runs code.

    Raises:
        CheckpointError: the file is missing, not a torch checkpoint,
            truncated, or needs a global outside the allowlist (named).
    """
    register_safe_globals()
    if not osp.isfile(path):
        raise CheckpointError(f'{path}: no such checkpoint file')
    if osp.getsize(path) == 0:
        raise CheckpointError(f'{path}: empty file, not a checkpoint')
    try:
        return torch.load(path, map_location=map_location,
                          weights_only=not unsafe)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if 'weights_only' in msg or 'Unsupported global' in msg:
            glob = _unsupported_global(msg)
            raise CheckpointError(
                f'{path}: refused to unpickle {glob or "an object"} that is '
                'not on the safe allowlist (weights_only=True); pass '
                '--unsafe-load only if you trust this file') from None
        raise CheckpointError(
            f'{path}: not a valid checkpoint ({_first_line(msg)})') from None
    except Exception as e:  # the unpickler raises many types on garbage
        raise CheckpointError(
            f'{path}: not a valid checkpoint, truncated or corrupt '
            f'({type(e).__name__}: {_first_line(str(e))})') from None


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else ''


def _unsupported_global(msg: str) -> Optional[str]:
    # torch: "Unsupported global: GLOBAL os.system was not an allowed global"
    for line in msg.splitlines():
        if 'GLOBAL ' in line:
            rest = line.split('GLOBAL ', 1)[1].split()
            if rest:
                return f'global {rest[0]}'
        if 'Unsupported operand' in line or 'Unsupported class' in line:
            return line.strip()
    return None


def save_checkpoint(obj: Any, path: str) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))

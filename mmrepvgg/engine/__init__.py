from .hooks import (AtomicCheckpointHook, SwitchToDeployHook,
                    write_last_checkpoint)

#: Names of :mod:`mmrepvgg.engine.resume` (which loads checkpoints),
#: imported on first use (PEP 562): ``import mmrepvgg`` registers the hooks
#: without loading any checkpoint code.
_RESUME_NAMES = ('check_checkpoint', 'find_resume_checkpoint',
                 'resume_candidates')


def __getattr__(name: str):
    if name in _RESUME_NAMES:
        from . import resume
        return getattr(resume, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'AtomicCheckpointHook', 'SwitchToDeployHook', 'write_last_checkpoint',
    *_RESUME_NAMES
]

from .hooks import AtomicCheckpointHook, SwitchToDeployHook  # noqa: F401


def __getattr__(name: str):
    # engine.resume loads checkpoints: imported on first use (PEP 562).
    if name in ('check_checkpoint', 'find_resume_checkpoint'):
        from . import resume
        return getattr(resume, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

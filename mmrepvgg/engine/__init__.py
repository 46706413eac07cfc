from .hooks import (AtomicCheckpointHook, SwitchToDeployHook,
                    write_last_checkpoint)
from .resume import (check_checkpoint, find_resume_checkpoint,
                     resume_candidates)

__all__ = [
    'AtomicCheckpointHook', 'SwitchToDeployHook', 'write_last_checkpoint',
    'check_checkpoint', 'find_resume_checkpoint', 'resume_candidates'
]

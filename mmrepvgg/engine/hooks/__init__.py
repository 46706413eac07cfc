from .atomic_checkpoint_hook import AtomicCheckpointHook, write_last_checkpoint
from .switch_to_deploy_hook import SwitchToDeployHook

__all__ = ['AtomicCheckpointHook', 'SwitchToDeployHook',
           'write_last_checkpoint']

from .atomic_checkpoint_hook import AtomicCheckpointHook  # noqa: F401
from .switch_to_deploy_hook import SwitchToDeployHook  # noqa: F401

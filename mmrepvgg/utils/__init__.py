from .cli import ToolError, run_cli
from .dist import allow_cpu_distributed, cpu_model_wrapper_cfg

__all__ = [
    'ToolError', 'run_cli', 'allow_cpu_distributed', 'cpu_model_wrapper_cfg'
]

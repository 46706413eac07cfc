from .cli import (CfgOptionsAction, ToolArgumentParser, ToolError,
                  merge_cfg_options, run_cli)
from .dist import allow_cpu_distributed, cpu_model_wrapper_cfg

__all__ = [
    'CfgOptionsAction', 'ToolArgumentParser', 'ToolError',
    'merge_cfg_options', 'run_cli', 'allow_cpu_distributed',
    'cpu_model_wrapper_cfg'
]

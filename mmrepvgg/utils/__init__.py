from .dist import allow_cpu_distributed, cpu_model_wrapper_cfg  # noqa: F401

"""Peak activation memory of one forward.

On CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated
before the forward (weights and input excluded). On CPU one forward runs
under ``torch.profiler`` with ``profile_memory=True``; the profiler records
every allocation and free of PyTorch's CPU allocator (``[memory]`` events
with a signed byte count); the peak is the maximum of their running sum in
time order. It counts every tensor the forward allocates (activations,
outputs, im2col/reorder buffers made through PyTorch's allocator), not the
weights nor the input; buffers that oneDNN allocates internally, outside
PyTorch's allocator, are not seen. onnxruntime forms are not measured (their
arena is invisible to both methods).
"""
import os
import sys
from contextlib import contextmanager
from typing import Callable, Sequence, Tuple

import torch


@contextmanager
def _quiet_native_stderr():
    """Silence the profiler's native start/stop lines on file descriptor 2
    (Python's own ``sys.stderr`` writes are flushed first and unaffected
    afterwards)."""
    try:
        sys.stderr.flush()
        fd = sys.__stderr__.fileno()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def peak_from_memory_events(events: Sequence[Tuple[int, int]]) -> int:
    """Peak of the running sum of ``(time, signed bytes)`` events."""
    peak = running = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_activation_bytes(fn: Callable, x: torch.Tensor) -> int:
    """Peak bytes allocated by one forward ``fn(x)`` under inference mode
    (see the module docstring for the method on CPU and CUDA)."""
    if x.device.type == 'cuda':
        with torch.inference_mode():
            torch.cuda.synchronize(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            base = torch.cuda.memory_allocated(x.device)
            out = fn(x)
            torch.cuda.synchronize(x.device)
            peak = torch.cuda.max_memory_allocated(x.device) - base
            del out
        return max(0, peak)
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode(), _quiet_native_stderr():
        with profile(activities=[ProfilerActivity.CPU],
                     profile_memory=True) as prof:
            out = fn(x)
            del out
    events = [(e.start_ns(), e.nbytes())
              for e in prof.profiler.kineto_results.events()
              if e.name() == '[memory]' and e.device_type().name == 'CPU']
    return peak_from_memory_events(events)

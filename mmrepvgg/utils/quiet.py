"""Entry-point hygiene for the command-line tools (standard library only).

This file must stay importable without torch, mmengine or mmcv, and without
the rest of the package: a tool runs it *before* importing anything heavy, so
that

- the ``pkg_resources is deprecated`` warnings that mmengine and mmcv
  trigger when they import ``pkg_resources`` are not printed (an error is
  then really one line on stderr);
- Ctrl-C while the tool imports torch/mmdet, or while it exits, prints one
  ``error: interrupted`` line and exits 130 instead of a traceback or a
  death by signal (:func:`run_tool` ends the process itself once the exit
  functions ran, before Python's teardown restores SIGINT's default).

Because ``import mmrepvgg.utils.quiet`` would first run the package's
``__init__`` (which imports torch and mmdet), a tool runs this file by path
from its ``__main__`` block (see :func:`run_tool`), and keeps every heavy
import inside functions.

While the tool's body runs, :func:`mmrepvgg.utils.cli.run_cli` (which takes
:func:`process_rank` and :data:`INTERRUPT_EXIT_CODE` from here) switches
Ctrl-C back to Python's ``KeyboardInterrupt`` (so partial outputs are cleaned
up) and restores the handler installed here afterwards, for the exit phase.
"""
import atexit
import os
import signal
import sys
import threading
import warnings

#: Warnings silenced at the entry points: setuptools' deprecation of the
#: ``pkg_resources`` API, triggered when mmengine/mmcv import it.
QUIET_WARNINGS = (
    (r'pkg_resources is deprecated', UserWarning),
    (r'Deprecated call to `pkg_resources', DeprecationWarning),
    # mmdet's ATSSHead reads its own deprecated attribute: not the user's
    (r'DeprecationWarning: `num_anchors` is deprecated', UserWarning),
)

#: Exit status of a tool stopped by Ctrl-C (128 + SIGINT), as shells report.
INTERRUPT_EXIT_CODE = 130


def process_rank() -> int:
    """This process's rank under a distributed launcher (torchrun, slurm,
    mpi: the ``RANK`` variable); 0 for a single process or an unreadable
    value."""
    try:
        return int(os.environ.get('RANK', '0') or 0)
    except ValueError:
        return 0


def silence_warnings() -> None:
    """Ignore :data:`QUIET_WARNINGS` (only those: other warnings still show).

    Must run before the first ``import pkg_resources``; idempotent.
    """
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings('ignore', message=message, category=category)


def _exit_now(code: int, message: str = '') -> None:
    """Write ``message`` to stderr, flush both streams (``os._exit`` does
    not) and end the process with ``code``, skipping Python's teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if message and stream is sys.stderr:
                stream.write(message)
            stream.flush()
        except Exception:  # a closed stream: still exit with the right code
            pass
    os._exit(code)


def _exit_interrupted(signum=None, frame=None) -> None:
    """SIGINT handler outside a tool's body: one line, exit 130 at once."""
    _exit_now(INTERRUPT_EXIT_CODE,
              'error: interrupted\n' if process_rank() == 0 else '')


def exit_on_interrupt() -> bool:
    """Make Ctrl-C print ``error: interrupted`` and exit 130, no traceback.

    Only from the main thread of the main interpreter (where signal handlers
    can be installed); returns whether the handler was installed. Meant for
    the import and exit phases of a tool, where there is nothing to clean up.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGINT, _exit_interrupted)
    return True


def run_tool(main, exit_on_ctrl_c: bool = True) -> None:
    """Run a tool as a program: quiet start, then ``sys.exit(main())``.

    A tool calls it from its ``__main__`` block, found without importing
    the package (whose ``__init__`` imports torch and mmdet)::

        if __name__ == '__main__':  # stdlib-only quiet start
            pkg = importlib.util.find_spec('mmrepvgg')
            runpy.run_path(osp.join(pkg.submodule_search_locations[0],
                                    'utils', 'quiet.py'))['run_tool'](main)

    Args:
        main: the tool's ``main()``, returning its exit code.
        exit_on_ctrl_c (bool): also :func:`exit_on_interrupt` (a tool that
            handles Ctrl-C itself passes False).
    """
    silence_warnings()
    if not exit_on_ctrl_c or process_rank():
        # Other ranks of a torchrun leave at Python's pace: when one of them
        # ends first, torchrun stops the rest, and rank 0 may not yet have
        # printed the refusal that only it reports.
        if exit_on_ctrl_c:
            exit_on_interrupt()
        sys.exit(main())
    exit_on_interrupt()
    try:
        code = main()
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    # Exit as the interpreter would (non-daemon threads, atexit, flushed
    # streams) with the handler still installed, then at once: Python's
    # finalization restores SIGINT's default action before tearing down
    # torch and mmdet, and a Ctrl-C there killed the tool by signal.
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    _exit_now(code or 0)

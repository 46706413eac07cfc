"""A tool's first statements, standard library only and run by path before
anything heavy is imported (:func:`run_tool`): mmengine's and mmcv's
``pkg_resources`` warnings are silenced, and Ctrl-C while importing or
exiting prints one line and exits 130 (during the body,
:func:`mmrepvgg.utils.cli.run_cli` makes it a ``KeyboardInterrupt``).
"""
import atexit
import os
import signal
import sys
import threading
import warnings

#: Warnings silenced at the entry points.
QUIET_WARNINGS = (
    (r'pkg_resources is deprecated', UserWarning),
    (r'Deprecated call to `pkg_resources', DeprecationWarning),
    # mmdet's ATSSHead reads its own deprecated attribute: not the user's
    (r'DeprecationWarning: `num_anchors` is deprecated', UserWarning),
)

#: Exit status of a tool stopped by Ctrl-C (128 + SIGINT), as shells report.
INTERRUPT_EXIT_CODE = 130


def process_rank() -> int:
    """The ``RANK`` of a distributed launcher; 0 for a single process or an
    unreadable value."""
    try:
        return int(os.environ.get('RANK', '0') or 0)
    except ValueError:
        return 0


def _exit_now(code: int, message: str = '') -> None:
    """Write ``message`` to stderr, flush both streams (``os._exit`` does
    not) and end the process, skipping Python's teardown."""
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


def exit_on_interrupt() -> None:
    """Make Ctrl-C print ``error: interrupted`` and exit 130 (from the main
    thread, where handlers can be installed)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_interrupted)


def run_tool(main, exit_on_ctrl_c: bool = True) -> None:
    """Run a tool's ``main()`` as a program (``exit_on_ctrl_c=False`` for a
    tool that handles Ctrl-C itself)::

        if __name__ == '__main__':  # stdlib-only quiet start
            pkg = importlib.util.find_spec('mmrepvgg')
            runpy.run_path(osp.join(pkg.submodule_search_locations[0],
                                    'utils', 'quiet.py'))['run_tool'](main)
    """
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings('ignore', message=message, category=category)
    if not exit_on_ctrl_c or process_rank():
        # Other ranks leave at Python's pace: torchrun stops the rest when
        # one ends, and rank 0 may not yet have printed its refusal.
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
    # Exit as the interpreter would, then at once: finalization restores
    # SIGINT's default action before tearing down torch and mmdet, and a
    # Ctrl-C there killed the tool by signal. threading._shutdown is the
    # interpreter's own first exit step: it runs the threading exit hooks
    # (a ThreadPoolExecutor's, which OpenVINO's telemetry leaves behind)
    # before it joins the threads; a bare join of those waited forever.
    threading._shutdown()
    atexit._run_exitfuncs()
    _exit_now(code or 0)

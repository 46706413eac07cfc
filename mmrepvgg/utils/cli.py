"""The error contract shared by the command-line tools.

A tool refuses bad input with one ``error: ...`` line on stderr and a
non-zero exit code, never a traceback (``--debug`` shows it):

- :func:`run_cli` runs a tool's body: a :class:`ToolError` or any other
  exception becomes one line and exit 1, Ctrl-C exit 130;
- :class:`ToolArgumentParser` reports argument errors as one line, exit 2;
- :class:`CfgOptionsAction` is ``--cfg-options`` (mmengine's ``DictAction``)
  with a malformed item reported as ``error: --cfg-options: ...``, exit 2.

Under ``torchrun`` every rank runs the tool: refused input (identical on
every rank) is reported by rank 0 only; an unexpected error of another rank
is reported with its rank.
"""
import argparse
import signal
import sys
import threading
from typing import Callable, Iterable, NoReturn, Optional

from .quiet import INTERRUPT_EXIT_CODE, process_rank


class ToolError(Exception):
    """A refused input; its message names the file, key or argument at fault
    and is printed as the tool's single ``error: ...`` line."""


#: Exit status of a command line that cannot be parsed (as argparse's).
USAGE_EXIT_CODE = 2


def _one_line(text: str) -> str:
    return ' '.join(text.split())


def preview(items: Iterable, n: int = 6) -> str:
    """The first ``n`` of ``items`` for a one-line message:
    ``'a, b, c ... (+4 more)'``."""
    items = [str(k) for k in items]
    more = f' ... (+{len(items) - n} more)' if len(items) > n else ''
    return ', '.join(items[:n]) + more


def error_message(e: BaseException) -> str:
    """The ``error: ...`` text for ``e`` (without the prefix): a
    :class:`ToolError`'s message on one line, otherwise ``Type: first line``.
    """
    text = str(e)
    if isinstance(e, ToolError):
        return _one_line(text)
    first = text.strip().splitlines()[0] if text.strip() else ''
    return f'{type(e).__name__}: {first}' if first else type(e).__name__


class _KeyboardInterruptAsException:
    """Context: Ctrl-C raises ``KeyboardInterrupt`` inside (so ``finally``
    blocks and atomic writes clean up), whatever handler was installed
    around it (:mod:`mmrepvgg.utils.quiet` exits at once); restored after."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def run_cli(body: Callable[[], int],
            debug: bool = False,
            interrupted: str = 'interrupted; no output written') -> int:
    """Run a tool's ``body`` and turn failures into one line and an exit code.

    Args:
        body: the tool's work; returns the exit code.
        debug (bool): re-raise exceptions, with the traceback.
        interrupted (str): the message printed on Ctrl-C.

    Returns:
        int: ``body()``'s code; on an exception prints ``error: <message>``
        to stderr (see :func:`error_message`) and returns 1, or 130 on
        Ctrl-C. Under a distributed launcher, ranks other than 0 stay silent
        on a :class:`ToolError` or Ctrl-C and prefix other errors with their
        rank. The torch thread count is restored, since tools set it and
        tests call them in-process.
    """
    import torch
    threads = torch.get_num_threads()
    rank = process_rank()
    try:
        with _KeyboardInterruptAsException():
            return body()
    except KeyboardInterrupt:
        if rank == 0:
            print(f'error: {interrupted}', file=sys.stderr)
        return INTERRUPT_EXIT_CODE
    except Exception as e:
        if debug:
            raise
        if isinstance(e, ToolError):
            if rank == 0:
                print(f'error: {error_message(e)}', file=sys.stderr)
        else:
            where = f'[rank {rank}] ' if rank else ''
            print(f'error: {where}{error_message(e)} (--debug shows the '
                  'traceback)', file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)


def tool_main(parse_args: Callable, run: Callable, argv=None) -> int:
    """A tool's ``main(argv)``: ``run(parse_args(argv))`` under
    :func:`run_cli`, with the tool's ``--debug``."""
    args = parse_args(argv)
    return run_cli(lambda: run(args), debug=args.debug)


class ToolArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line,
    ``error: <what>`` (exit 2), like every other refusal of the tools;
    ``--help`` still prints the usage."""

    def error(self, message: str) -> NoReturn:
        _exit_usage(f'{message} (see --help)')


def _exit_usage(message: str) -> NoReturn:
    if process_rank() == 0:
        sys.stderr.write(f'error: {_one_line(message)}\n')
    sys.exit(USAGE_EXIT_CODE)


class CfgOptionsAction(argparse.Action):
    """``--cfg-options key=value ...`` as mmengine's ``DictAction`` parses it
    (values ``1``, ``1.5``, ``True``, ``None``, ``[a,b]``, ``(1,2)``,
    ``a,b``), but a malformed item exits 2 with one line,
    ``error: --cfg-options: ...``, instead of a ``ValueError`` traceback.

    Use it as ``parser.add_argument('--cfg-options', nargs='+',
    action=CfgOptionsAction, help=...)``. The parsed value is a ``dict``
    (merge it with :func:`merge_cfg_options` to report bad keys alike).
    """

    def __call__(self, parser, namespace, values, option_string=None):
        from mmengine.config import DictAction
        opt = option_string or '--cfg-options'
        values = [values] if isinstance(values, str) else list(values or [])
        options = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            key, sep, raw = item.partition('=')
            if not sep or not key.strip():
                _exit_usage(f'{opt}: {item!r} is not key=value')
            if any(not part for part in key.split('.')):
                _exit_usage(f'{opt}: {item!r}: empty key component')
            if raw.count('[') != raw.count(']') or \
                    raw.count('(') != raw.count(')'):
                _exit_usage(f'{opt}: {item!r}: unbalanced brackets')
            try:
                options[key] = DictAction._parse_iterable(raw)
            except Exception as e:  # asserts and ValueErrors of the parser
                _exit_usage(f'{opt}: cannot parse {item!r} '
                            f'({error_message(e)})')
        setattr(namespace, self.dest, options)


def merge_cfg_options(cfg, options: Optional[dict]) -> None:
    """``cfg.merge_from_dict(options)``, a failure raised as a
    :class:`ToolError` naming ``--cfg-options`` and the key."""
    if not options:
        return
    for key, value in options.items():
        try:
            cfg.merge_from_dict({key: value})
        except Exception as e:
            raise ToolError(f'--cfg-options: cannot set {key}={value!r} '
                            f'({error_message(e)})') from None


UNSAFE_LOAD_HELP = ('unpickle checkpoints with weights_only=False: ONLY for '
                    'files you trust (a malicious checkpoint can run code)')


def add_cli_args(parser, unsafe_load: bool = True,
                 cfg_options: bool = False):
    """The ``--unsafe-load`` and ``--debug`` flags every tool shares, and
    ``--cfg-options`` (:class:`CfgOptionsAction`) for tools that read a
    config."""
    if cfg_options:
        parser.add_argument('--cfg-options', nargs='+',
                            action=CfgOptionsAction,
                            help='override settings in the config, '
                            'key=value (see mmdet)')
    if unsafe_load:
        parser.add_argument('--unsafe-load', action='store_true',
                            help=UNSAFE_LOAD_HELP)
    parser.add_argument('--debug', action='store_true',
                        help='show the full traceback on errors')

"""The tools' error contract: bad input is refused with one ``error: ...``
line on stderr and a non-zero exit (1; 2 for usage errors, as argparse;
130 on Ctrl-C), never a traceback unless ``--debug``. Under ``torchrun``
refusals (identical on every rank) are reported by rank 0 only.
"""
import argparse
import contextlib
import signal
import sys
import threading
from typing import Callable, Iterable, NoReturn, Optional

from .quiet import INTERRUPT_EXIT_CODE, process_rank


class ToolError(Exception):
    """A refused input; its message names the file, key or argument at
    fault."""


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
    """``e`` for an ``error:`` line: a :class:`ToolError`'s message on one
    line, otherwise ``Type: first line``."""
    text = str(e)
    if isinstance(e, ToolError):
        return _one_line(text)
    first = text.strip().splitlines()[0] if text.strip() else ''
    return f'{type(e).__name__}: {first}' if first else type(e).__name__


@contextlib.contextmanager
def _keyboard_interrupt():
    """Ctrl-C raises ``KeyboardInterrupt`` inside (so that atomic writes
    clean up), whatever handler is installed around it (quiet.py's exits at
    once); restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is not None:  # None: not installed from Python
            signal.signal(signal.SIGINT, previous)


def run_cli(body: Callable[[], int],
            debug: bool = False,
            interrupted: str = 'interrupted; no output written') -> int:
    """``body()``'s exit code, or 1 after one ``error:`` line (the
    exception re-raised with ``debug``), 130 on Ctrl-C; only rank 0 reports
    refusals. The torch thread count is restored (tests run tools
    in-process)."""
    import torch
    threads = torch.get_num_threads()
    rank = process_rank()
    try:
        with _keyboard_interrupt():
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
    """``argparse.ArgumentParser`` whose usage errors are one ``error:``
    line, exit 2."""

    def error(self, message: str) -> NoReturn:
        _exit_usage(f'{message} (see --help)')


def _exit_usage(message: str) -> NoReturn:
    if process_rank() == 0:
        sys.stderr.write(f'error: {_one_line(message)}\n')
    sys.exit(USAGE_EXIT_CODE)


class CfgOptionsAction(argparse.Action):
    """``--cfg-options key=value ...`` parsed as mmengine's ``DictAction``
    does, into a dict, but a malformed item exits 2 with one line."""

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
    for key, value in (options or {}).items():
        try:
            cfg.merge_from_dict({key: value})
        except Exception as e:
            raise ToolError(f'--cfg-options: cannot set {key}={value!r} '
                            f'({error_message(e)})') from None


def add_cli_args(parser, unsafe_load: bool = True,
                 cfg_options: bool = False):
    """The tools' shared ``--unsafe-load`` and ``--debug`` flags, and
    ``--cfg-options`` for tools that read a config."""
    if cfg_options:
        parser.add_argument('--cfg-options', nargs='+',
                            action=CfgOptionsAction,
                            help='override settings in the config, '
                            'key=value (see mmdet)')
    if unsafe_load:
        parser.add_argument(
            '--unsafe-load', action='store_true',
            help='unpickle checkpoints with weights_only=False: ONLY for '
            'files you trust (a malicious checkpoint can run code)')
    parser.add_argument('--debug', action='store_true',
                        help='show the full traceback on errors')

"""The error contract shared by the command-line tools."""
import sys
from typing import Callable


class ToolError(Exception):
    """A refused input; its message names the file, key or argument at fault
    and is printed as the tool's single ``error: ...`` line."""


def run_cli(body: Callable[[], int], debug: bool = False) -> int:
    """Run a tool's ``body`` and turn failures into one line and an exit code.

    Returns ``body()``'s code; on an exception prints ``error: <message>``
    to stderr (a :class:`ToolError`'s message as is, anything else prefixed
    with its type) and returns 1, or 130 on Ctrl-C. ``debug`` re-raises
    instead, with the traceback. The torch thread count is restored, since
    tools set it and tests call them in-process.
    """
    import torch
    threads = torch.get_num_threads()
    try:
        return body()
    except KeyboardInterrupt:
        print('error: interrupted; no output written', file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        text = str(e)
        if isinstance(e, ToolError):
            msg = ' '.join(text.split())
        else:
            first = text.strip().splitlines()[0] if text.strip() else ''
            msg = f'{type(e).__name__}: {first}' if first \
                else type(e).__name__
        print(f'error: {msg}', file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)


UNSAFE_LOAD_HELP = ('unpickle checkpoints with weights_only=False: ONLY for '
                    'files you trust (a malicious checkpoint can run code)')


def add_cli_args(parser, unsafe_load: bool = True, debug: bool = True):
    """The ``--unsafe-load`` and ``--debug`` flags every tool shares."""
    if unsafe_load:
        parser.add_argument('--unsafe-load', action='store_true',
                            help=UNSAFE_LOAD_HELP)
    if debug:
        parser.add_argument('--debug', action='store_true',
                            help='show the full traceback on errors')

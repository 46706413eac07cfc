"""A restricted unpickler for torch checkpoints: it reads data, never code.

Unlike ``torch.load(weights_only=True)``, it calls nothing a pickle names:
it interprets the protocol-2 opcodes ``torch.save`` writes, each allowed
global being a token of :mod:`mmrepvgg.deploy.pickle_types`, within bounds
on work, opcodes, depth and size (docs/safe_loading.md).
"""
import collections
import io
import pickletools
import re
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch

from mmrepvgg.deploy.pickle_types import (HISTORY, VIEW_SLACK_BYTES,
                                          Pending, Refused, Storage,
                                          StorageType, Token, allowed_globals,
                                          build_ordered_dict, check_item,
                                          check_key, int_in_range, short)

#: Nesting depth of containers in a loaded checkpoint.
MAX_DEPTH = 100
#: Nodes of the result with shared references unfolded.
MAX_NODES = 1 << 24
#: Pickle opcodes run (a large checkpoint needs a few hundred thousand).
MAX_OPS = 1 << 22

StorageLoader = Callable[[str, torch.dtype, int], torch.Tensor]

_GLOBALS: Dict[Tuple[str, str], Any] = {}


def unpickle(data: bytes, storage: StorageLoader) -> Any:
    """Load a checkpoint's ``data.pkl``; ``storage(key, dtype, numel)`` is
    the flat tensor of the record ``data/<key>``. Raises :class:`Refused`,
    or ``ValueError`` for a truncated or malformed pickle."""
    if not _GLOBALS:
        _GLOBALS.update(allowed_globals())
    stack: List[Any] = []
    marks: List[int] = []
    memo: Dict[int, Any] = {}
    storages: Dict[str, Storage] = {}
    budget = [VIEW_SLACK_BYTES]  # bytes tensor views may still cover
    ops = 0

    def pop_mark() -> List[Any]:
        if not marks:
            raise Refused('MARK missing')
        k = marks.pop()
        items = stack[k:]
        del stack[k:]
        return items

    def top(kind: type) -> Any:
        if not stack or type(stack[-1]) is not kind and not (
                kind is dict and type(stack[-1]) is collections.OrderedDict):
            raise Refused(f'expected a {kind.__name__} on the stack')
        return stack[-1]

    def set_items(d: dict, items: List[Any]) -> None:
        if len(items) % 2:
            raise Refused('odd number of SETITEMS items')
        for k, v in zip(items[::2], items[1::2]):
            check_key(k)
            d[k] = check_item(v)

    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        name = op.name
        ops += 1
        if ops > MAX_OPS:
            raise Refused(f'more than {MAX_OPS} pickle operations')
        if name == 'PROTO':
            if arg > 2:
                raise Refused(f'pickle protocol {arg}: torch.save writes 2')
        elif name == 'STOP':
            if len(stack) != 1 or marks:
                raise Refused('stack not empty at STOP')
            result = stack.pop()
            _check_graph(result)
            return result
        elif name == 'MARK':
            marks.append(len(stack))
        elif name == 'EMPTY_DICT':
            stack.append({})
        elif name == 'EMPTY_LIST':
            stack.append([])
        elif name == 'EMPTY_TUPLE':
            stack.append(())
        elif name in ('NONE', 'NEWTRUE', 'NEWFALSE', 'BININT', 'BININT1',
                      'BININT2', 'LONG1', 'BINFLOAT', 'BINUNICODE'):
            stack.append({'NONE': None, 'NEWTRUE': True,
                          'NEWFALSE': False}.get(name, arg))
        elif name == 'TUPLE':
            stack.append(tuple(pop_mark()))
        elif name in ('TUPLE1', 'TUPLE2', 'TUPLE3'):
            n = int(name[-1])
            if len(stack) - (marks[-1] if marks else 0) < n:
                raise Refused(f'{name} on a short stack')
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name in ('BINPUT', 'LONG_BINPUT'):
            if not stack:
                raise Refused('PUT on an empty stack')
            memo[arg] = stack[-1]
            if isinstance(stack[-1], Pending):
                stack[-1].memo_keys.append(arg)
        elif name in ('BINGET', 'LONG_BINGET'):
            if arg not in memo:
                raise Refused(f'memo entry {arg} missing')
            stack.append(memo[arg])
        elif name == 'SETITEM':
            if len(stack) < 3:
                raise Refused('SETITEM on a short stack')
            value, key = stack.pop(), stack.pop()
            set_items(top(dict), [key, value])
        elif name == 'SETITEMS':
            items = pop_mark()
            set_items(top(dict), items)
        elif name == 'APPEND':
            if len(stack) < 2:
                raise Refused('APPEND on a short stack')
            value = check_item(stack.pop())
            top(list).append(value)
        elif name == 'APPENDS':
            items = pop_mark()
            top(list).extend(check_item(v) for v in items)
        elif name == 'GLOBAL':
            module, _, attr = arg.partition(' ')
            if (module, attr) not in _GLOBALS:
                raise Refused(f'global {module}.{attr}', True)
            stack.append(_GLOBALS[module, attr])
        elif name in ('REDUCE', 'NEWOBJ'):
            if len(stack) < 2:
                raise Refused(f'{name} on a short stack')
            args, fn = stack.pop(), stack.pop()
            if type(args) is not tuple or not isinstance(fn, Token) or (
                    name == 'NEWOBJ' and fn is not HISTORY):
                raise Refused(f'{name} on {type(fn).__name__}')
            stack.append(fn.reduce(args))
        elif name == 'BUILD':
            if len(stack) < 2:
                raise Refused('BUILD on a short stack')
            state, target = stack.pop(), stack[-1]
            if isinstance(target, Pending):
                if target.build is None:
                    raise Refused(f'second BUILD on a {target.what}')
                value = target.build(state)
                stack[-1] = value
                for key in target.memo_keys:
                    memo[key] = value
                target.build = None  # a second BUILD is refused
            elif type(target) is collections.OrderedDict:
                build_ordered_dict(target, state)
            else:
                raise Refused(f'BUILD on {type(target).__name__}')
        elif name == 'BINPERSID':
            if not stack:
                raise Refused('BINPERSID on an empty stack')
            stack.append(_persistent(stack.pop(), storage, storages,
                                     budget))
        else:
            raise Refused(f'pickle opcode {ord(op.code)} ({name}) is not '
                          'supported (torch.save writes protocol 2)', True)
    raise Refused('pickle without STOP')


def _persistent(pid: Any, storage: StorageLoader,
                storages: Dict[str, Storage], budget: List[int]) -> Storage:
    if type(pid) is not tuple or len(pid) != 5 or pid[0] != 'storage' \
            or not isinstance(pid[1], StorageType) or type(pid[2]) is not str \
            or not re.fullmatch(r'\d{1,12}', pid[2]) or \
            type(pid[3]) is not str:
        raise Refused('persistent id: expected torch\'s (\'storage\', type, '
                      'key, location, numel)')
    _, kind, key, _, numel = pid
    numel = int_in_range(numel, f'storage {key} numel')
    if key in storages:
        if storages[key].data.dtype != kind.dtype:
            raise Refused(f'storage {key} viewed as two dtypes')
        if storages[key].data.numel() != numel:
            raise Refused(f'storage {key} declared with two sizes')
        return storages[key]
    storages[key] = Storage(storage(key, kind.dtype, numel), budget)
    return storages[key]


_LEAVES = (type(None), bool, int, float, str, bytes, torch.Tensor,
           torch.dtype, torch.device, torch.Size, np.ndarray, np.generic,
           np.dtype)


def _children(obj: Any) -> Any:
    if type(obj) in (list, tuple):
        return obj
    if type(obj) in (dict, collections.OrderedDict):
        extra = list(vars(obj).values()) if type(
            obj) is collections.OrderedDict else []
        return [*obj.keys(), *obj.values(), *extra]
    return None


def _check_graph(root: Any) -> None:
    """The result must be acyclic, within :data:`MAX_DEPTH` and
    :data:`MAX_NODES` (shared references unfolded), of allowed types only."""
    try:
        from mmengine.logging import HistoryBuffer
    except ImportError:  # without mmengine no pickle can build one
        HistoryBuffer = None
    done: Dict[int, Tuple[int, int]] = {}  # id -> (depth, unfolded size)
    active = set()
    todo: List[Tuple[Any, bool]] = [(root, False)]
    while todo:
        obj, expanded = todo.pop()
        children = _children(obj)
        if children is None:
            if not isinstance(obj, _LEAVES) and type(obj) is not HistoryBuffer:
                raise Refused(f'unexpected object {short(obj)} in the '
                              'checkpoint')
            continue
        oid = id(obj)
        if expanded:
            sub = [done.get(id(c), (0, 1)) for c in children]
            depth = 1 + max((d for d, _ in sub), default=0)
            size = 1 + sum(s for _, s in sub)
            if depth > MAX_DEPTH or size > MAX_NODES:
                raise Refused(f'nesting deeper than {MAX_DEPTH} or more than '
                              f'{MAX_NODES} objects unfolded')
            done[oid] = (depth, size)
            active.discard(oid)
            continue
        if oid in done:
            continue
        if oid in active:
            raise Refused('a container that contains itself')
        active.add(oid)
        if len(active) > MAX_DEPTH:
            raise Refused(f'nesting deeper than {MAX_DEPTH}')
        todo.append((obj, True))
        todo.extend((c, False) for c in children
                    if _children(c) is None or id(c) not in done)

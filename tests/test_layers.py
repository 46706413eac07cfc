"""The package's layers (docs/architecture.md): no module imports a higher
layer and no sub-package imports one that imports it back.

Every ``import`` of every module counts, those inside functions included.
"""
import ast
import os.path as osp
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'mmrepvgg'

#: Lowest first. The package's own ``__init__`` (``''``) is the public
#: facade above every layer; importing it (to register the modules) loads
#: nothing that importing any sub-module would not load first anyway.
LAYERS = ('utils', 'models', 'deploy', 'testing', 'engine', 'apis', 'export',
          'benchmark', '')
RANK = {name: i for i, name in enumerate(LAYERS)}
RANK['version'] = RANK['utils']

#: Known upward imports, ``(importing module, imported module prefix)``,
#: each waiting for the change that removes it.
KNOWN_UPWARD = set()


def _modules():
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
        is_package = parts[-1] == '__init__'
        if is_package:
            parts = parts[:-1]
        yield '.'.join(parts), path, is_package


MODULES = {name: (path, is_pkg) for name, path, is_pkg in _modules()}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module
    base = module.split('.')
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return '.'.join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> set:
    """Every ``mmrepvgg`` module ``module`` imports (a name imported from a
    package counts as its sub-module when there is one)."""
    path, is_package = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            for a in node.names:
                sub = f'{target}.{a.name}'
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m.startswith('mmrepvgg.')}


def layer(module: str) -> str:
    """``utils``, ``models``, ... (``''`` for the package itself)."""
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else ''


def _known(module: str, target: str) -> bool:
    return any(module == m and (target == t or target.startswith(t + '.'))
               for m, t in KNOWN_UPWARD)


EDGES = {m: imports_of(m) for m in MODULES}


def test_every_module_belongs_to_a_layer():
    assert {layer(m) for m in MODULES} <= set(RANK)


def test_no_module_imports_a_higher_layer():
    upward = sorted(
        f'{m} ({layer(m)}) imports {t} ({layer(t)})'
        for m, targets in EDGES.items() for t in targets
        if RANK[layer(t)] > RANK[layer(m)] and not _known(m, t))
    assert not upward, 'upward imports:\n' + '\n'.join(upward)


def test_known_upward_imports_still_exist():
    """An exception nobody needs any more must be deleted from the list."""
    stale = [pair for pair in sorted(KNOWN_UPWARD)
             if not any(_known(*pair[:1], t) for t in EDGES[pair[0]])]
    assert not stale, f'delete from KNOWN_UPWARD: {stale}'


def test_no_cycle_between_sub_packages():
    graph = {}
    for m, targets in EDGES.items():
        for t in targets:
            if layer(t) != layer(m) and not _known(m, t):
                graph.setdefault(layer(m), set()).add(layer(t))

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(
            n, goal, seen + (n, ))) for n in graph.get(start, ()))

    cycles = sorted(p for p in graph if reaches(p, p))
    assert not cycles, f'sub-packages in an import cycle: {cycles}'


@pytest.mark.skipif(sys.version_info < (3, 10),
                    reason='sys.stdlib_module_names needs Python 3.10')
def test_quiet_entry_is_standard_library_only():
    """Tools run ``utils/quiet.py`` by path before anything heavy loads."""
    path, _ = MODULES['mmrepvgg.utils.quiet']
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), osp.basename(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, 'quiet.py must not import the package'
            names.add(node.module.split('.')[0])
    assert names <= set(sys.stdlib_module_names), names

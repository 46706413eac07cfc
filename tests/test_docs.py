"""Every command shown in README.md and docs/ runs as written: the fast checks.

Running every training command of the docs would take hours, so this checks
what can be checked in seconds and fails whenever a shown command is wrong:
the ```bash blocks of README.md and docs/ are parsed; every ``make TARGET``
must be a Makefile target; every ``python tools/X.py`` (or ``bash
tools/X.sh``) must exist and every ``--option`` it is shown with must appear
in that tool's ``--help`` (run once per tool, in parallel); every
``configs/...py`` argument must exist. Also: the README is at most 250 lines
and opens with its two commands, LICENSE exists, and every relative link of
README.md and docs/ points to an existing file (and heading, for
``#anchor``).
"""
import glob
import os
import os.path as osp
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
README = osp.join(ROOT, 'README.md')
PAGES = [README] + sorted(
    glob.glob(osp.join(ROOT, 'docs', '**', '*.md'), recursive=True))
README_MAX_LINES = 250
README_COMMANDS_WITHIN = 15

BASH_BLOCK = re.compile(r'^```bash[ \t]*\n(.*?)^```', re.M | re.S)
ANY_BLOCK = re.compile(r'^```.*?^```', re.M | re.S)
LINK = re.compile(r'\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
OPTION = re.compile(r'^--[A-Za-z0-9][\w-]*')
CONFIG_PATH = re.compile(r'configs/\S*\.py')
SHELL_VAR = re.compile(r'\$\{?\w+\}?')
PYTHON = re.compile(r'^(\S*/)?python(3(\.\d+)?)?$')
SHELL_WORDS = {'do', 'done', 'then', 'else', 'fi', 'time', 'exec', 'env'}
SHELL_LOOPS = {'for', 'while', 'if', 'case', 'until'}
# dist_train.sh / dist_test.sh pass their options through to train.py and
# test.py.
SCRIPT_PASSES_TO = {'tools/dist_train.sh': 'tools/train.py',
                    'tools/dist_test.sh': 'tools/test.py'}

Where = str  # "README.md:12"
Command = Tuple[Where, List[str]]


def _rel(path: str) -> str:
    return osp.relpath(path, ROOT)


def _read(path: str) -> str:
    with open(path, encoding='utf-8') as f:
        return f.read()


def shell_lines(path: str) -> Iterator[Tuple[Where, str]]:
    """Logical lines (backslash continuations joined) of the page's
    ```bash blocks."""
    text = _read(path)
    for block in BASH_BLOCK.finditer(text):
        first = text.count('\n', 0, block.start(1)) + 1
        pending, start = '', first
        for i, line in enumerate(block.group(1).split('\n')):
            if not pending:
                start = first + i
            if line.rstrip().endswith('\\'):
                pending += line.rstrip()[:-1] + ' '
                continue
            logical, pending = pending + line, ''
            if logical.strip():
                yield f'{_rel(path)}:{start}', logical


def simple_commands(where: Where, line: str) -> Iterator[Command]:
    """The simple commands of one shell line: split at ; && || |, comments
    dropped, usage brackets ([--opt X]) stripped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|()')
    lexer.whitespace_split = True
    lexer.commenters = '#'
    words: List[str] = []
    try:
        tokens = list(lexer)
    except ValueError as e:  # unbalanced quotes: the command cannot run
        pytest.fail(f'{where}: cannot parse {line!r}: {e}')
    for token in tokens + [';']:
        if token and set(token) <= set(';&|()'):
            if words:
                yield where, words
            words = []
        else:
            words.append(token.strip('[]'))


def all_commands(paths: Optional[List[str]] = None) -> List[Command]:
    return [cmd for path in (PAGES if paths is None else paths)
            for where, line in shell_lines(path)
            for cmd in simple_commands(where, line)]


def program(argv: List[str]) -> Tuple[str, List[str]]:
    """(what runs, its arguments) with assignments and shell keywords skipped:
    ('make', targets...), ('tools/x.py', args...), ('tools/x.sh', args...),
    or ('', ...) for anything else (mkdir, cp, loops)."""
    i = 0
    while i < len(argv) and (argv[i] in SHELL_WORDS
                             or re.match(r'^\w+=', argv[i])):
        i += 1
    argv = argv[i:]
    if not argv or argv[0] in SHELL_LOOPS:
        return '', []
    if argv[0] == 'make':
        return 'make', argv[1:]
    if PYTHON.match(argv[0]) and len(argv) > 1 and argv[1] != '-m':
        argv = argv[1:]
    elif argv[0] in ('bash', 'sh') and len(argv) > 1:
        argv = argv[1:]
    if argv[0].startswith('tools/') or argv[0].startswith('./tools/'):
        return osp.normpath(argv[0]), argv[1:]
    return '', []


def options(args: List[str]) -> List[str]:
    return [m.group(0) for a in args for m in [OPTION.match(a)] if m]


def make_targets() -> set:
    text = _read(osp.join(ROOT, 'Makefile'))
    return {m.group(1) for m in re.finditer(
        r'^([A-Za-z0-9_.-]+)\s*:(?!=)', text, re.M)} - {'.PHONY'}


def run_help(tool: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, tool, '--help'], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def tool_commands() -> List[Tuple[Where, str, List[str]]]:
    found = []
    for where, argv in all_commands():
        prog, args = program(argv)
        if prog and prog != 'make':
            found.append((where, prog, args))
    return found


@pytest.fixture(scope='module')
def helps(tool_commands) -> Dict[str, subprocess.CompletedProcess]:
    """Each shown tool's ``--help``, once per tool, in parallel."""
    tools = set()
    for _, prog, _ in tool_commands:
        prog = SCRIPT_PASSES_TO.get(prog, prog)
        if prog.endswith('.py') and osp.isfile(osp.join(ROOT, prog)):
            tools.add(prog)
    workers = min(len(tools), max(2, 2 * (os.cpu_count() or 1))) or 1
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(sorted(tools), pool.map(run_help, sorted(tools))))


def test_readme_is_short_and_opens_with_its_two_commands():
    lines = _read(README).split('\n')
    if lines and lines[-1] == '':
        lines.pop()
    assert len(lines) <= README_MAX_LINES, (
        f'README.md has {len(lines)} lines, at most {README_MAX_LINES}: '
        'move details to docs/')
    head = all_commands([README])
    first = [argv for where, argv in head
             if int(where.rsplit(':', 1)[1]) <= README_COMMANDS_WITHIN]
    assert ['make', 'demo'] in first and ['make', 'test'] in first, (
        f'README.md must show `make demo` and `make test` in a ```bash block '
        f'within its first {README_COMMANDS_WITHIN} lines; found {first}')


def test_license_exists():
    path = osp.join(ROOT, 'LICENSE')
    assert osp.isfile(path), \
        'LICENSE is missing (setup.py declares Apache-2.0)'
    assert 'Apache License' in _read(path)


def test_the_parser_finds_the_readme_commands(tool_commands):
    """Guards the checks below against a parser that silently finds nothing
    (the paths the mission fixes; the other tools may move)."""
    shown = [prog for where, prog, _ in tool_commands
             if where.startswith('README.md:')]
    assert len(shown) >= 8, shown
    for tool in ('tools/train.py', 'tools/dist_train.sh',
                 'tools/convert_deploy.py', 'tools/test.py'):
        assert tool in shown, f'{tool} not found in the README commands'


def test_every_make_target_exists():
    targets = make_targets()
    assert {'demo', 'test'} <= targets
    bad = [f'{where}: make {t}: no such Makefile target'
           for where, argv in all_commands()
           for prog, args in [program(argv)] if prog == 'make'
           for t in args if '=' not in t and not t.startswith('-')
           and t not in targets]
    assert not bad, '\n'.join(bad)


def test_every_tool_and_option_exists(tool_commands, helps):
    bad = []
    for tool, result in helps.items():
        if result.returncode != 0 or 'usage:' not in result.stdout:
            bad.append(f'{tool} --help failed (exit {result.returncode}): '
                       f'{(result.stderr or result.stdout).strip()[-500:]}')
    for where, prog, args in tool_commands:
        if not osp.isfile(osp.join(ROOT, prog)):
            bad.append(f'{where}: {prog} does not exist')
            continue
        result = helps.get(SCRIPT_PASSES_TO.get(prog, prog))
        if result is None or result.returncode != 0:
            continue
        for opt in options(args):
            name = opt.split('=', 1)[0]
            if not re.search(rf'(?<![\w-]){re.escape(name)}(?![\w-])',
                             result.stdout):
                bad.append(f'{where}: {prog} has no option {name} '
                           f'(not in its --help)')
    assert not bad, '\n'.join(bad)


def test_every_config_path_exists():
    bad = []
    for where, argv in all_commands():
        for word in argv:
            for path in CONFIG_PATH.findall(word):
                pattern = SHELL_VAR.sub('*', path)
                if not glob.glob(osp.join(ROOT, pattern)):
                    bad.append(f'{where}: {path} does not exist')
    assert not bad, '\n'.join(bad)


def github_anchors(path: str) -> set:
    """The #anchors GitHub gives the headings of a markdown file."""
    text = ANY_BLOCK.sub('', _read(path))
    seen: Dict[str, int] = {}
    anchors = set()
    for m in re.finditer(r'^#{1,6}\s+(.*?)\s*#*\s*$', text, re.M):
        slug = re.sub(r'[^\w\- ]', '', m.group(1).strip().lower())
        slug = slug.replace(' ', '-')
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f'{slug}-{n}')
    return anchors


@pytest.mark.parametrize('page', PAGES, ids=_rel)
def test_every_relative_link_exists(page):
    text = ANY_BLOCK.sub(lambda m: '\n' * m.group(0).count('\n'), _read(page))
    bad = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I):
            continue  # http:, https:, mailto:
        where = f'{_rel(page)}:{text.count(chr(10), 0, m.start()) + 1}'
        path, _, anchor = target.partition('#')
        full = osp.normpath(osp.join(osp.dirname(page), path)) \
            if path else page
        if not osp.exists(full):
            bad.append(f'{where}: {target}: {_rel(full)} does not exist')
        elif anchor and full.endswith('.md') and \
                anchor not in github_anchors(full):
            bad.append(f'{where}: {target}: no heading #{anchor} in '
                       f'{_rel(full)}')
    assert not bad, '\n'.join(bad)

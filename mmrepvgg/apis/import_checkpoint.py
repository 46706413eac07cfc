"""ImageNet RepVGG weights as :class:`mmrepvgg.RepVGG` state dicts, behind
``tools/model_converters/import_checkpoint.py``: key layouts are the table
:data:`FORMATS`, the arch is the published one with the same weight shapes,
and the result must load strictly into a fresh ``RepVGG(arch)``.
"""
import functools
import os.path as osp
import re
from collections import OrderedDict, namedtuple
from typing import Any, Dict, Optional, Tuple, Union

import torch

from mmrepvgg.deploy.verify import check_finite
from mmrepvgg.utils.cli import ToolError, preview
from mmrepvgg.version import __version__
from .convert import extract_state_dict, key_mismatch

Arch = Union[str, dict]

_BN = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
#: The parts of a block (conv3, norm3, conv1, norm1, identity norm, fused
#: conv, SE squeeze, SE excite) and their fields.
ROLE_FIELDS = (('weight', ), _BN, ('weight', ), _BN, _BN, ('weight', 'bias'),
               ('weight', 'bias'), ('weight', 'bias'))

#: ``stage`` is formatted with (source stage index, block index); our stage
#: number is the source's plus ``offset``; ``dropped``: classifier prefixes.
Format = namedtuple('Format', 'description prefixes stem stage offset roles '
                    'dropped')
FORMATS = OrderedDict(
    official=Format(
        'DingXiaoH/RepVGG (repvgg.py)', ('', ), 'stage0', 'stage{}.{}', 0,
        ('rbr_dense.conv', 'rbr_dense.bn', 'rbr_1x1.conv', 'rbr_1x1.bn',
         'rbr_identity', 'rbr_reparam', 'se.down', 'se.up'), ('linear.', )),
    timm=Format(
        'timm repvgg_* (byobnet.py RepVggBlock)', ('', ), 'stem',
        'stages.{}.{}', 1,
        ('conv_kxk.conv', 'conv_kxk.bn', 'conv_1x1.conv', 'conv_1x1.bn',
         'identity', 'reparam_conv', 'attn.fc1', 'attn.fc2'), ('head.', )),
    mmrepvgg=Format(
        'mmrepvgg RepVGG backbone', ('', ), 'stem', 'stage_{}.{}', 0,
        ('branch_3x3.conv', 'branch_3x3.bn', 'branch_1x1.conv',
         'branch_1x1.bn', 'branch_norm', 'conv_reparam', 'se.squeeze',
         'se.excite'), ()),
    mmpretrain=Format(
        'mmpretrain / mmcls RepVGG', ('backbone.', ''), 'stem', 'stage_{}.{}',
        0,
        ('branch_3x3.conv', 'branch_3x3.norm', 'branch_1x1.conv',
         'branch_1x1.norm', 'branch_norm', 'branch_reparam',
         'se_layer.conv1.conv', 'se_layer.conv2.conv'),
        ('head.', 'data_preprocessor.')),
)
#: Keys only a multi-branch QARepVGG block has: a bare 1x1 conv (YOLOv6,
#: super-gradients, mmrepvgg) or a norm after the branch sum (``post_norm``,
#: ``post_bn``, YOLOv6's ``bn`` on the block itself).
_QAREPVGG_KEY = re.compile(r'(^|\.)((rbr_1x1|branch_1x1)\.(weight|bias)|'
                           r'(post_norm|post_bn)\.\w+)$|^stage\d+(\.\d+)?'
                           r'\.bn\.\w+$')


class CheckpointImportError(ToolError):
    """Import refused; the one-line message names the keys at fault."""


@functools.lru_cache(maxsize=None)
def _suffixes(name: str) -> Dict[str, str]:
    """Source block-key suffix -> our block-key suffix."""
    ours = FORMATS['mmrepvgg'].roles
    return {f'{src}.{f}': f'{our}.{f}' for src, our, fields in
            zip(FORMATS[name].roles, ours, ROLE_FIELDS) for f in fields}


@functools.lru_cache(maxsize=None)
def _unit_regex(name: str) -> 're.Pattern':
    fmt = FORMATS[name]
    stage = r'(\d+)'.join(re.escape(p) for p in fmt.stage.split('{}'))
    return re.compile(rf'^(?:{re.escape(fmt.stem)}|{stage})\.(.+)$')


def map_key(name: str, key: str) -> Optional[str]:
    """Our backbone key for source ``key`` in format ``name``, ``''`` for a
    classifier key, None if it is not one of the format's keys."""
    fmt = FORMATS[name]
    for prefix in fmt.prefixes:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if fmt.dropped and rest.startswith(fmt.dropped):
            return ''
        m = _unit_regex(name).match(rest)
        ours = m and _suffixes(name).get(m.group(3))
        if not ours:
            continue
        if m.group(1) is None:
            return f'stem.{ours}'
        stage = int(m.group(1)) + fmt.offset
        if stage >= 1:
            return f'stage_{stage}.{int(m.group(2))}.{ours}'
    return None


def source_key(name: str, key: str, prefix: str = '') -> str:
    """The key format ``name`` uses for our backbone key ``key``."""
    fmt = FORMATS[name]
    m = re.match(r'^(stem|stage_(\d+)\.(\d+))\.(.+)$', key)
    inverse = {v: k for k, v in _suffixes(name).items()}
    if m is None or m.group(4) not in inverse:
        return key
    unit = fmt.stem if m.group(1) == 'stem' else fmt.stage.format(
        int(m.group(2)) - fmt.offset, int(m.group(3)))
    return f'{prefix}{unit}.{inverse[m.group(4)]}'


def _qarepvgg_note(keys) -> str:
    qa = next((k for k in keys if _QAREPVGG_KEY.search(k)), None)
    return f'; a QARepVGG checkpoint, not a RepVGG one (key {qa})' \
        if qa else ''


def detect_format(keys) -> str:
    """Name of the format that maps the most of ``keys``."""
    counts = {name: sum(bool(map_key(name, k)) for k in keys)
              for name in FORMATS}
    best = max(counts, key=counts.get)
    if not counts[best]:
        raise CheckpointImportError(
            'not a RepVGG checkpoint of a known layout (official, timm, '
            f'mmpretrain, mmrepvgg); first keys: {preview(list(keys))}'
            + _qarepvgg_note(keys))
    return best


def build_backbone(arch: Arch, deploy: bool) -> torch.nn.Module:
    """``RepVGG(arch, deploy=deploy)`` on the meta device: shapes only."""
    from mmrepvgg.models import RepVGG
    with torch.device('meta'):
        return RepVGG(arch, deploy=deploy)


@functools.lru_cache(maxsize=None)
def _conv_shapes(arch: str, deploy: bool) -> frozenset:
    return frozenset((k, tuple(v.shape)) for k, v in build_backbone(
        arch, deploy).state_dict().items() if v.dim() == 4)


def detect_arch(sd: Dict[str, torch.Tensor], deploy: bool
                ) -> Tuple[str, bool]:
    """``(arch, exact)``: the published arch whose conv weight shapes ``sd``
    has, or else the closest one (``exact`` False)."""
    from mmrepvgg.models import ARCH_SETTINGS
    shapes = frozenset((k, tuple(v.shape)) for k, v in sd.items()
                       if v.dim() == 4)
    scores = {name: len(shapes & _conv_shapes(name, deploy)) -
              len(shapes ^ _conv_shapes(name, deploy))
              for name in ARCH_SETTINGS}
    best = max(scores, key=scores.get)
    return best, shapes == _conv_shapes(best, deploy)


def detect_deploy(sd: Dict[str, torch.Tensor]) -> bool:
    """True if every block is fused (one conv), False if none is."""

    def units(part):
        return sorted({k.split(f'.{part}')[0] for k in sd if f'.{part}' in k})

    fused, branched = units('conv_reparam.'), units('branch_')
    if fused and branched:
        raise CheckpointImportError(
            f'mixes fused and multi-branch blocks (fused: {preview(fused, 3)}'
            f'; multi-branch: {preview(branched, 3)})')
    return bool(fused)


def check_strict(sd: Dict[str, torch.Tensor], arch: Arch, deploy: bool,
                 fmt: str, prefix: str = '', hint: Optional[str] = None
                 ) -> Tuple['OrderedDict[str, torch.Tensor]', list]:
    """Strictly load ``sd`` into a fresh ``RepVGG(arch, deploy=deploy)``;
    missing ``num_batches_tracked`` buffers are filled with 0. Returns the
    state dict in the model's key order and the filled keys."""
    try:
        model = build_backbone(arch, deploy)
    except ValueError as e:
        raise CheckpointImportError(f'invalid arch {arch!r}: {e}') from None
    expected = model.state_dict()
    out = OrderedDict(sd)
    tracked = 'num_batches_tracked'
    filled = [k for k in expected if k not in out and k.endswith(tracked)
              and k[:-len(tracked)] + 'running_mean' in out]
    out.update((k, torch.tensor(0, dtype=torch.long)) for k in filled)

    def named(k):
        src = source_key(fmt, k, prefix)
        return k if src == k else f'{k} (source {src})'

    problem = key_mismatch(expected, out, named)[3]
    if problem:
        name = arch if isinstance(arch, str) else 'custom arch'
        note = f'; {hint}' if hint else ''
        raise CheckpointImportError(
            f'weights do not fit RepVGG {name} '
            f'({"deploy" if deploy else "training"} form{note}): {problem}')
    try:
        model.load_state_dict(out, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointImportError(
            'strict load into RepVGG failed: '
            f'{" ".join(str(e).split())[:500]}') from None
    # clones own exactly their storage: a view would save its source whole
    return OrderedDict((k, out[k].detach().clone()) for k in expected), filled


def import_state_dict(obj: Any,
                      arch: Optional[Arch] = None,
                      fmt: Optional[str] = None
                      ) -> Tuple['OrderedDict[str, torch.Tensor]', dict]:
    """A loaded RepVGG checkpoint (possibly wrapped) in ``RepVGG`` keys and
    order, and an info dict (``format``, ``arch``, ``deploy``, ``dropped``
    and ``filled`` keys ...); ``arch`` and ``fmt`` are detected unless
    given."""
    sd = extract_state_dict(obj, CheckpointImportError)
    if fmt is None:
        fmt = detect_format(list(sd))
    elif fmt not in FORMATS:
        raise CheckpointImportError(
            f'unknown format {fmt!r}; choose one of {list(FORMATS)}')
    mapped: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    origin: Dict[str, str] = {}
    dropped, unknown = [], []
    for k, v in sd.items():
        ours = map_key(fmt, k)
        if ours is None:
            unknown.append(k)
        elif not ours:
            dropped.append(k)
        elif ours in mapped:
            raise CheckpointImportError(
                f'keys {origin[ours]} and {k} both map to {ours}')
        else:
            mapped[ours], origin[ours] = v, k
    if unknown:
        raise CheckpointImportError(
            f'{len(unknown)} key(s) not recognised as {fmt} RepVGG weights '
            f'({FORMATS[fmt].description}): {preview(unknown)}'
            + _qarepvgg_note(unknown))
    bad = [f'{origin[k]} ({v.dtype})' for k, v in mapped.items()
           if not (v.is_floating_point() or k.endswith('num_batches_tracked'))]
    if not mapped or bad:
        raise CheckpointImportError(
            f'non floating-point weights: {preview(bad)}' if bad else
            f'no backbone weights found ({fmt} layout); keys: '
            f'{preview(list(sd))}')
    check_finite({origin[k]: v for k, v in mapped.items()},
                 'broken source weights, nothing imported')
    deploy = detect_deploy(mapped)
    guess, exact = detect_arch(mapped, deploy)
    hint = None
    if arch is None:
        arch = guess
        if not exact:
            hint = (f'the weights match no published RepVGG arch; {guess} '
                    'is the closest')
    elif exact and guess != arch:
        hint = f'the weights look like arch {guess}'
    prefix = 'backbone.' if any(
        v.startswith('backbone.') for v in origin.values()) else ''
    state, filled = check_strict(mapped, arch, deploy, fmt, prefix, hint)
    info = dict(format=fmt, format_description=FORMATS[fmt].description,
                arch=arch, deploy=deploy, dropped=dropped, filled=filled,
                num_tensors=len(state))
    return state, info


def make_checkpoint(state: Dict[str, torch.Tensor], info: dict,
                    source: Optional[str] = None,
                    prefix: str = '') -> dict:
    """The checkpoint to save, ``prefix`` (``'backbone.'`` for a detector's
    ``load_from``) prepended to every key."""
    meta = dict(
        version=__version__,
        source_format=info['format'],
        source_checkpoint=osp.abspath(source) if source else None,
        arch=info['arch'],
        deploy=bool(info['deploy']),
        key_prefix=prefix,
        dropped_keys=list(info['dropped']),
        filled_keys=list(info['filled']),
    )
    sd = OrderedDict((prefix + k, v) for k, v in state.items())
    return dict(meta=dict(mmrepvgg=meta), state_dict=sd)

"""Key layouts of RepVGG checkpoints, for :mod:`.import_checkpoint`.

Each :class:`SourceFormat` names where a code base keeps the stem, the
stages and the parts of a block; this package's own layout is read from
:class:`~mmrepvgg.models.RepVGGBlock` itself (:func:`backbone_layout`), so
the mapping follows the code.
"""
import contextlib
import functools
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from mmrepvgg.utils.cli import ToolError, preview

_BN_FIELDS = ('weight', 'bias', 'running_mean', 'running_var',
              'num_batches_tracked')


class CheckpointImportError(ToolError):
    """Import refused; the one-line message names the keys at fault."""


#: Parts of a RepVGG block, and the fields each one holds.
ROLE_FIELDS: Dict[str, Tuple[str, ...]] = OrderedDict(
    conv3=('weight', ),  # 3x3 conv of the 3x3 branch (no bias: BN follows)
    norm3=_BN_FIELDS,  # its batch norm
    conv1=('weight', ),  # 1x1 conv of the 1x1 branch
    norm1=_BN_FIELDS,  # its batch norm
    ident=_BN_FIELDS,  # identity branch (a batch norm)
    fused=('weight', 'bias'),  # deploy form: the single fused 3x3 conv
    se_down=('weight', 'bias'),  # SE squeeze conv
    se_up=('weight', 'bias'),  # SE excitation conv
)


@dataclass(frozen=True)
class SourceFormat:
    """Key layout of one family of RepVGG checkpoints."""
    name: str
    description: str
    prefixes: Tuple[str, ...]  # tried in order; '' = no prefix
    stem: str  # name of the stem block
    stage_template: str  # str.format(stage_index, block_index)
    stage_offset: int  # our stage number = source stage index + offset
    roles: Optional[Tuple[Tuple[str, str], ...]]  # role -> module path;
    # None = this package's own layout (read from the code)
    dropped: Tuple[str, ...]  # key prefixes of the classifier (dropped)

    @property
    def stage_regex(self) -> 're.Pattern':
        parts = self.stage_template.split('{}')
        pattern = r'(\d+)'.join(re.escape(p) for p in parts)
        return re.compile('^' + pattern + r'\.(.+)$')

    @property
    def suffixes(self) -> Dict[str, str]:
        """Source block-key suffix -> our block-key suffix."""
        if self.name not in _SUFFIX_CACHE:
            ours = backbone_layout()['roles']
            src = dict(self.roles) if self.roles is not None else ours
            _SUFFIX_CACHE[self.name] = OrderedDict(
                (f'{src[role]}.{f}', f'{ours[role]}.{f}')
                for role, fields in ROLE_FIELDS.items() for f in fields)
        return _SUFFIX_CACHE[self.name]

    @property
    def inverse(self) -> Dict[str, str]:
        return {v: k for k, v in self.suffixes.items()}


_SUFFIX_CACHE: Dict[str, Dict[str, str]] = {}


def _roles(conv3, norm3, conv1, norm1, ident, fused, se_down, se_up):
    return tuple(zip(ROLE_FIELDS, (conv3, norm3, conv1, norm1, ident, fused,
                                   se_down, se_up)))


FORMATS: Dict[str, SourceFormat] = OrderedDict(
    official=SourceFormat(
        name='official',
        description='DingXiaoH/RepVGG (repvgg.py)',
        prefixes=('', ), stem='stage0', stage_template='stage{}.{}',
        stage_offset=0,
        roles=_roles('rbr_dense.conv', 'rbr_dense.bn', 'rbr_1x1.conv',
                     'rbr_1x1.bn', 'rbr_identity', 'rbr_reparam', 'se.down',
                     'se.up'),
        dropped=('linear.', )),
    timm=SourceFormat(
        name='timm',
        description='timm repvgg_* (byobnet.py RepVggBlock)',
        prefixes=('', ), stem='stem', stage_template='stages.{}.{}',
        stage_offset=1,
        roles=_roles('conv_kxk.conv', 'conv_kxk.bn', 'conv_1x1.conv',
                     'conv_1x1.bn', 'identity', 'reparam_conv', 'attn.fc1',
                     'attn.fc2'),
        dropped=('head.', )),
    mmrepvgg=SourceFormat(
        name='mmrepvgg',
        description='mmrepvgg RepVGG backbone',
        prefixes=('', ), stem='stem', stage_template='stage_{}.{}',
        stage_offset=0, roles=None, dropped=()),
    mmpretrain=SourceFormat(
        name='mmpretrain',
        description='mmpretrain / mmcls RepVGG',
        prefixes=('backbone.', ''), stem='stem',
        stage_template='stage_{}.{}', stage_offset=0,
        roles=_roles('branch_3x3.conv', 'branch_3x3.norm', 'branch_1x1.conv',
                     'branch_1x1.norm', 'branch_norm', 'branch_reparam',
                     'se_layer.conv1.conv', 'se_layer.conv2.conv'),
        dropped=('head.', 'data_preprocessor.')),
)


@functools.lru_cache(maxsize=None)
def backbone_layout() -> dict:
    """Module path of every block role in :class:`RepVGG`, read from a tiny
    instance (so that the mapping follows the code, e.g. the name mmcv's
    ``ConvModule`` gives its norm)."""
    from mmrepvgg.models import RepVGG
    arch = dict(num_blocks=(2, 1, 1, 1), width_factor=(1, 1, 1, 1),
                se_cfg=dict(ratio=16))
    with meta_device():
        train = RepVGG(arch)
        deploy = RepVGG(arch, deploy=True)

    def path(block, module) -> str:
        for name, m in block.named_modules():
            if m is module:
                return name
        raise CheckpointImportError(
            f'cannot locate {type(module).__name__} in RepVGGBlock')

    def conv(m):  # a ConvModule or a bare conv
        return getattr(m, 'conv', m)

    try:
        if list(train.stage_names[:4]) != [f'stage_{i}' for i in (1, 2, 3, 4)]:
            raise AttributeError(f'stage names {train.stage_names}')
        block = getattr(train, train.stage_names[0])[1]
        fblock = getattr(deploy, deploy.stage_names[0])[1]
        roles = OrderedDict(
            conv3=path(block, block.branch_3x3.conv),
            norm3=path(block, block.branch_3x3.norm),
            conv1=path(block, block.branch_1x1.conv),
            norm1=path(block, block.branch_1x1.norm),
            ident=path(block, block.branch_norm),
            fused=path(fblock, fblock.conv_reparam),
            se_down=path(block, conv(block.se.squeeze)),
            se_up=path(block, conv(block.se.excite)))
    except AttributeError as e:
        raise CheckpointImportError(
            f'cannot read the RepVGGBlock layout of this mmrepvgg version '
            f'({e})') from None
    known = {f'{roles[r]}.{f}' for r, fields in ROLE_FIELDS.items()
             for f in fields}
    keys = set(block.state_dict()) | set(fblock.state_dict())
    if keys - known:
        raise CheckpointImportError(
            'RepVGGBlock has keys this importer does not know: '
            + preview(sorted(keys - known)))
    return dict(roles=roles)


@contextlib.contextmanager
def meta_device():
    """``torch.device('meta')`` as default device where supported."""
    meta = torch.device('meta')
    if not hasattr(meta, '__enter__'):  # torch < 2.0: build for real
        yield
        return
    with meta:
        yield


def parse_key(fmt: SourceFormat, key: str) -> Tuple[str, Optional[str]]:
    """``('map', our_key)``, ``('drop', None)`` or ``('unknown', None)``."""
    for prefix in fmt.prefixes:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if fmt.dropped and rest.startswith(fmt.dropped):
            return 'drop', None
        if rest.startswith(fmt.stem + '.'):
            unit, suffix = 'stem', rest[len(fmt.stem) + 1:]
        else:
            m = fmt.stage_regex.match(rest)
            if m is None:
                continue
            stage = int(m.group(1)) + fmt.stage_offset
            if stage < 1:
                continue
            unit, suffix = f'stage_{stage}.{int(m.group(2))}', m.group(3)
        ours = fmt.suffixes.get(suffix)
        if ours is not None:
            return 'map', f'{unit}.{ours}'
    return 'unknown', None


def source_key(fmt: Union[str, SourceFormat], our_key: str,
               prefix: str = '') -> Optional[str]:
    """The key ``fmt`` uses for backbone key ``our_key`` (None if none)."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    m = re.match(r'^(stem|stage_(\d+)\.(\d+))\.(.+)$', our_key)
    if m is None:
        return None
    suffix = fmt.inverse.get(m.group(4))
    if suffix is None:
        return None
    if m.group(1) == 'stem':
        unit = fmt.stem
    else:
        unit = fmt.stage_template.format(
            int(m.group(2)) - fmt.stage_offset, int(m.group(3)))
    return f'{prefix}{unit}.{suffix}'


#: Keys only a QARepVGG block has: a 1x1 branch that is a bare conv (no
#: norm; YOLOv6 ``rbr_1x1``, super-gradients / mmrepvgg ``branch_1x1``) and
#: a norm after the branch sum (mmrepvgg ``post_norm``, super-gradients
#: ``post_bn``).
_QAREPVGG_KEY = re.compile(
    r'(^|\.)((rbr_1x1|branch_1x1)\.(weight|bias)|(post_norm|post_bn)\.'
    r'(weight|bias|running_mean|running_var|num_batches_tracked))$')
#: YOLOv6's post-sum norm: ``bn`` beside the block's ``rbr_dense`` (training
#: form) or ``rbr_reparam`` (YOLOv6 keeps it in its deploy form).
_BLOCK_BN_KEY = re.compile(
    r'^(.*\.)?bn\.(weight|bias|running_mean|running_var|'
    r'num_batches_tracked)$')


def qarepvgg_evidence(keys: Sequence[str]) -> Optional[str]:
    """The first key showing that ``keys`` are QARepVGG weights (None if
    none does). A QARepVGG block's 1x1 branch has no norm and its norm comes
    after the sum: no RepVGG block has these, so such a checkpoint cannot
    be imported (only its fused form, a plain 3x3 conv, is the same)."""
    keys = list(keys)
    for k in keys:
        if _QAREPVGG_KEY.search(k):
            return k
    prefixes = None
    for k in keys:
        m = _BLOCK_BN_KEY.match(k)
        if m is None:
            continue
        if prefixes is None:
            prefixes = {key[:key.index(b)] for key in keys
                        for b in ('rbr_dense.', 'rbr_reparam.') if b in key}
        if (m.group(1) or '') in prefixes:
            return k
    return None


def detect_format(keys: Sequence[str]) -> str:
    """Name of the format that recognises the most of ``keys``.

    Raises:
        CheckpointImportError: no format recognises any key, or the keys
            are QARepVGG weights (:func:`qarepvgg_evidence`).
    """
    qa = qarepvgg_evidence(keys)
    if qa is not None:
        raise CheckpointImportError(
            f'a QARepVGG checkpoint, not a RepVGG one (key {qa}: a 1x1 '
            'branch without norm or a norm after the branch sum, which '
            'RepVGG blocks do not have); nothing imported. An mmrepvgg '
            'QARepVGG backbone state dict loads as it is into '
            "RepVGG(arch, block_cfg=dict(type='QARepVGGBlock'))")
    best, best_count = None, 0
    for name, fmt in FORMATS.items():
        count = sum(parse_key(fmt, k)[0] == 'map' for k in keys)
        if count > best_count:
            best, best_count = name, count
    if best is None:
        raise CheckpointImportError(
            'not a RepVGG checkpoint of a known layout (official, timm, '
            f'mmpretrain, mmrepvgg); first keys: {preview(list(keys))}')
    return best

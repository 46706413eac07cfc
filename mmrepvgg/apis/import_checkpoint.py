"""Import ImageNet RepVGG weights as :class:`mmrepvgg.RepVGG` state dicts.

Behind ``tools/import_checkpoint.py``. Supported source layouts (detected
from the keys, or forced with ``fmt``):

* ``official``: DingXiaoH/RepVGG ``repvgg.py``: ``stage0`` (the stem),
  ``stage1..4.M`` blocks with ``rbr_dense.{conv,bn}``, ``rbr_1x1.{conv,bn}``,
  ``rbr_identity`` (BN), SE ``se.down`` / ``se.up``, fused ``rbr_reparam``;
  classifier ``linear.*``.
* ``mmpretrain``: mmpretrain / mmcls ``RepVGG``: ``backbone.stem``,
  ``backbone.stage_N.M`` with ``branch_3x3.{conv,norm}``,
  ``branch_1x1.{conv,norm}``, ``branch_norm``, SE
  ``se_layer.conv1.conv`` / ``se_layer.conv2.conv``, fused
  ``branch_reparam``; classifier ``head.*``.
* ``timm``: timm ``repvgg_*`` (``byobnet.py``, ``RepVggBlock``): ``stem``
  (itself a RepVggBlock), ``stages.S.B`` with S = 0..3 (our stage S + 1),
  ``conv_kxk.{conv,bn}``, ``conv_1x1.{conv,bn}``, ``identity`` (BN), SE
  ``attn.fc1`` / ``attn.fc2``, fused ``reparam_conv``; classifier
  ``head.fc.*``.
* ``mmrepvgg``: this package's own backbone keys (``stem``, ``stage_N.M``;
  the block keys are read from :class:`RepVGGBlock` itself, see
  :func:`backbone_layout`).

Wrappers ``{'state_dict': ...}`` / ``{'model': ...}`` and ``module.``
prefixes are removed. The classifier is dropped; every other key must map
onto the backbone (otherwise it is reported by name), and the result must
load strictly into a freshly built ``RepVGG(arch)`` (or ``deploy=True``
when the source is fused): missing, unexpected and mis-shaped keys are
reported by name, with the source key they come from.
"""
import contextlib
import functools
import os.path as osp
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from mmrepvgg.deploy.verify import first_non_finite
from mmrepvgg.utils.cli import ToolError
from mmrepvgg.version import __version__

Arch = Union[str, dict]

_BN_FIELDS = ('weight', 'bias', 'running_mean', 'running_var',
              'num_batches_tracked')
_BASE = 64  # RepVGG base_channels


class CheckpointImportError(ToolError):
    """Import refused; the one-line message names the keys at fault."""


# ------------------------------------------------------------------ formats
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
    with _meta_device():
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
            + _preview(sorted(keys - known)))
    return dict(roles=roles)


@contextlib.contextmanager
def _meta_device():
    """``torch.device('meta')`` as default device where supported."""
    meta = torch.device('meta')
    if not hasattr(meta, '__enter__'):  # torch < 2.0: build for real
        yield
        return
    with meta:
        yield


def _parse_key(fmt: SourceFormat, key: str) -> Tuple[str, Optional[str]]:
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
        count = sum(_parse_key(fmt, k)[0] == 'map' for k in keys)
        if count > best_count:
            best, best_count = name, count
    if best is None:
        raise CheckpointImportError(
            'not a RepVGG checkpoint of a known layout (official, timm, '
            f'mmpretrain, mmrepvgg); first keys: {_preview(list(keys))}')
    return best


# ---------------------------------------------------------------- unwrapping
def extract_state_dict(obj: Any) -> Tuple['OrderedDict[str, torch.Tensor]',
                                          dict]:
    """Remove ``state_dict`` / ``model`` wrappers and ``module.`` prefixes.

    Returns the flat state dict and a dict describing what was removed.
    """
    how = dict(wrapper=[], stripped_module_prefix=False)
    while True:
        if not isinstance(obj, dict):
            raise CheckpointImportError(
                f'not a checkpoint: a {type(obj).__name__}, expected a dict '
                'of tensors (or a dict with "state_dict" / "model")')
        if not obj:
            raise CheckpointImportError('empty state dict')
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        key = next((k for k in ('state_dict', 'model')
                    if isinstance(obj.get(k), dict)), None)
        if key is None or len(how['wrapper']) >= 3:
            bad = [f'{k} ({type(v).__name__})' for k, v in obj.items()
                   if not isinstance(v, torch.Tensor)]
            raise CheckpointImportError(
                'no state dict of tensors found; non-tensor entries: '
                + _preview(bad))
        how['wrapper'].append(key)
        obj = obj[key]
    sd: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointImportError(f'state dict key {k!r} is not a str')
        name = k
        while name.startswith('module.'):
            name = name[len('module.'):]
            how['stripped_module_prefix'] = True
        if name in sd:
            raise CheckpointImportError(
                f'key {name} appears twice (with and without "module.")')
        sd[name] = v
    return sd, how


# -------------------------------------------------------------- arch detect
def _unit_sort_key(unit: str) -> Tuple[int, int]:
    if unit == 'stem':
        return (0, 0)
    n, m = unit[len('stage_'):].split('.')
    return (int(n), int(m))


def _units(sd: Dict[str, torch.Tensor]) -> List[str]:
    units = set()
    for k in sd:
        m = re.match(r'^(stem|stage_\d+\.\d+)\.', k)
        if m:
            units.add(m.group(1))
    return sorted(units, key=_unit_sort_key)


def detect_deploy(sd: Dict[str, torch.Tensor]) -> bool:
    """True if every block is fused (one conv), False if none is."""
    roles = backbone_layout()['roles']
    fused_prefix = roles['fused'] + '.'
    branch_prefixes = tuple(roles[r] + '.' for r in
                            ('conv3', 'norm3', 'conv1', 'norm1', 'ident'))
    fused, branched = [], []
    for unit in _units(sd):
        rests = [k[len(unit) + 1:] for k in sd if k.startswith(unit + '.')]
        if any(r.startswith(fused_prefix) for r in rests):
            fused.append(unit)
        if any(r.startswith(branch_prefixes) for r in rests):
            branched.append(unit)
    if fused and branched:
        both = [u for u in fused if u in branched]
        what = (f'{_preview(both)} have both' if both else
                f'fused: {_preview(fused, 3)}; multi-branch: '
                f'{_preview(branched, 3)}')
        raise CheckpointImportError(
            f'mixes fused and multi-branch blocks ({what})')
    return bool(fused)


def arch_signature(arch: Arch, in_channels: int = 3) -> dict:
    """Shapes that identify ``arch``: stem width, stage widths, blocks,
    groups (global block index -> groups > 1) and SE hidden widths."""
    from mmrepvgg.models.backbones.repvgg import resolve_arch
    a = resolve_arch(arch)
    widths = tuple(int(_BASE * 2**i * w) for i, w in
                   enumerate(a['width_factor']))
    stem = min(_BASE, int(_BASE * a['width_factor'][0]))
    blocks = tuple(int(n) for n in a['num_blocks'])
    total = sum(blocks)
    groups = {int(i): int(g) for i, g in (a['group_layer_map'] or {}).items()
              if int(g) > 1 and 1 <= int(i) <= total}
    se = None
    if a['se_cfg'] is not None:
        ratio = a['se_cfg'].get('ratio', 16)
        outs = [stem] + [w for w, n in zip(widths, blocks) for _ in range(n)]
        se = tuple(max(1, c // ratio) for c in outs)
    return dict(in_channels=in_channels, stem=stem, widths=widths,
                num_blocks=blocks, groups=groups, se=se)


def _describe(sig: dict) -> str:
    groups = ', '.join(f'{i}:{g}' for i, g in sorted(sig['groups'].items()))
    se = 'none' if sig['se'] is None else \
        f'hidden {sig["se"][0]}..{sig["se"][-1]}'
    return (f'stem {sig["stem"]}, widths {list(sig["widths"])}, blocks '
            f'{list(sig["num_blocks"])}, groups {{{groups}}}, SE {se}')


def signature_from_state_dict(sd: Dict[str, torch.Tensor],
                              deploy: bool) -> dict:
    """:func:`arch_signature` read from the weight shapes of ``sd``."""
    units = _units(sd)
    if 'stem' not in units:
        raise CheckpointImportError('cannot detect the arch: no stem weights')
    stages: Dict[int, List[int]] = {}
    for u in units[1:]:
        n, m = _unit_sort_key(u)
        stages.setdefault(n, []).append(m)
    if sorted(stages) != list(range(1, len(stages) + 1)):
        raise CheckpointImportError(
            f'cannot detect the arch: stages {sorted(stages)} are not '
            'numbered 1..N')
    for n, idx in stages.items():
        if idx != list(range(len(idx))):
            gap = min(set(range(max(idx) + 1)) - set(idx))
            raise CheckpointImportError(
                f'cannot detect the arch: block stage_{n}.{gap} is missing '
                f'(found blocks {idx} in stage_{n})')
    roles = backbone_layout()['roles']
    wkey = roles['fused' if deploy else 'conv3'] + '.weight'
    skey = roles['se_down'] + '.weight'
    shapes, se_hidden = [], []
    for u in units:
        w = sd.get(f'{u}.{wkey}')
        if w is None or w.dim() != 4:
            raise CheckpointImportError(
                f'cannot detect the arch: {u}.{wkey} is missing or not a '
                'conv weight')
        shapes.append(tuple(w.shape))
        s = sd.get(f'{u}.{skey}')
        se_hidden.append(None if s is None or s.dim() < 1 else s.shape[0])
    in_channels = shapes[0][1]
    stem = shapes[0][0]
    widths, blocks, groups = [], [], {}
    prev, idx = stem, 1
    for n in sorted(stages):
        outs = set()
        for _ in stages[n]:
            out_c, in_per_group = shapes[idx][0], shapes[idx][1]
            if in_per_group <= 0 or prev % in_per_group:
                raise CheckpointImportError(
                    f'cannot detect the arch: {units[idx]}.{wkey} has '
                    f'{in_per_group} input channels per group, which does '
                    f'not divide the {prev} channels before it')
            g = prev // in_per_group
            if g > 1:
                groups[idx] = g
            outs.add(out_c)
            prev, idx = out_c, idx + 1
        if len(outs) != 1:
            raise CheckpointImportError(
                f'cannot detect the arch: stage_{n} blocks have different '
                f'widths {sorted(outs)}')
        widths.append(outs.pop())
        blocks.append(len(stages[n]))
    if all(h is None for h in se_hidden):
        se = None
    elif any(h is None for h in se_hidden):
        without = [u for u, h in zip(units, se_hidden) if h is None]
        raise CheckpointImportError(
            'cannot detect the arch: SE weights missing in '
            f'{_preview(without)} but present in other blocks')
    else:
        se = tuple(se_hidden)
    return dict(in_channels=in_channels, stem=stem, widths=tuple(widths),
                num_blocks=tuple(blocks), groups=groups, se=se)


def custom_arch(sig: dict) -> dict:
    """An arch dict for :class:`RepVGG` reproducing ``sig`` exactly."""
    widths = sig['widths']
    factors = tuple(w / (_BASE * 2**i) for i, w in enumerate(widths))
    if sig['stem'] != min(_BASE, widths[0]):
        raise CheckpointImportError(
            f'stem width {sig["stem"]} cannot be built by RepVGG (its stem '
            f'is min({_BASE}, stage-1 width) = {min(_BASE, widths[0])})')
    se_cfg = None
    if sig['se'] is not None:
        outs = [sig['stem']] + [w for w, n in
                                zip(widths, sig['num_blocks'])
                                for _ in range(n)]
        for ratio in sorted({max(1, c // h) for c, h in zip(outs, sig['se'])}):
            if all(max(1, c // ratio) == h for c, h in zip(outs, sig['se'])):
                se_cfg = dict(ratio=ratio)
                break
        else:
            raise CheckpointImportError(
                'SE hidden widths follow no single squeeze ratio: '
                f'{list(sig["se"])}')
    arch = dict(num_blocks=tuple(sig['num_blocks']), width_factor=factors,
                group_layer_map=dict(sig['groups']) or None, se_cfg=se_cfg)
    if arch_signature(arch, sig['in_channels']) != sig:
        raise CheckpointImportError(
            f'cannot express the detected structure ({_describe(sig)}) as a '
            'RepVGG arch dict')
    return arch


def detect_arch(sd: Dict[str, torch.Tensor], deploy: bool,
                allow_custom: bool = False) -> Arch:
    """Name of the published arch whose shapes ``sd`` has, or (with
    ``allow_custom``) an arch dict reproducing them."""
    from mmrepvgg.models import ARCH_SETTINGS
    sig = signature_from_state_dict(sd, deploy)
    for name in ARCH_SETTINGS:
        if arch_signature(name, sig['in_channels']) == sig:
            return name
    if allow_custom:
        return custom_arch(sig)
    raise CheckpointImportError(
        f'the weights match no published RepVGG arch ({_describe(sig)}); '
        'pass --arch NAME to force one or --allow-custom-arch to import '
        'this structure as an arch dict')


# --------------------------------------------------------------- strict load
def build_backbone(arch: Arch, deploy: bool) -> torch.nn.Module:
    """``RepVGG(arch, deploy=deploy)``, on the meta device where supported
    (only shapes are needed: no memory even for D2se)."""
    from mmrepvgg.models import RepVGG
    with _meta_device():
        return RepVGG(arch, deploy=deploy)


def _with_source(keys: Sequence[str], origin: Dict[str, str]) -> List[str]:
    return [f'{k} (from {origin[k]})' if k in origin and origin[k] != k
            else k for k in keys]


def check_strict(sd: 'OrderedDict[str, torch.Tensor]', arch: Arch,
                 deploy: bool, origin: Dict[str, str],
                 fmt: SourceFormat, prefix: str = '',
                 hint: Optional[str] = None
                 ) -> Tuple['OrderedDict[str, torch.Tensor]', List[str]]:
    """Strictly load ``sd`` into a fresh ``RepVGG(arch, deploy=deploy)``.

    Missing ``num_batches_tracked`` buffers (old checkpoints) are filled
    with 0 when the rest of their norm is present. Returns the state dict in
    the model's key order and the list of filled keys.
    """
    try:
        model = build_backbone(arch, deploy)
    except ValueError as e:
        raise CheckpointImportError(f'invalid arch {arch!r}: {e}') from None
    expected = model.state_dict()
    out = OrderedDict(sd)
    filled = []
    for k in expected:
        if k not in out and k.endswith('.num_batches_tracked') and \
                k[:-len('num_batches_tracked')] + 'running_mean' in out:
            out[k] = torch.tensor(0, dtype=torch.long)
            filled.append(k)
    missing = [k for k in expected if k not in out]
    unexpected = [k for k in out if k not in expected]
    shape = [k for k in expected if k in out
             and tuple(out[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            src = {k: source_key(fmt, k, prefix) for k in missing}
            parts.append(f'missing keys ({len(missing)}): ' + _preview(
                [f'{k} (source {src[k]})' if src[k] and src[k] != k else k
                 for k in missing], 3))
        if unexpected:
            parts.append(f'unexpected keys ({len(unexpected)}): ' +
                         _preview(_with_source(unexpected, origin), 3))
        if shape:
            parts.append(f'shape mismatch ({len(shape)}): ' + _preview(
                [f'{n} {tuple(out[k].shape)} vs expected '
                 f'{tuple(expected[k].shape)}'
                 for k, n in zip(shape, _with_source(shape, origin))], 3))
        name = arch if isinstance(arch, str) else 'custom arch'
        form = 'deploy' if deploy else 'training'
        note = f'; {hint}' if hint else ''
        raise CheckpointImportError(
            f'weights do not fit RepVGG {name} ({form} form{note}): ' +
            '; '.join(parts))
    try:
        try:
            model.load_state_dict(out, strict=True, assign=True)
        except TypeError:  # torch < 2.1 has no assign
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                model.load_state_dict(out, strict=True)
    except RuntimeError as e:
        raise CheckpointImportError(
            'strict load into RepVGG failed: '
            f'{" ".join(str(e).split())[:500]}') from None
    ordered = OrderedDict((k, _compact(out[k])) for k in expected)
    return ordered, filled


def _compact(t: torch.Tensor) -> torch.Tensor:
    """Detached tensor that owns exactly its storage (a view of a larger
    storage would otherwise be saved whole)."""
    t = t.detach()
    if t.device.type == 'meta':
        return t
    t = t.contiguous()
    try:
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
    except (AttributeError, RuntimeError):
        t = t.clone()
    return t


# -------------------------------------------------------------------- main
def import_state_dict(obj: Any,
                      arch: Optional[Arch] = None,
                      fmt: Optional[str] = None,
                      allow_custom: bool = False
                      ) -> Tuple['OrderedDict[str, torch.Tensor]', dict]:
    """Convert a loaded RepVGG checkpoint into this backbone's keys.

    Args:
        obj: the loaded checkpoint (a state dict, possibly wrapped in
            ``{'state_dict': ...}`` or ``{'model': ...}``, possibly with
            ``module.`` prefixes).
        arch (str | dict, optional): force the arch; detected from the
            weight shapes by default.
        fmt (str, optional): force the source format ('official', 'timm',
            'mmpretrain', 'mmrepvgg'); detected from the keys by default.
        allow_custom (bool): when no published arch matches the detected
            shapes, return an arch dict reproducing them instead of failing.

    Returns:
        tuple[OrderedDict, dict]: the backbone state dict (keys without a
        ``backbone.`` prefix, in ``RepVGG`` order) and an info dict with
        ``format``, ``arch``, ``deploy``, ``dropped`` (classifier keys),
        ``filled`` (``num_batches_tracked`` added) and ``unwrapped``.

    Raises:
        CheckpointImportError: unknown keys, undetectable or mismatching
            arch, missing / unexpected / mis-shaped keys (all named).
    """
    sd, how = extract_state_dict(obj)
    if fmt is None:
        fmt_name = detect_format(list(sd))
    elif fmt in FORMATS:
        fmt_name = fmt
    else:
        raise CheckpointImportError(
            f'unknown format {fmt!r}; choose one of {list(FORMATS)}')
    spec = FORMATS[fmt_name]

    mapped: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    origin: Dict[str, str] = {}
    dropped, unknown = [], []
    used_prefix = ''
    for k, v in sd.items():
        kind, ours = _parse_key(spec, k)
        if kind == 'drop':
            dropped.append(k)
        elif kind == 'unknown':
            unknown.append(k)
        else:
            if ours in mapped:
                raise CheckpointImportError(
                    f'keys {origin[ours]} and {k} both map to {ours}')
            mapped[ours] = v
            origin[ours] = k
            if k.startswith('backbone.'):
                used_prefix = 'backbone.'
    if unknown:
        raise CheckpointImportError(
            f'{len(unknown)} key(s) not recognised as {spec.name} RepVGG '
            f'weights ({spec.description}): {_preview(unknown)}')
    if not mapped:
        raise CheckpointImportError(
            f'no backbone weights found ({spec.name} layout); keys: '
            f'{_preview(list(sd))}')
    bad = [k for k, v in mapped.items()
           if not (v.is_floating_point() or k.endswith('num_batches_tracked'))]
    if bad:
        raise CheckpointImportError(
            'non floating-point weights: ' + _preview(
                [f'{origin[k]} ({mapped[k].dtype})' for k in bad]))
    broken = first_non_finite(mapped)
    if broken is not None:
        detail = 'a negative variance' if bool(
            torch.isfinite(mapped[broken]).all()) else 'NaN or Inf values'
        raise CheckpointImportError(
            f'{origin[broken]} holds {detail}: the source weights are '
            'broken; nothing imported')

    deploy = detect_deploy(mapped)
    hint = None
    if arch is None:
        arch = detect_arch(mapped, deploy, allow_custom)
    else:  # forced: say what the weights look like if they do not fit
        try:
            guess = detect_arch(mapped, deploy, allow_custom=False)
            if guess != arch:
                hint = f'the weights look like arch {guess}'
        except CheckpointImportError:
            pass
    state, filled = check_strict(mapped, arch, deploy, origin, spec,
                                 used_prefix, hint)
    info = dict(format=fmt_name, format_description=spec.description,
                arch=arch, deploy=deploy, dropped=dropped, filled=filled,
                unwrapped=how['wrapper'],
                stripped_module_prefix=how['stripped_module_prefix'],
                num_tensors=len(state))
    return state, info


def make_checkpoint(state: Dict[str, torch.Tensor], info: dict,
                    source: Optional[str] = None,
                    prefix: str = '') -> dict:
    """``{'meta': {'mmrepvgg': ...}, 'state_dict': ...}`` to be saved.

    Args:
        prefix (str): prepended to every key, e.g. ``'backbone.'`` for use
            as ``load_from`` of a detector; '' (default) for
            ``init_cfg=dict(type='Pretrained', checkpoint=...)`` on the
            backbone.
    """
    arch = info['arch']
    meta = dict(
        version=__version__,
        source_format=info['format'],
        source_checkpoint=osp.abspath(source) if source else None,
        arch=arch if isinstance(arch, str) else _plain(arch),
        deploy=bool(info['deploy']),
        key_prefix=prefix,
        dropped_keys=list(info['dropped']),
        filled_keys=list(info['filled']),
    )
    sd = OrderedDict((prefix + k, v) for k, v in state.items())
    return dict(meta=dict(mmrepvgg=meta), state_dict=sd)


def _plain(obj):
    """Arch dict made of plain lists / dicts / numbers (safe to unpickle)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _preview(keys: Sequence[str], n: int = 6) -> str:
    keys = list(keys)
    more = f' ... (+{len(keys) - n} more)' if len(keys) > n else ''
    return ', '.join(str(k) for k in keys[:n]) + more

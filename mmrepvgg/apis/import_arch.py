"""The RepVGG arch of a state dict, read from its weight shapes."""
import re
from typing import Dict, List, Tuple, Union

import torch

from mmrepvgg.utils.cli import preview
from .import_formats import CheckpointImportError, backbone_layout

Arch = Union[str, dict]

_BASE = 64  # RepVGG base_channels


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
        what = (f'{preview(both)} have both' if both else
                f'fused: {preview(fused, 3)}; multi-branch: '
                f'{preview(branched, 3)}')
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
            f'{preview(without)} but present in other blocks')
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

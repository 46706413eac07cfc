"""Import ImageNet RepVGG weights as :class:`mmrepvgg.RepVGG` state dicts.

Behind ``tools/model_converters/import_checkpoint.py``. Supported source
layouts (detected from the keys, or forced with ``fmt``):

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
  :func:`.import_formats.backbone_layout`).

Wrappers ``{'state_dict': ...}`` / ``{'model': ...}`` and ``module.``
prefixes are removed. The classifier is dropped; every other key must map
onto the backbone (otherwise it is reported by name), and the result must
load strictly into a freshly built ``RepVGG(arch)`` (or ``deploy=True``
when the source is fused): missing, unexpected and mis-shaped keys are
reported by name, with the source key they come from.

The key layouts live in :mod:`.import_formats`, the arch detection from
weight shapes in :mod:`.import_arch`.
"""
import os.path as osp
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mmrepvgg.deploy.verify import first_non_finite
from mmrepvgg.utils.cli import preview
from mmrepvgg.version import __version__
from .convert import extract_state_dict, key_mismatch
from .import_arch import Arch, detect_arch, detect_deploy
from .import_formats import (FORMATS, CheckpointImportError, SourceFormat,
                             detect_format, meta_device, parse_key,
                             source_key)


# --------------------------------------------------------------- strict load
def build_backbone(arch: Arch, deploy: bool) -> torch.nn.Module:
    """``RepVGG(arch, deploy=deploy)``, on the meta device where supported
    (only shapes are needed: no memory even for D2se)."""
    from mmrepvgg.models import RepVGG
    with meta_device():
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
    missing, unexpected, shape, _ = key_mismatch(expected, out)
    if missing or unexpected or shape:
        parts = []
        if missing:
            src = {k: source_key(fmt, k, prefix) for k in missing}
            parts.append(f'missing keys ({len(missing)}): ' + preview(
                [f'{k} (source {src[k]})' if src[k] and src[k] != k else k
                 for k in missing], 3))
        if unexpected:
            parts.append(f'unexpected keys ({len(unexpected)}): ' +
                         preview(_with_source(unexpected, origin), 3))
        if shape:
            parts.append(f'shape mismatch ({len(shape)}): ' + preview(
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
    sd, how = extract_state_dict(obj, CheckpointImportError)
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
        kind, ours = parse_key(spec, k)
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
            f'weights ({spec.description}): {preview(unknown)}')
    if not mapped:
        raise CheckpointImportError(
            f'no backbone weights found ({spec.name} layout); keys: '
            f'{preview(list(sd))}')
    bad = [k for k, v in mapped.items()
           if not (v.is_floating_point() or k.endswith('num_batches_tracked'))]
    if bad:
        raise CheckpointImportError(
            'non floating-point weights: ' + preview(
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

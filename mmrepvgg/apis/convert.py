"""Checkpoint conversion behind ``tools/convert_deploy.py``: build, load
safely, switch every re-parameterizable block, verify backbone, neck and
head outputs, write the deploy checkpoint and its config atomically."""
import copy
import glob
import os.path as osp
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData

from mmrepvgg.deploy import (count_reparam_blocks, load_checkpoint,
                             make_deploy_config, switch_to_deploy)
from mmrepvgg.deploy.config import drop_pretrained, walk_dicts
from mmrepvgg.deploy.switch import count_params, deepcopy_model
from mmrepvgg.deploy.verify import (BLOCK_FP64_TOL, NOISE_FACTOR,
                                    NonFiniteError, blockwise_fp64_error,
                                    check_finite, describe, flatten_outputs,
                                    judge_fp32)
from mmrepvgg.utils.cli import (ToolError, error_message, merge_cfg_options,
                                preview)
from mmrepvgg.utils.fileio import atomic_write_group, check_output_paths
from mmrepvgg.version import __version__

#: Largest verification input side accepted (--shape).
MAX_SIDE = 4096


class ConvertError(ToolError):
    """Conversion refused; the message names the file, key or argument."""


# ----------------------------------------------------------------- loading
def extract_state_dict(obj, error: type = ConvertError
                       ) -> 'OrderedDict[str, torch.Tensor]':
    """The flat state dict inside a loaded checkpoint: up to three
    ``state_dict`` / ``model`` wrappers and ``module.`` prefixes removed."""
    for depth in range(4):
        if not isinstance(obj, dict):
            raise error(
                f'not a checkpoint: a {type(obj).__name__}, expected a dict '
                'of tensors (or a dict with "state_dict" / "model")')
        if not obj:
            raise error('empty state dict')
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        key = next((k for k in ('state_dict', 'model')
                    if isinstance(obj.get(k), dict)), None)
        if key is None or depth == 3:
            raise error('no state dict of tensors found; non-tensor entries: '
                        + preview(f'{k} ({type(v).__name__})'
                                  for k, v in obj.items()
                                  if not isinstance(v, torch.Tensor)))
        obj = obj[key]
    sd: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    for k, v in obj.items():
        if not isinstance(k, str):
            raise error(f'state dict key {k!r} is not a str')
        name = k
        while name.startswith('module.'):
            name = name[len('module.'):]
        if name in sd:
            raise error(f'key {name} appears twice (with and without '
                        '"module.")')
        sd[name] = v
    return sd


def read_state_dict(path: str, unsafe_load: bool = False
                    ) -> Tuple[Dict[str, torch.Tensor], dict]:
    """``(state_dict, meta)`` of a checkpoint file, loaded safely; sparse,
    meta, complex or non-finite tensors and negative variances refused."""
    ckpt = load_checkpoint(path, map_location='cpu', unsafe=unsafe_load)
    try:
        sd = extract_state_dict(ckpt)
    except ConvertError as e:
        raise ConvertError(f'{path}: {e}') from None
    for k, v in sd.items():
        if v.layout != torch.strided:
            raise ConvertError(f'{path}: {k} is a {v.layout} tensor; '
                               'expected a dense tensor')
        if v.is_meta:
            raise ConvertError(f'{path}: {k} is a meta tensor (no data)')
        if v.is_complex():
            raise ConvertError(f'{path}: {k} is complex ({v.dtype}); '
                               'expected real weights')
    check_finite(sd, path)
    meta = ckpt.get('meta')
    return sd, meta if isinstance(meta, dict) else {}


def is_deploy_state_dict(sd: Dict[str, torch.Tensor]) -> bool:
    """True if ``sd`` holds fused blocks and no multi-branch block."""
    return (any('.conv_reparam.' in k for k in sd)
            and not any('.branch_3x3.' in k for k in sd))


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    if not osp.isfile(path):
        raise ConvertError(f'{path}: config file does not exist')
    try:
        cfg = Config.fromfile(path)
    except Exception as e:  # syntax errors, missing _base_, bad imports
        raise ConvertError(f'{path}: cannot load config '
                           f'({error_message(e)})') from None
    merge_cfg_options(cfg, cfg_options)
    if 'model' not in cfg:
        raise ConvertError(f'{path}: config has no "model"')
    return cfg


def build_model(cfg: Config) -> nn.Module:
    from mmdet.registry import MODELS
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model_cfg = copy.deepcopy(cfg.model)
    # The checkpoint supplies every weight: never read init_cfg files here.
    walk_dicts(model_cfg, drop_pretrained)
    return MODELS.build(model_cfg)


def key_mismatch(own: Dict[str, torch.Tensor],
                 sd: Dict[str, torch.Tensor],
                 name: Callable[[str], str] = str
                 ) -> Tuple[List[str], List[str], List[str], str]:
    """``(missing, unexpected, mis-shaped, description)`` of loading ``sd``
    into a model whose state dict is ``own`` (description '' if none; keys
    shown as ``name(key)``)."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(own[k].shape) != tuple(
        getattr(sd[k], 'shape', ()))]
    sizes = {k: f' {tuple(sd[k].shape)} vs {tuple(own[k].shape)}'
             for k in shape}
    problem = '; '.join(
        f'{what}: ' + preview([name(k) + sizes.get(k, '') for k in keys])
        for what, keys in (('missing keys', missing),
                           ('unexpected keys', unexpected),
                           ('shape mismatch', shape)) if keys)
    return missing, unexpected, shape, problem


def load_weights(model: nn.Module, sd: Dict[str, torch.Tensor],
                 path: str, config: str) -> None:
    """Strict load; a mismatch lists the missing/unexpected keys."""
    problem = key_mismatch(model.state_dict(), sd)[3]
    if problem:
        raise ConvertError(f'{path} does not match config {config}: ' +
                           problem)
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------- verifying
def test_input_shape(cfg: Config) -> Tuple[int, int]:
    """``(H, W)`` of the config's test resize (padded to the preprocessor's
    size divisor), or 640x640 when the config has none."""
    h = w = 640
    pipeline = cfg.get('test_pipeline') or cfg.get('test_dataloader', {}).get(
        'dataset', {}).get('pipeline', [])
    for step in pipeline or []:
        if step.get('type') == 'Resize' and step.get('scale'):
            scale = step['scale']
            w, h = (scale, scale) if isinstance(scale, int) else scale[:2]
            if step.get('keep_ratio'):
                h, w = min(h, w), max(h, w)
            break
    div = cfg.model.get('data_preprocessor', {}).get('pad_size_divisor', 32)
    div = max(1, div or 1)
    return -(-h // div) * div, -(-w // div) * div


def make_inputs(shape: Tuple[int, int],
                seed: int = 0) -> Tuple[torch.Tensor, list]:
    """A random image batch of one ``(H, W)`` image and its sample."""
    from mmdet.structures import DetDataSample
    h, w = shape
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                batch_input_shape=(h, w), scale_factor=(1.0, 1.0))
    return x, [DetDataSample(metainfo=meta)]


def _random_proposals(x: torch.Tensor, n: int = 64) -> list:
    g = torch.Generator().manual_seed(0)
    h, w = x.shape[2:]
    results = []
    for _ in range(x.shape[0]):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        boxes = torch.cat([xy, (xy + wh + 8).minimum(torch.tensor([w, h]))],
                          1)
        results.append(InstanceData(bboxes=boxes.to(x)))
    return results


@torch.no_grad()
def collect_outputs(model: nn.Module, x: torch.Tensor,
                    samples: list) -> Dict[str, torch.Tensor]:
    """Every tensor produced by backbone, neck and heads, by name."""
    if not hasattr(model, 'backbone'):
        return flatten_outputs(model(x))
    feats = model.backbone(x)
    out = flatten_outputs(feats, 'backbone')
    if getattr(model, 'neck', None) is not None:
        feats = model.neck(feats)
        out.update(flatten_outputs(feats, 'neck'))
    for name in ('bbox_head', 'rpn_head'):
        head = getattr(model, name, None)
        if head is not None:
            out.update(flatten_outputs(head(feats), name))
    roi_head = getattr(model, 'roi_head', None)
    if roi_head is not None:
        out.update(flatten_outputs(roi_head.forward(
            feats, _random_proposals(x), samples), 'roi_head'))
    return out


def verify_models(model: nn.Module, fused: nn.Module, x: torch.Tensor,
                  samples: list, factor: float = NOISE_FACTOR,
                  what: str = 'model') -> dict:
    """:func:`~mmrepvgg.deploy.verify.judge_fp32`'s verdict on every
    backbone/neck/head output of ``fused`` against ``model``, with every
    block of ``model`` fused in float64 on its real input exact to
    :data:`BLOCK_FP64_TOL`."""
    outs = {}
    block_err, block_name = blockwise_fp64_error(
        model, lambda: outs.__setitem__(
            'ref', collect_outputs(model, x, samples)))
    ref = outs['ref']
    new = collect_outputs(fused, x, samples)
    if list(ref) != list(new):
        raise ConvertError('converted model produces different outputs: '
                           f'{preview(ref)} vs {preview(new)}')
    for k, a in ref.items():
        if a.shape != new[k].shape:
            raise ConvertError(f'output {k} changed shape: {tuple(a.shape)} '
                               f'-> {tuple(new[k].shape)}')
    if x.dtype != torch.float32:
        raise ConvertError(f'verification runs in float32, got {x.dtype}')
    truth = collect_outputs(deepcopy_model(model).double(), x.double(),
                            samples)
    try:
        verdict = judge_fp32(truth, ref, new, factor=factor)
    except NonFiniteError as e:
        raise ConvertError(f'{what}: the unconverted model itself gives '
                           f'non-finite outputs ({e})') from None
    verdict['block_fp64'], verdict['block'] = block_err, block_name
    if not block_err <= BLOCK_FP64_TOL:
        verdict['passed'] = False
        verdict['criterion'] += (
            f'; AND block {block_name} fused in float64 differs by '
            f'{block_err:.3g} > {BLOCK_FP64_TOL:g}')
    return verdict


# ------------------------------------------------------------------ convert
def check_options(shape: Optional[Sequence[int]], factor: float) -> None:
    """Bounds of ``--shape`` and ``--noise-factor``."""
    if shape is not None and (len(shape) != 2 or not all(
            isinstance(v, int) and 1 <= v <= MAX_SIDE for v in shape)):
        raise ConvertError(f'--shape must be two integers in [1, '
                           f'{MAX_SIDE}], got {list(shape)}')
    if not 1 <= factor < float('inf'):
        raise ConvertError(f'--noise-factor must be a finite number >= 1, '
                           f'got {factor}')


def deploy_paths(output: str) -> Tuple[str, str]:
    """``(checkpoint, config)`` paths written for ``output`` (a .pth)."""
    if not output.endswith('.pth'):
        raise ConvertError(f'{output}: OUTPUT must end with .pth')
    return output, osp.splitext(output)[0] + '.py'


def convert_checkpoint(cfg: Config,
                       config_path: str,
                       checkpoint: str,
                       output: str,
                       shape: Optional[Tuple[int, int]] = None,
                       factor: float = NOISE_FACTOR,
                       verify: bool = True,
                       unsafe_load: bool = False) -> dict:
    """Convert one checkpoint; returns a report dict. The checkpoint and its
    config are written as one group once every check passed."""
    out_ckpt, out_cfg = deploy_paths(output)
    check_output_paths([(checkpoint, 'input checkpoint'),
                        (config_path, 'input config')],
                       [out_ckpt, out_cfg], ConvertError)
    check_options(shape, factor)
    sd, meta = read_state_dict(checkpoint, unsafe_load)
    if is_deploy_state_dict(sd):
        raise ConvertError(f'{checkpoint}: already in deploy form '
                           '(conv_reparam weights, no branches); nothing to '
                           'convert')
    model = build_model(cfg)
    blocks = count_reparam_blocks(model)['total']
    if blocks == 0:
        raise ConvertError(f'{config_path}: the model has no RepVGG '
                           '(re-parameterizable) block to convert')
    load_weights(model, sd, checkpoint, config_path)
    model.eval()
    fused = switch_to_deploy(model, inplace=False, verbose=False)

    def convs(m):
        return sum(isinstance(c, nn.modules.conv._ConvNd)
                   for c in m.modules())

    shape = tuple(shape) if shape else test_input_shape(cfg)
    report = dict(checkpoint=checkpoint, output=out_ckpt, config=out_cfg,
                  blocks=blocks, shape=shape,
                  params_before=count_params(model),
                  params_after=count_params(fused),
                  convs_before=convs(model), convs_after=convs(fused))
    if verify:
        x, samples = make_inputs(shape)
        verdict = verify_models(model, fused, x, samples, factor=factor,
                                what=checkpoint)
        report['verify'] = verdict
        if not verdict['passed']:
            raise ConvertError(
                f'{checkpoint}: conversion check failed: '
                f'{describe(verdict)}; nothing written')

    # The deploy config must rebuild exactly this model (strict load).
    from mmdet.registry import MODELS
    deploy_cfg = make_deploy_config(cfg, MODELS.get,
                                    load_from=osp.abspath(out_ckpt))
    state = OrderedDict((k, v.detach().cpu()) for k, v in
                        fused.state_dict().items())
    try:
        build_model(deploy_cfg).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConvertError(f'{config_path}: deploy config does not match the '
                           f'converted model ({str(e).splitlines()[0]})')
    new_meta = dict(meta, mmrepvgg=dict(
        deploy=True, version=__version__,
        source_checkpoint=osp.abspath(checkpoint),
        source_config=osp.abspath(config_path), blocks_converted=blocks))
    text = deploy_cfg.pretty_text
    atomic_write_group([
        (out_ckpt, lambda tmp: torch.save(
            dict(meta=new_meta, state_dict=state), tmp)),
        (out_cfg, lambda tmp: _write_text(tmp, text))])
    report['size_before'] = osp.getsize(checkpoint)
    report['size_after'] = osp.getsize(out_ckpt)
    return report


def _write_text(path: str, text: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)


def find_checkpoints(spec: str) -> List[str]:
    """A file, a folder (its ``*.pth``) or a glob pattern -> sorted files."""
    if osp.isdir(spec):
        files = sorted(glob.glob(osp.join(spec, '*.pth')))
    elif any(c in spec for c in '*?['):
        files = sorted(f for f in glob.glob(spec) if osp.isfile(f))
    else:
        return [spec]
    if not files:
        raise ConvertError(f'{spec}: no checkpoint (*.pth) found')
    return files

"""Checkpoint conversion pipeline behind ``tools/convert_deploy.py``.

Build the model from a config, load a trained checkpoint safely, switch every
re-parameterizable block, verify outputs of backbone, neck and heads on random
inputs, and write the deploy checkpoint and its config atomically.
"""
import copy
import os
import os.path as osp
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData

from mmrepvgg.deploy import (atomic_write, count_reparam_blocks,
                             load_checkpoint, make_deploy_config,
                             save_checkpoint, switch_to_deploy)
from mmrepvgg.deploy.config import drop_pretrained, walk_dicts
from mmrepvgg.utils.cli import ToolError
from mmrepvgg.version import __version__


class ConvertError(ToolError):
    """Conversion refused; the message names the file, key or argument."""


# ----------------------------------------------------------------- loading
def extract_state_dict(ckpt, path: str) -> Tuple[Dict[str, torch.Tensor],
                                                 dict]:
    """``(state_dict, meta)`` of a loaded checkpoint object."""
    if not isinstance(ckpt, dict):
        raise ConvertError(f'{path}: not a checkpoint (a {type(ckpt).__name__}'
                           ', expected a dict with a state_dict)')
    meta = ckpt.get('meta', {}) if isinstance(ckpt.get('meta'), dict) else {}
    for key in ('state_dict', 'model'):
        if isinstance(ckpt.get(key), dict):
            sd = ckpt[key]
            break
    else:
        sd = ckpt
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConvertError(f'{path}: no state_dict of tensors found (keys: '
                           f'{_preview(list(ckpt))})')
    if all(k.startswith('module.') for k in sd):
        sd = OrderedDict((k[len('module.'):], v) for k, v in sd.items())
    return sd, meta


def read_state_dict(path: str, unsafe_load: bool = False
                    ) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Safely load a checkpoint file; ``(state_dict, meta)``.

    Raises:
        CheckpointError / ConvertError: naming ``path``.
    """
    ckpt = load_checkpoint(path, map_location='cpu', unsafe=unsafe_load)
    return extract_state_dict(ckpt, path)


def is_deploy_state_dict(sd: Dict[str, torch.Tensor]) -> bool:
    """True if ``sd`` holds fused blocks and no multi-branch block."""
    keys = list(sd)
    return (any('.conv_reparam.' in k for k in keys)
            and not any('.branch_3x3.' in k for k in keys))


def _preview(keys: Sequence[str], n: int = 6) -> str:
    keys = list(keys)
    more = f' ... (+{len(keys) - n} more)' if len(keys) > n else ''
    return ', '.join(keys[:n]) + more


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    if not osp.isfile(path):
        raise ConvertError(f'{path}: config file does not exist')
    try:
        cfg = Config.fromfile(path)
    except Exception as e:  # syntax errors, missing _base_, bad imports
        raise ConvertError(f'{path}: cannot load config ({type(e).__name__}: '
                           f'{str(e).splitlines()[0] if str(e) else ""})')
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
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


def load_weights(model: nn.Module, sd: Dict[str, torch.Tensor],
                 path: str, config: str) -> None:
    """Strict load; a mismatch lists the missing/unexpected keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f'missing keys: {_preview(missing)}')
        if unexpected:
            parts.append(f'unexpected keys: {_preview(unexpected)}')
        if shape:
            parts.append('shape mismatch: ' + _preview(
                [f'{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}'
                 for k in shape]))
        raise ConvertError(f'{path} does not match config {config}: ' +
                           '; '.join(parts))
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
            if isinstance(scale, int):
                h = w = scale
            else:
                w, h = scale[0], scale[1]
            if step.get('keep_ratio'):
                h, w = min(h, w), max(h, w)
            break
    div = cfg.model.get('data_preprocessor', {}).get('pad_size_divisor', 32)
    div = max(1, div or 1)
    return -(-h // div) * div, -(-w // div) * div


def make_inputs(shape: Tuple[int, int], batch: int = 1, seed: int = 0,
                device: str = 'cpu') -> Tuple[torch.Tensor, list]:
    from mmdet.structures import DetDataSample
    g = torch.Generator().manual_seed(seed)
    h, w = shape
    x = torch.randn(batch, 3, h, w, generator=g).to(device)
    samples = []
    for _ in range(batch):
        s = DetDataSample()
        s.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w),
                            pad_shape=(h, w), batch_input_shape=(h, w),
                            scale_factor=(1.0, 1.0)))
        samples.append(s)
    return x, samples


def _flatten(prefix: str, obj, out: Dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(f'{prefix}.{i}', v, out)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f'{prefix}.{k}', v, out)


def _random_proposals(shape, batch, n=64, seed=0, device='cpu'):
    g = torch.Generator().manual_seed(seed)
    h, w = shape
    results = []
    for _ in range(batch):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        wh = wh + 8
        boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1)
        results.append(InstanceData(bboxes=boxes.to(device)))
    return results


@torch.no_grad()
def collect_outputs(model: nn.Module, x: torch.Tensor,
                    samples: list) -> Dict[str, torch.Tensor]:
    """Every tensor produced by backbone, neck and heads, by name."""
    out: Dict[str, torch.Tensor] = OrderedDict()
    if not hasattr(model, 'backbone'):
        _flatten('output', model(x), out)
        return out
    feats = model.backbone(x)
    _flatten('backbone', feats, out)
    if getattr(model, 'neck', None) is not None:
        feats = model.neck(feats)
        _flatten('neck', feats, out)
    for name in ('bbox_head', 'rpn_head'):
        head = getattr(model, name, None)
        if head is not None:
            _flatten(name, head(feats), out)
    roi_head = getattr(model, 'roi_head', None)
    if roi_head is not None:
        proposals = _random_proposals(x.shape[2:], x.shape[0],
                                      device=x.device)
        _flatten('roi_head', roi_head.forward(feats, proposals, samples), out)
    return out


def compare_outputs(ref: Dict[str, torch.Tensor],
                    new: Dict[str, torch.Tensor]) -> dict:
    """Max absolute and relative (max|a-b| / max|a|, per tensor) errors."""
    if list(ref) != list(new):
        raise ConvertError('converted model produces different outputs: '
                           f'{_preview(list(ref))} vs {_preview(list(new))}')
    worst = dict(max_abs=0.0, max_rel=0.0, worst='')
    for k, a in ref.items():
        b = new[k]
        if a.shape != b.shape:
            raise ConvertError(f'output {k} changed shape: {tuple(a.shape)} '
                               f'-> {tuple(b.shape)}')
        a64, b64 = a.double(), b.double()
        diff = (a64 - b64).abs().max().item() if a.numel() else 0.0
        scale = a64.abs().max().item() if a.numel() else 0.0
        rel = diff / scale if scale > 0 else diff
        worst['max_abs'] = max(worst['max_abs'], diff)
        if rel >= worst['max_rel']:
            worst['max_rel'], worst['worst'] = rel, k
    worst['num_outputs'] = len(ref)
    return worst


# ------------------------------------------------------------------ summary
def count_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def measure_latency(models: Sequence[nn.Module], x: torch.Tensor,
                    samples: list, repeats: int = 5,
                    warmup: int = 2) -> List[float]:
    """Median seconds of one tensor-mode forward (no post-processing) of
    each model, measured interleaved (A B A B ...) so that machine load
    affects every model alike."""
    fns = [_tensor_forward(m) for m in models]
    for _ in range(warmup):
        for fn in fns:
            fn(x, samples)
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(x, samples)
            if x.is_cuda:
                torch.cuda.synchronize()
            t.append(time.perf_counter() - t0)
    return [sorted(t)[len(t) // 2] for t in times]


def _tensor_forward(model):
    if hasattr(model, '_forward'):
        return lambda x, s: model._forward(x, s)
    return lambda x, s: model(x)


# ------------------------------------------------------------------ convert
def deploy_paths(output: str) -> Tuple[str, str]:
    """``(checkpoint, config)`` paths written for ``output``."""
    return output, osp.splitext(output)[0] + '.py'


def convert_checkpoint(cfg: Config,
                       config_path: str,
                       checkpoint: str,
                       output: str,
                       shape: Optional[Tuple[int, int]] = None,
                       device: str = 'cpu',
                       tolerance: float = 1e-5,
                       verify: bool = True,
                       unsafe_load: bool = False,
                       latency_repeats: int = 3) -> dict:
    """Convert one checkpoint; returns a report dict.

    Nothing is written unless every check passed; both files are written
    atomically.

    Raises:
        ConvertError: with a one-line message naming the file/key at fault.
    """
    out_ckpt, out_cfg = deploy_paths(output)
    if osp.abspath(out_ckpt) == osp.abspath(checkpoint) or (
            osp.exists(out_ckpt) and osp.exists(checkpoint)
            and osp.samefile(out_ckpt, checkpoint)):
        raise ConvertError(f'{out_ckpt}: refusing to overwrite the input '
                           'checkpoint; choose another OUTPUT')
    if osp.abspath(out_cfg) == osp.abspath(config_path):
        raise ConvertError(f'{out_cfg}: refusing to overwrite the input '
                           'config; choose another OUTPUT')
    if not output.endswith('.pth'):
        raise ConvertError(f'{output}: OUTPUT must end with .pth')
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
    model.to(device).eval()
    fused = switch_to_deploy(model, inplace=False, verbose=False)

    report = dict(checkpoint=checkpoint, output=out_ckpt, config=out_cfg,
                  blocks=blocks,
                  params_before=count_params(model),
                  params_after=count_params(fused),
                  convs_before=count_convs(model),
                  convs_after=count_convs(fused))
    shape = tuple(shape) if shape else test_input_shape(cfg)
    x, samples = make_inputs(shape, device=device)
    report['shape'] = shape
    if verify:
        errs = compare_outputs(collect_outputs(model, x, samples),
                               collect_outputs(fused, x, samples))
        report.update(errs)
        if not errs['max_rel'] <= tolerance:
            raise ConvertError(
                f'{checkpoint}: converted outputs differ by relative error '
                f'{errs["max_rel"]:.3g} (at {errs["worst"]}) > tolerance '
                f'{tolerance:g}; nothing written')
    if latency_repeats > 0:
        report['latency_before'], report['latency_after'] = measure_latency(
            [model, fused], x, samples, latency_repeats)

    # The deploy config must rebuild exactly this model (strict load).
    from mmdet.registry import MODELS
    deploy_cfg = make_deploy_config(cfg, MODELS.get,
                                    load_from=osp.abspath(out_ckpt))
    state = OrderedDict((k, v.detach().cpu()) for k, v in
                        fused.state_dict().items())
    twin = build_model(deploy_cfg)
    try:
        twin.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConvertError(f'{config_path}: deploy config does not match the '
                           f'converted model ({str(e).splitlines()[0]})')

    new_meta = dict(meta)
    new_meta['mmrepvgg'] = dict(deploy=True, version=__version__,
                                source_checkpoint=osp.abspath(checkpoint),
                                source_config=osp.abspath(config_path),
                                blocks_converted=blocks)
    save_checkpoint(dict(meta=new_meta, state_dict=state), out_ckpt)
    try:
        text = deploy_cfg.pretty_text
        atomic_write(out_cfg, lambda tmp: _write_text(tmp, text))
    except BaseException:
        os.remove(out_ckpt)  # never leave half of the pair behind
        raise
    report['size_before'] = osp.getsize(checkpoint)
    report['size_after'] = osp.getsize(out_ckpt)
    return report


def _write_text(path: str, text: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)


def find_checkpoints(spec: str) -> List[str]:
    """A file, a folder (its ``*.pth``) or a glob pattern -> sorted files."""
    import glob
    if osp.isdir(spec):
        files = sorted(glob.glob(osp.join(spec, '*.pth')))
    elif any(c in spec for c in '*?['):
        files = sorted(f for f in glob.glob(spec) if osp.isfile(f))
    else:
        return [spec]
    if not files:
        raise ConvertError(f'{spec}: no checkpoint (*.pth) found')
    return files

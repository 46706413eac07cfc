"""mmdet's dense-head post-processing (``predict_by_feat``,
``rescale=False``) as traceable tensor code: outputs ``dets`` (N, K, 5) and
``labels`` (N, K), padded with zero rows and label -1 (mmdeploy's layout).
Every data-dependent selection is a fixed-size one with a validity mask
(dropped candidates score -1), so the module runs unchanged in PyTorch and
traces with dynamic batch, height and width (``docs/deployment.md``).
"""
import copy
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmrepvgg.utils.cli import ToolError

#: Score of dropped candidates (real scores are >= 0).
INVALID = -1.0
#: NonMaxSuppression's score threshold: below every real score.
NMS_SCORE_FLOOR = -0.5
#: Bounds of ``test_cfg.max_per_img`` (and of evaluated ``dets`` rows) and
#: of ``test_cfg.nms_pre``.
MAX_PER_IMG = 1000
MAX_NMS_PRE = 100000
#: ``metadata_props`` key of the baked-in settings (JSON).
METADATA_KEY = 'mmrepvgg.postprocess'


class PostProcessError(ToolError):
    """The head or its ``test_cfg`` has no exact in-graph equivalent."""


class OnnxNMS(torch.autograd.Function):
    """ONNX ``NonMaxSuppression``; eager, mmcv's ``nms`` per image and
    class with the same semantics. Returns ``(S, 3)`` rows ``(batch, class,
    box)``."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_output: Tensor,
                iou_threshold: Tensor, score_threshold: Tensor) -> Tensor:
        from mmcv.ops import nms
        k, iou = int(max_output), float(iou_threshold)
        thr = float(score_threshold)
        rows = []
        for b in range(scores.shape[0]):
            for c in range(scores.shape[1]):
                s = scores[b, c]
                idx = torch.nonzero(s > thr).flatten()
                if idx.numel() == 0:
                    continue
                _, keep = nms(boxes[b, idx].float(), s[idx].float(), iou)
                keep = idx[keep[:k]]
                rows.append(torch.stack([
                    torch.full_like(keep, b), torch.full_like(keep, c),
                    keep], 1))
        if not rows:
            return torch.zeros((0, 3), dtype=torch.long)
        return torch.cat(rows).long()

    @staticmethod
    def symbolic(g, boxes, scores, max_output, iou_threshold,
                 score_threshold):
        return g.op('NonMaxSuppression', boxes, scores, max_output,
                    iou_threshold, score_threshold, center_point_box_i=0)


def check_fraction(value, name: str) -> float:
    """``value`` as a float if it is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 <= value <= 1:
        raise PostProcessError(f'{name}={value!r}: must be a number in '
                               '[0, 1]')
    return float(value)


def check_count(value, name: str, bound: int) -> int:
    """``value`` if it is an int in [1, ``bound``]."""
    if isinstance(value, bool) or not isinstance(value, int) or \
            not 1 <= value <= bound:
        raise PostProcessError(f'{name}={value!r}: must be an int in [1, '
                               f'{bound}]')
    return value


def check_head(head: nn.Module) -> None:
    """Raise :class:`PostProcessError` unless the graph reproduces
    ``head``'s post-processing exactly."""
    from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
    from mmdet.models.task_modules.coders import (DeltaXYWHBBoxCoder,
                                                  DistancePointBBoxCoder)
    from mmdet.models.task_modules.prior_generators import (
        AnchorGenerator, MlvlPointGenerator)
    name = type(head).__name__
    if not isinstance(head, BaseDenseHead):
        raise PostProcessError(f'{name} is not a dense head')
    for fn in ('predict_by_feat', '_predict_by_feat_single',
               '_bbox_post_process'):
        if getattr(type(head), fn) is not getattr(BaseDenseHead, fn):
            raise PostProcessError(
                f'{name} overrides {fn}: its post-processing is not '
                "mmdet's generic dense-head one, which is what the graph "
                'reproduces (RetinaNet, FCOS, ATSS and alike)')
    gen = getattr(head, 'prior_generator', None)
    if type(gen) not in (AnchorGenerator, MlvlPointGenerator):
        raise PostProcessError(
            f'{name}: prior generator {type(gen).__name__} is not supported '
            '(AnchorGenerator or MlvlPointGenerator)')
    coder = getattr(head, 'bbox_coder', None)
    pair = {AnchorGenerator: DeltaXYWHBBoxCoder,
            MlvlPointGenerator: DistancePointBBoxCoder}[type(gen)]
    if type(coder) is not pair:
        raise PostProcessError(
            f'{name}: box coder {type(coder).__name__} with '
            f'{type(gen).__name__} is not supported ({pair.__name__})')
    if any(getattr(m, 'use_box_type', False) for m in (coder, gen)):
        raise PostProcessError(f'{name}: use_box_type=True is not '
                               'supported')
    if getattr(head.loss_cls, 'custom_cls_channels', False):
        raise PostProcessError(f'{name}: custom class channels (v3det) are '
                               'not supported')
    if head.test_cfg is None:
        raise PostProcessError(f'{name} has no test_cfg')
    check_test_cfg(head.test_cfg)


def check_test_cfg(cfg) -> None:
    """Raise :class:`PostProcessError` naming the key unless ``test_cfg``
    has an exact in-graph equivalent with sane sizes and thresholds."""
    cfg = cfg if hasattr(cfg, 'get') else {}
    nms_pre = cfg.get('nms_pre', -1)
    if not (isinstance(nms_pre, int) and nms_pre > 0):
        raise PostProcessError(
            f'test_cfg.nms_pre={nms_pre!r}: must be a positive int (mmdet '
            'keeps nms_pre candidates per level; set it with --cfg-options '
            'model.test_cfg.nms_pre=1000)')
    check_count(nms_pre, 'test_cfg.nms_pre', MAX_NMS_PRE)
    check_count(cfg.get('max_per_img'), 'test_cfg.max_per_img', MAX_PER_IMG)
    check_fraction(cfg.get('score_thr', 0), 'test_cfg.score_thr')
    size = cfg.get('min_bbox_size', -1)
    if isinstance(size, bool) or not isinstance(size, (int, float)) or \
            not math.isfinite(size):
        raise PostProcessError(
            f'test_cfg.min_bbox_size={size!r}: must be a finite number (a '
            'negative one keeps every box, as in mmdet)')
    nms = cfg.get('nms')
    if not isinstance(nms, dict):
        raise PostProcessError(f'test_cfg.nms={nms!r}: a dict is needed (a '
                               'graph without NMS is not supported)')
    if nms.get('type', 'nms') != 'nms':
        raise PostProcessError(
            f'test_cfg.nms.type={nms.get("type")!r}: only "nms" has an ONNX '
            'equivalent (NonMaxSuppression)')
    extra = set(nms) - {'type', 'iou_threshold', 'class_agnostic',
                        'split_thr'}
    if extra:
        raise PostProcessError(f'test_cfg.nms: options {sorted(extra)} are '
                               'not supported (iou_threshold, '
                               'class_agnostic)')
    if 'iou_threshold' not in nms:
        raise PostProcessError('test_cfg.nms.iou_threshold is missing')
    check_fraction(nms['iou_threshold'], 'test_cfg.nms.iou_threshold')


def describe_settings(s: dict) -> str:
    """One line of the baked-in settings, for the export report."""
    nms = (f'nms iou {s["iou_threshold"]:g}'
           f'{" class-agnostic" if s["class_agnostic"] else ""}')
    size = (f', min_bbox_size {s["min_bbox_size"]:g}'
            if s['min_bbox_size'] >= 0 else '')
    return (f'score_thr {s["score_thr"]:g}, nms_pre {s["nms_pre"]} per '
            f'level, {nms}, max_per_img {s["max_per_img"]}{size}; '
            f'{s["num_classes"]} classes ({s["activation"]}), '
            f'{s["priors"]} strides '
            f'{",".join(str(st[0]) for st in s["strides"])}, {s["coder"]}')


class DensePostProcess(nn.Module):
    """mmdet's ``predict_by_feat`` (``rescale=False``) of a dense head
    (settings copied, not referenced)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        check_head(head)
        cfg, gen = head.test_cfg, head.prior_generator
        nms = cfg.get('nms')
        self.settings = dict(  # baked into the graph
            score_thr=float(cfg.get('score_thr', 0)),
            nms_pre=int(cfg.get('nms_pre')),
            iou_threshold=float(nms['iou_threshold']),
            class_agnostic=bool(nms.get('class_agnostic', False)),
            max_per_img=int(cfg.get('max_per_img')),
            min_bbox_size=float(cfg.get('min_bbox_size', -1)),
            num_classes=int(head.num_classes),
            activation='sigmoid' if head.use_sigmoid_cls else 'softmax',
            priors=type(gen).__name__,
            strides=[tuple(int(v) for v in s) for s in gen.strides],
            coder=type(head.bbox_coder).__name__,
            clip_border=bool(getattr(head.bbox_coder, 'clip_border', True)))
        for key in ('score_thr', 'nms_pre', 'iou_threshold', 'class_agnostic',
                    'max_per_img', 'min_bbox_size', 'num_classes',
                    'clip_border'):
            setattr(self, key, self.settings[key])
        self.use_sigmoid = head.use_sigmoid_cls
        self.cls_out_channels = int(head.cls_out_channels)
        # mmdet's own priors and box decoding, traced with dynamic sizes
        self.prior_generator = copy.deepcopy(head.prior_generator)
        self.coder = copy.deepcopy(head.bbox_coder)

    def _decode(self, priors: Tensor, pred: Tensor, max_w: Tensor,
                max_h: Tensor) -> Tensor:
        """``(N, M, 4)`` boxes; ``max_w``/``max_h``: ``(N, 1)`` bounds."""
        from mmdet.models.task_modules.coders import delta_xywh_bbox_coder
        c = self.coder
        if type(c) is delta_xywh_bbox_coder.DeltaXYWHBBoxCoder:
            # mmdet's arithmetic, unclipped: the bounds differ per image
            x1, y1, x2, y2 = delta_xywh_bbox_coder.delta2bbox(
                priors.reshape(-1, 4), pred.reshape(-1, 4), c.means, c.stds,
                None, 16 / 1000, False, c.add_ctr_clamp,
                c.ctr_clamp).reshape(pred.shape).unbind(-1)
        else:
            x1 = priors[..., 0] - pred[..., 0]
            y1 = priors[..., 1] - pred[..., 1]
            x2 = priors[..., 0] + pred[..., 2]
            y2 = priors[..., 1] + pred[..., 3]
        if self.clip_border:
            x1, x2 = (torch.minimum(v.clamp(min=0), max_w) for v in (x1, x2))
            y1, y2 = (torch.minimum(v.clamp(min=0), max_h) for v in (y1, y2))
        return torch.stack([x1, y1, x2, y2], -1)

    def _level(self, cls: Tensor, reg: Tensor, factor: Optional[Tensor],
               level: int):
        """Top ``nms_pre`` (location, class) pairs of one level."""
        n = cls.shape[0]
        scores = cls.permute(0, 2, 3, 1).reshape(n, -1,
                                                 self.cls_out_channels)
        if self.use_sigmoid:
            scores = scores.sigmoid()
        else:
            scores = scores.softmax(-1)[..., :-1]
        reg = reg.permute(0, 2, 3, 1).reshape(n, -1, 4)
        flat = scores.reshape(n, -1)
        flat = torch.where(flat > self.score_thr, flat,
                           flat.new_full((), INVALID))
        # pad so that nms_pre candidates exist at any feature map size; the
        # padding (and every pair at or below score_thr) stays invalid
        flat = F.pad(flat, (0, self.nms_pre), value=INVALID)
        top_scores, top_idx = flat.topk(self.nms_pre, dim=1)
        valid = top_scores >= 0
        top_idx = torch.where(valid, top_idx, torch.zeros_like(top_idx))
        prior_idx = torch.div(top_idx, self.num_classes,
                              rounding_mode='floor')
        labels = top_idx - prior_idx * self.num_classes
        reg = torch.gather(reg, 1, prior_idx[..., None].expand(-1, -1, 4))
        priors = self.prior_generator.single_level_grid_priors(
            cls.shape[-2:], level, cls.dtype, cls.device)[prior_idx]
        if factor is not None:
            factor = factor.permute(0, 2, 3, 1).reshape(n, -1).sigmoid()
            factor = torch.gather(factor, 1, prior_idx)
        return top_scores, labels, valid, reg, priors, factor

    def forward(self, outs: Sequence[Sequence[Tensor]], x: Tensor,
                img_shape: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(dets, labels)`` of the head's outputs ``outs``; boxes clipped
        to ``img_shape`` ``(N, 2)`` if given, else to ``x``'s size."""
        cls_scores, bbox_preds = outs[0], outs[1]
        factors = outs[2] if len(outs) > 2 else [None] * len(cls_scores)
        if img_shape is None:
            n = x.shape[0]
            max_h = x.new_ones((n, 1)) * x.shape[2]
            max_w = x.new_ones((n, 1)) * x.shape[3]
        else:
            shape = img_shape.to(x.dtype)
            max_h, max_w = shape[:, 0:1], shape[:, 1:2]
        levels = zip(cls_scores, bbox_preds, factors)
        parts: List[tuple] = [
            self._level(c, r, f, i) for i, (c, r, f) in enumerate(levels)
        ]
        scores, labels, valid, reg, priors = (
            torch.cat([p[i] for p in parts], 1) for i in range(5))
        boxes = self._decode(priors, reg, max_w, max_h)
        if parts[0][5] is not None:
            scores = scores * torch.cat([p[5] for p in parts], 1)
        if self.min_bbox_size >= 0:
            w = boxes[..., 2] - boxes[..., 0]
            h = boxes[..., 3] - boxes[..., 1]
            valid = valid & (w > self.min_bbox_size) & (
                h > self.min_bbox_size)
        scores = torch.where(valid, scores, scores.new_full((), INVALID))
        return self._nms(boxes, scores, labels, valid)

    def _nms(self, boxes: Tensor, scores: Tensor, labels: Tensor,
             valid: Tensor) -> Tuple[Tensor, Tensor]:
        if self.class_agnostic:
            nms_boxes = boxes
        else:
            # mmcv's batched_nms: offsets by label * (max coordinate + 1),
            # the maximum over this image's (valid) boxes
            masked = torch.where(valid[..., None], boxes,
                                 boxes.new_full((), -math.inf))
            top = masked.flatten(1).max(1, keepdim=True)[0]
            top = torch.where(valid.any(1, keepdim=True), top,
                              torch.zeros_like(top))
            offsets = labels.to(boxes.dtype) * (top + 1)
            nms_boxes = boxes + offsets[..., None]
        k = self.max_per_img
        sel = OnnxNMS.apply(nms_boxes, scores[:, None, :],
                            torch.tensor([k], dtype=torch.long),
                            torch.tensor([self.iou_threshold]),
                            torch.tensor([NMS_SCORE_FLOOR]))
        b, i = sel[:, 0], sel[:, 2]
        kept = torch.full_like(scores, INVALID)
        kept[b, i] = scores[b, i]
        kept = F.pad(kept, (0, k), value=INVALID)
        top_scores, top_idx = kept.topk(k, dim=1)
        ok = top_scores >= 0
        top_idx = torch.where(ok, top_idx, torch.zeros_like(top_idx))
        out_boxes = torch.gather(boxes, 1,
                                 top_idx[..., None].expand(-1, -1, 4))
        out_boxes = torch.where(ok[..., None], out_boxes,
                                torch.zeros_like(out_boxes))
        out_scores = torch.where(ok, top_scores, torch.zeros_like(top_scores))
        out_labels = torch.gather(labels, 1, top_idx)
        out_labels = torch.where(ok, out_labels,
                                 torch.full_like(out_labels, -1))
        dets = torch.cat([out_boxes, out_scores[..., None]], -1)
        return dets, out_labels


class End2EndDetector(nn.Module):
    """Preprocessed batch (and with ``with_img_shape`` each image's valid
    ``(h, w)``, to clip boxes to) -> ``(dets, labels)`` of a single-stage
    detector; ``with_raw``: also the head's raw outputs, flattened."""

    def __init__(self, detector: nn.Module, with_img_shape: bool = False,
                 with_raw: bool = False) -> None:
        super().__init__()
        self.detector = detector
        self.postprocess = DensePostProcess(detector.bbox_head)
        self.with_img_shape = with_img_shape
        self.with_raw = with_raw

    def forward(self, x: Tensor, img_shape: Optional[Tensor] = None):
        outs = self.detector.bbox_head(self.detector.extract_feat(x))
        if len(outs) not in (2, 3):
            raise PostProcessError(
                f'{type(self.detector.bbox_head).__name__}.forward returns '
                f'{len(outs)} outputs; expected (cls_scores, bbox_preds[, '
                'score_factors])')
        dets, labels = self.postprocess(
            outs, x, img_shape if self.with_img_shape else None)
        if not self.with_raw:
            return dets, labels
        raw = [t for group in outs for t in group]
        return (dets, labels) + tuple(raw)

    def raw_names(self, x: Tensor) -> List[str]:
        """Names of the raw outputs (``raw{group}_{level}``)."""
        with torch.no_grad():
            outs = self.detector.bbox_head(self.detector.extract_feat(x))
        return [f'raw{g}_{i}' for g, group in enumerate(outs)
                for i in range(len(group))]

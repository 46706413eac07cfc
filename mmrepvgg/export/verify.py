"""Checking an exported graph against the PyTorch model it came from.

Raw tensors (backbone features, head outputs) are judged by the float32-noise
criterion of :func:`mmrepvgg.deploy.verify.judge_fp32`: the truth is the
PyTorch model evaluated in float64, the reference its float32 evaluation,
the candidate onnxruntime's float32 output (``tolerance`` replaces the
criterion by a fixed relative bound). NaN or infinite outputs never pass.

Detections are compared as sets per image: a detection of one side matches
one of the other with the same label, every box coordinate within
``box_tol`` pixels and the score within ``score_tol``. Images whose
detections do not all match are listed, never hidden.
"""
import contextlib
import copy
import io
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from mmrepvgg.deploy.verify import (NOISE_FACTOR, flatten_outputs, judge_fp32,
                                    relative_error)
from .loading import ExportError

#: Default largest difference of a box coordinate for two detections to be
#: the same, relative to the input's larger side (float32 noise of the head
#: outputs, amplified by the exponential of the box decoding, moves boxes by
#: about 1e-5 of the image size)...
BOX_TOL_REL = 1e-4
#: ... but never less than this many pixels.
BOX_TOL_MIN = 0.01
#: Default largest score difference for two detections to be the same.
SCORE_TOL = 1e-4


# --------------------------------------------------------------- raw tensors
def judge_raw(truth: Sequence[torch.Tensor],
              reference: Sequence[torch.Tensor],
              candidate: Sequence[np.ndarray],
              names: Sequence[str],
              tag: str,
              factor: float = NOISE_FACTOR,
              tolerance: Optional[float] = None) -> Dict[str, Any]:
    """:func:`judge_fp32` of onnxruntime's outputs.

    The levels of one head output (``out0_0``, ``out0_1``, ...) are judged
    together, flattened into one tensor named ``out0@tag``: the coarsest
    levels hold a handful of values (1x1 at stride 128 of a 128x128 input),
    too few for their own float32 noise to be measured reliably.

    Raises:
        ExportError: output count or shapes differ (dynamic axes broken).
    """
    if len(candidate) != len(reference):
        raise ExportError(f'onnxruntime returned {len(candidate)} outputs, '
                          f'PyTorch {len(reference)}')
    groups: 'OrderedDict[str, list]' = OrderedDict()
    for name, a, b, d in zip(names, truth, reference, candidate):
        if tuple(b.shape) != tuple(d.shape):
            raise ExportError(
                f'output {name} at input {tag}: onnxruntime shape '
                f'{tuple(d.shape)} != PyTorch {tuple(b.shape)} (dynamic '
                'axes broken)')
        key = f'{output_group(name)}@{tag}'
        groups.setdefault(key, []).append(
            (a.detach().cpu().flatten(), b.detach().cpu().flatten(),
             torch.from_numpy(np.asarray(d)).flatten()))
    t, r, c = OrderedDict(), OrderedDict(), OrderedDict()
    for key, parts in groups.items():
        t[key] = torch.cat([p[0] for p in parts])
        r[key] = torch.cat([p[1] for p in parts])
        c[key] = torch.cat([p[2] for p in parts])
    return judge_fp32(t, r, c, factor=factor, tolerance=tolerance)


def output_group(name: str) -> str:
    """``out0_3`` -> ``out0`` (levels of one head output); other names
    stay."""
    base, _, level = name.rpartition('_')
    return base if base and level.isdigit() else name


def merge_verdicts(verdicts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One verdict over several inputs: the worst one, with the maxima."""
    worst = max(verdicts, key=_score)
    merged = dict(worst)
    merged['passed'] = all(v['passed'] for v in verdicts)
    for k in ('max_error', 'max_noise', 'max_ratio'):
        merged[k] = max(v[k] for v in verdicts)
    merged['num_outputs'] = sum(v['num_outputs'] for v in verdicts)
    return merged


def _score(v: Dict[str, Any]) -> float:
    allowed = v['tolerance'] if v['tolerance'] is not None else \
        v['factor'] * max(v['noise'], 1e-30)
    return float('inf') if not v['passed'] else v['error'] / max(allowed,
                                                                 1e-300)


def noisier(truth: Mapping[str, torch.Tensor],
            *references: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Per output name, the float32 reference furthest from ``truth``
    (``relative_error``): the float32 noise of a network is that of every
    kernel family it may run on (see :class:`TruthAndReference`)."""
    return {k: max((r[k] for r in references),
                   key=lambda v, t=t: relative_error(t, v))
            for k, t in truth.items()}


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels_last when it is 4-D, else unchanged."""
    return x.contiguous(memory_format=torch.channels_last) \
        if x.dim() == 4 else x


class TruthAndReference:
    """A module's outputs in float64 (the truth) and float32 (the
    reference), flattened; the float64 and channels_last copies are made
    once.

    The float32 reference of each output is the module's run, contiguous or
    channels_last, that is further from the truth there
    (:func:`noisier`): oneDNN's NHWC kernels, which OpenVINO and
    ``torch.compile`` use, round differently from its NCHW ones, and both
    are this network's float32 noise on this CPU (measured:
    ``docs/exactness.md``).

    Args:
        module (nn.Module): the float32 PyTorch model (eval mode).
    """

    def __init__(self, module: nn.Module) -> None:
        from mmrepvgg.deploy.switch import deepcopy_model
        self.module = module
        self.twin = deepcopy_model(module).double().eval()
        self.nhwc = deepcopy_model(module).to(
            memory_format=torch.channels_last).eval()

    @torch.no_grad()
    def named(self, *inputs: torch.Tensor
              ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """``(truth, reference)`` by output name (``output.0`` ...)."""
        truth = flatten_outputs(self.twin(*(x.double() for x in inputs)))
        ref = noisier(truth, flatten_outputs(self.module(*inputs)),
                      flatten_outputs(self.nhwc(*map(as_channels_last,
                                                     inputs))))
        return truth, ref

    def __call__(self, *inputs: torch.Tensor
                 ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        truth, ref = self.named(*inputs)
        return list(truth.values()), list(ref.values())


# ---------------------------------------------------------------- detections
def box_tolerance(shape: Sequence[int], box_tol: Optional[float] = None
                  ) -> float:
    """``box_tol`` if given, else the default for an input of ``shape``
    (``(..., H, W)``): :data:`BOX_TOL_REL` of the larger side, at least
    :data:`BOX_TOL_MIN` pixels."""
    if box_tol is not None:
        return float(box_tol)
    return max(BOX_TOL_MIN, BOX_TOL_REL * max(int(shape[-2]),
                                              int(shape[-1])))


def split_dets(dets: np.ndarray, labels: np.ndarray
               ) -> List[Dict[str, np.ndarray]]:
    """Per image ``bboxes``/``scores``/``labels`` of the padded graph
    outputs (rows with label ``-1`` dropped)."""
    out = []
    for d, lab in zip(np.asarray(dets), np.asarray(labels)):
        keep = lab >= 0
        out.append(dict(bboxes=d[keep, :4].astype(np.float64),
                        scores=d[keep, 4].astype(np.float64),
                        labels=lab[keep].astype(np.int64)))
    return out


def instances_to_numpy(results: Sequence[Any]) -> List[Dict[str, np.ndarray]]:
    """``bboxes``/``scores``/``labels`` of mmdet ``InstanceData`` or
    ``DetDataSample`` results."""
    out = []
    for r in results:
        inst = getattr(r, 'pred_instances', r)
        out.append(dict(
            bboxes=inst.bboxes.detach().cpu().double().numpy().reshape(-1, 4),
            scores=inst.scores.detach().cpu().double().numpy().reshape(-1),
            labels=inst.labels.detach().cpu().numpy().astype(np.int64)))
    return out


def dumped_detections(path: str) -> List[Dict[str, Any]]:
    """Per image ``img_path`` and float64/int64 ``bboxes``/``scores``/
    ``labels`` of a ``tools/test.py --out`` pickle (mmdet's
    ``DumpDetResults``; a file our own run wrote, unpickled as such)."""
    import pickle
    with open(path, 'rb') as f:
        results = pickle.load(f)
    return [dict(img_path=r['img_path'],
                 bboxes=np.asarray(r['pred_instances']['bboxes'],
                                   np.float64).reshape(-1, 4),
                 scores=np.asarray(r['pred_instances']['scores'],
                                   np.float64).reshape(-1),
                 labels=np.asarray(r['pred_instances']['labels'],
                                   np.int64).reshape(-1)) for r in results]


def _match_image(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
                 box_tol: float, score_tol: float):
    """Greedy one-to-one matching of ``a``'s detections (best first) to
    ``b``'s. Returns ``(pairs, unmatched_a, unmatched_b)``."""
    used = np.zeros(len(b['labels']), bool)
    pairs, lonely_a = [], []
    for i in range(len(a['labels'])):
        same = (b['labels'] == a['labels'][i]) & ~used
        box = np.abs(b['bboxes'] - a['bboxes'][i]).max(1)
        score = np.abs(b['scores'] - a['scores'][i])
        ok = same & (box <= box_tol) & (score <= score_tol)
        if not ok.any():
            lonely_a.append(i)
            continue
        j = int(np.where(ok, box, np.inf).argmin())
        used[j] = True
        pairs.append((i, j, float(box[j]), float(score[j])))
    return pairs, lonely_a, [int(j) for j in np.where(~used)[0]]


def compare_detections(candidate: Sequence[Mapping[str, np.ndarray]],
                       reference: Sequence[Mapping[str, np.ndarray]],
                       box_tol: float = BOX_TOL_MIN,
                       score_tol: float = SCORE_TOL,
                       first_image: int = 0) -> Dict[str, Any]:
    """Per-image comparison of two detection lists.

    Returns:
        dict: ``images``, ``detections`` (candidate), ``reference_detections``,
        ``matched``, ``max_box`` (px) and ``max_score`` over matched pairs,
        ``differing`` (list of ``(image, text)``) and ``unmatched`` (count
        of detections of either side without a partner), ``finite``.
    """
    res = dict(merge_comparisons([]), images=len(candidate))
    for k, (a, b) in enumerate(zip(candidate, reference)):
        res['detections'] += len(a['labels'])
        res['reference_detections'] += len(b['labels'])
        if not (np.isfinite(a['bboxes']).all()
                and np.isfinite(a['scores']).all()):
            res['finite'] = False
            res['differing'].append(
                (first_image + k, 'non-finite boxes or scores'))
            continue
        pairs, la, lb = _match_image(a, b, box_tol, score_tol)
        res['matched'] += len(pairs)
        res['max_box'] = max([res['max_box']] + [p[2] for p in pairs])
        res['max_score'] = max([res['max_score']] + [p[3] for p in pairs])
        if la or lb:
            res['unmatched'] += len(la) + len(lb)
            res['differing'].append(
                (first_image + k, _describe_lonely(a, b, la, lb)))
    return res


def _describe_lonely(a, b, la: List[int], lb: List[int], n: int = 3) -> str:

    def fmt(d, idx):
        items = [f'label {int(d["labels"][i])} score '
                 f'{float(d["scores"][i]):.4f} box '
                 f'[{", ".join(f"{v:.1f}" for v in d["bboxes"][i])}]'
                 for i in idx[:n]]
        more = f' (+{len(idx) - n})' if len(idx) > n else ''
        return '; '.join(items) + more

    parts = [f'{len(a["labels"])} vs {len(b["labels"])} detections']
    if la:
        parts.append(f'only in ONNX: {fmt(a, la)}')
    if lb:
        parts.append(f'only in PyTorch: {fmt(b, lb)}')
    return ', '.join(parts)


def merge_comparisons(items: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Sum of :func:`compare_detections` results over several batches."""
    out = dict(images=0, detections=0, reference_detections=0, matched=0,
               max_box=0.0, max_score=0.0, differing=[], unmatched=0,
               finite=True)
    for r in items:
        for k in ('images', 'detections', 'reference_detections', 'matched',
                  'unmatched'):
            out[k] += r[k]
        for k in ('max_box', 'max_score'):
            out[k] = max(out[k], r[k])
        out['differing'] += r['differing']
        out['finite'] = out['finite'] and r['finite']
    return out


def describe_comparison(r: Mapping[str, Any], what: str) -> str:
    """One line: counts, worst differences, differing images."""
    text = (f'{what}: {r["images"] - len(r["differing"])}/{r["images"]} '
            f'images identical, {r["matched"]}/{r["detections"]} detections '
            f'matched (max box diff {r["max_box"]:.2g} px, max score diff '
            f'{r["max_score"]:.2g})')
    if r['differing']:
        first = r['differing'][0]
        text += (f'; {len(r["differing"])} image(s) differ, e.g. image '
                 f'{first[0]}: {first[1]}')
    return text


# ------------------------------------------------------------ mmdet results
def make_samples(shapes: Sequence[Tuple[int, int]],
                 batch_shape: Tuple[int, int]) -> list:
    """``DetDataSample``s with ``img_shape`` per image, no rescaling."""
    from mmdet.structures import DetDataSample
    samples = []
    for h, w in shapes:
        s = DetDataSample()
        s.set_metainfo(dict(img_shape=(int(h), int(w)),
                            ori_shape=(int(h), int(w)),
                            pad_shape=tuple(batch_shape),
                            batch_input_shape=tuple(batch_shape),
                            scale_factor=(1.0, 1.0)))
        samples.append(s)
    return samples


@torch.no_grad()
def mmdet_predict(model: nn.Module, x: torch.Tensor,
                  samples: list) -> List[Dict[str, np.ndarray]]:
    """mmdet's own ``model.predict(x, samples, rescale=False)``."""
    return instances_to_numpy(model.predict(x, samples, rescale=False))


@torch.no_grad()
def mmdet_postprocess(head: nn.Module, raw: Sequence[np.ndarray],
                      levels: int, samples: list
                      ) -> List[Dict[str, np.ndarray]]:
    """mmdet's ``predict_by_feat`` (``rescale=False``) on given raw head
    outputs (flat list: class scores, box regressions[, score factors], each
    over ``levels``)."""
    ts = [torch.from_numpy(np.asarray(r)) for r in raw]
    groups = [ts[i:i + levels] for i in range(0, len(ts), levels)]
    metas = [s.metainfo for s in samples]
    return instances_to_numpy(head.predict_by_feat(
        *groups, batch_img_metas=metas, rescale=False))


def dataset_batch(cfg, model: nn.Module, num: int
                  ) -> Tuple[Optional[torch.Tensor], Optional[list], str]:
    """The first ``num`` images of the config's test set through its
    pipeline and the model's data preprocessor: ``(inputs, samples,
    note)``; ``(None, None, reason)`` when the dataset cannot be read."""
    if num <= 0:
        return None, None, 'dataset images disabled'
    try:
        from mmdet.registry import DATASETS
        from mmengine.dataset import pseudo_collate
        from mmengine.registry import init_default_scope
        init_default_scope(cfg.get('default_scope', 'mmdet'))
        loader = cfg.get('test_dataloader') or cfg.get('val_dataloader')
        if not loader:
            return None, None, 'no test_dataloader in the config'
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools
            dataset = DATASETS.build(copy.deepcopy(loader['dataset']))
        items = [dataset[i] for i in range(min(num, len(dataset)))]
        if not items:
            return None, None, 'the test set is empty'
        data = model.data_preprocessor(pseudo_collate(items), False)
    except Exception as e:  # missing files, unknown dataset types
        text = str(e).strip().splitlines()
        return None, None, (f'test set not readable ({type(e).__name__}: '
                            f'{text[0] if text else ""})')
    return data['inputs'].float(), data['data_samples'], \
        f'{len(items)} test-set image(s)'

"""An exported graph against the PyTorch model it came from: raw tensors
by :func:`mmrepvgg.deploy.verify.judge_fp32`, detections matched per image
(same label, box and score within tolerances; differing images listed).
"""
from typing import (Any, Dict, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import numpy as np
import torch
import torch.nn as nn

from mmrepvgg.deploy.verify import flatten_outputs, relative_error
from .loading import ExportError

#: Default box tolerance: this fraction of the input's larger side (float32
#: noise amplified by the box decoding's exponential) ...
BOX_TOL_REL = 1e-4
#: ... but never less than this many pixels.
BOX_TOL_MIN = 0.01
#: Default largest score difference for two detections to be the same.
SCORE_TOL = 1e-4


def raw_groups(truth: Mapping[str, torch.Tensor],
               reference: Mapping[str, torch.Tensor],
               candidate: Sequence[np.ndarray],
               names: Sequence[str],
               tag: str) -> Tuple[Dict[str, torch.Tensor], ...]:
    """``(truth, reference, candidate)`` for :func:`judge_fp32`, the levels
    of one head output (``out0_0``, ``out0_1`` ...) as one tensor
    ``out0@tag`` (a coarse level alone is too small to measure its noise).
    """
    if len(candidate) != len(reference):
        raise ExportError(f'onnxruntime returned {len(candidate)} outputs, '
                          f'PyTorch {len(reference)}')
    groups: Dict[str, list] = {}
    for name, a, b, d in zip(names, truth.values(), reference.values(),
                             candidate):
        if tuple(b.shape) != tuple(d.shape):
            raise ExportError(
                f'output {name} at input {tag}: onnxruntime shape '
                f'{tuple(d.shape)} != PyTorch {tuple(b.shape)} (dynamic '
                'axes broken)')
        base, _, level = name.rpartition('_')
        key = f'{base if base and level.isdigit() else name}@{tag}'
        groups.setdefault(key, []).append(
            (a.detach().cpu().flatten(), b.detach().cpu().flatten(),
             torch.from_numpy(np.asarray(d)).flatten()))
    return tuple({k: torch.cat([p[i] for p in v]) for k, v in groups.items()}
                 for i in range(3))


def noisier(truth: Mapping[str, torch.Tensor],
            *references: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Per output name, the float32 reference furthest from ``truth``."""
    return {k: max((r[k] for r in references),
                   key=lambda v, t=t: relative_error(t, v))
            for k, t in truth.items()}


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels_last when it is 4-D, else unchanged."""
    return x.contiguous(memory_format=torch.channels_last) \
        if x.dim() == 4 else x


class TruthAndReference:
    """A module's outputs in float64 (the truth) and float32 (the
    reference: the contiguous or channels_last run, whichever is further
    from the truth, as oneDNN's NHWC kernels round differently)."""

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


def box_tolerance(shape: Sequence[int]) -> float:
    """The default box tolerance of an input of ``shape`` (``..., H, W``).
    """
    return max(BOX_TOL_MIN, BOX_TOL_REL * max(map(int, shape[-2:])))


def _detections(bboxes, scores, labels, **extra) -> Dict[str, Any]:
    return dict(extra, bboxes=np.asarray(bboxes, np.float64).reshape(-1, 4),
                scores=np.asarray(scores, np.float64).reshape(-1),
                labels=np.asarray(labels, np.int64).reshape(-1))


def split_dets(dets: np.ndarray, labels: np.ndarray
               ) -> List[Dict[str, np.ndarray]]:
    """Per image ``bboxes``/``scores``/``labels`` of the padded graph
    outputs (label ``-1`` rows dropped)."""
    return [_detections(d[lab >= 0, :4], d[lab >= 0, 4], lab[lab >= 0])
            for d, lab in zip(np.asarray(dets), np.asarray(labels))]


def instances_to_numpy(results: Sequence[Any]) -> List[Dict[str, np.ndarray]]:
    """The same of mmdet ``InstanceData`` or ``DetDataSample`` results."""
    insts = [getattr(r, 'pred_instances', r) for r in results]
    return [_detections(*(getattr(i, k).detach().cpu().double().numpy()
                          for k in ('bboxes', 'scores', 'labels')))
            for i in insts]


def dumped_detections(path: str) -> List[Dict[str, Any]]:
    """The same, with ``img_path``, of a ``tools/test.py --out`` pickle our
    own run wrote."""
    import pickle
    with open(path, 'rb') as f:
        results = pickle.load(f)
    keys = ('bboxes', 'scores', 'labels')
    return [_detections(*(r['pred_instances'][k] for k in keys),
                        img_path=r['img_path']) for r in results]


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
                       box_tol: Union[float, Sequence[float]] = BOX_TOL_MIN,
                       score_tol: float = SCORE_TOL) -> Dict[str, Any]:
    """Per-image comparison of two detection lists (``box_tol``: one or
    one per image): counts, worst matched differences, ``differing``
    ``(image, text)`` pairs, ``unmatched`` detections of either side,
    ``finite``."""
    res = dict(images=len(candidate), detections=0, reference_detections=0,
               matched=0, max_box=0.0, max_score=0.0, differing=[],
               unmatched=0, finite=True)
    tols = np.broadcast_to(box_tol, (len(candidate), ))
    for k, (a, b, tol) in enumerate(zip(candidate, reference, tols)):
        res['detections'] += len(a['labels'])
        res['reference_detections'] += len(b['labels'])
        if not (np.isfinite(a['bboxes']).all()
                and np.isfinite(a['scores']).all()):
            res['finite'] = False
            res['differing'].append((k, 'non-finite boxes or scores'))
            continue
        pairs, la, lb = _match_image(a, b, float(tol), score_tol)
        res['matched'] += len(pairs)
        res['max_box'] = max([res['max_box']] + [p[2] for p in pairs])
        res['max_score'] = max([res['max_score']] + [p[3] for p in pairs])
        if la or lb:
            res['unmatched'] += len(la) + len(lb)
            res['differing'].append((k, _describe_lonely(a, b, la, lb)))
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
    """mmdet's ``predict_by_feat`` (``rescale=False``) on the flat list of
    raw head outputs (each group over ``levels``)."""
    ts = [torch.from_numpy(np.asarray(r)) for r in raw]
    groups = [ts[i:i + levels] for i in range(0, len(ts), levels)]
    metas = [s.metainfo for s in samples]
    return instances_to_numpy(head.predict_by_feat(
        *groups, batch_img_metas=metas, rescale=False))


def dataset_batch(cfg, model: nn.Module, num: int
                  ) -> Tuple[Optional[torch.Tensor], Optional[list], str]:
    """``(inputs, samples, note)`` of ``num`` test-set images (evenly
    spread, the first when 1) preprocessed as one batch; ``(None, None,
    reason)`` when the set cannot be read."""
    from .quantize.calibration import preprocessed
    if num <= 0:
        return None, None, 'dataset images disabled'
    try:
        ((x, samples), ), info = preprocessed(cfg, 'test', num,
                                              model.data_preprocessor, True)
    except Exception as e:  # missing files, unknown dataset types
        text = str(e).strip().splitlines()
        return None, None, (f'test set not readable ({type(e).__name__}: '
                            f'{text[0] if text else ""})')
    return x, samples, f'{info["images"]} test-set image(s)'

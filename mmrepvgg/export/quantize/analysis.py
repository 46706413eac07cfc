"""What INT8 costs: an INT8 graph against its FP32 graph on the same inputs,
per output (:func:`compare_sessions`), per detection
(:func:`detection_agreement`) and per conv layer (:func:`layer_errors`)."""
import copy
import math
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from mmrepvgg.deploy.verify import relative_error
from .calibration import QuantizeError, as_feeds
from .static import FOLDED_ACTIVATIONS, consumers, load, producers


class ErrorStats:
    """SQNR and the largest :func:`relative_error` of one tensor over
    several samples, in float64."""

    def __init__(self) -> None:
        self.signal = self.noise = self.rel_err = 0.0
        self.samples = 0

    def add(self, reference: np.ndarray, test: np.ndarray) -> 'ErrorStats':
        ref = np.asarray(reference, dtype=np.float64)
        tst = np.asarray(test, dtype=np.float64)
        self.rel_err = max(self.rel_err, relative_error(ref, tst))
        self.samples += 1
        if math.isfinite(self.rel_err):
            self.signal += float(np.sum(ref**2))
            self.noise += float(np.sum((ref - tst)**2))
        return self

    @property
    def sqnr_db(self) -> float:
        """``10 log10(sum ref^2 / sum (ref - test)^2)``; ``nan`` once a
        sample held a NaN or infinity."""
        if not math.isfinite(self.rel_err):
            return math.nan
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """SQNR (dB) of ``test`` against ``reference``."""
    return ErrorStats().add(reference, test).sqnr_db


def _run_pairs(fp32_model, int8_model, ftensors: Sequence[str],
               qtensors: Sequence[str], inputs: Sequence,
               threads: Optional[int]):
    """Per input its feed, the FP32 graph's ``ftensors`` and the INT8
    graph's ``qtensors`` (made graph outputs)."""
    import onnx

    from ..runtime import input_names, make_session
    sessions = []
    for model, tensors in ((fp32_model, ftensors), (int8_model, qtensors)):
        model = copy.deepcopy(load(model))
        have = {o.name for o in model.graph.output}
        model.graph.output.extend(
            onnx.helper.make_empty_tensor_value_info(t)
            for t in dict.fromkeys(tensors) if t not in have)
        sessions.append(make_session(model.SerializeToString(), threads))
    fsess, qsess = sessions
    for feed in as_feeds(inputs, input_names(fsess)):
        yield (feed, fsess.run(list(ftensors), feed),
               qsess.run(list(qtensors), feed))


def dequantized_name(int8_model, tensor: str) -> Optional[str]:
    """The dequantized copy of float ``tensor`` in a QDQ graph, or the
    tensor itself where it stays float (else ``None``)."""
    graph = load(int8_model).graph
    read_by = consumers(graph)
    for q in read_by.get(tensor, []):
        for dq in read_by.get(q.output[0], []):
            if (q.op_type, dq.op_type) == ('QuantizeLinear',
                                           'DequantizeLinear'):
                return dq.output[0]
    return tensor if tensor in producers(graph) else None


def compare_sessions(fp32_model,
                     int8_model,
                     inputs: Sequence,
                     extra_tensors: Sequence[str] = (),
                     threads: Optional[int] = None,
                     outputs: bool = True) -> Dict[str, dict]:
    """Per graph output (unless ``outputs`` is False) and per float tensor
    of ``extra_tensors`` (in the INT8 graph: :func:`dequantized_name`), the
    INT8 graph against the FP32 graph on ``inputs``: name -> ``sqnr_db``,
    ``rel_err``, ``samples``, ``kind`` (``output`` or ``boundary``)."""
    fp32_model, int8_model = load(fp32_model), load(int8_model)
    outs = [o.name for o in fp32_model.graph.output] if outputs else []
    extra = [t for t in extra_tensors if t not in outs]
    q_extra = [dequantized_name(int8_model, t) for t in extra]
    if None in q_extra:
        raise QuantizeError(f'tensor {extra[q_extra.index(None)]} is not in '
                            'the INT8 graph')
    names = outs + extra
    if not names:
        raise QuantizeError('nothing to compare')
    stats = [ErrorStats() for _ in names]
    for _, a, b in _run_pairs(fp32_model, int8_model, names,
                              outs + q_extra, inputs, threads):
        for s, x, y in zip(stats, a, b):
            s.add(x, y)
    return {name: dict(sqnr_db=s.sqnr_db, rel_err=s.rel_err,
                       samples=s.samples,
                       kind='output' if name in outs else 'boundary')
            for name, s in zip(names, stats)}


#: INT8 detections match FP32 ones within this fraction of the input's
#: larger side (boxes) and this score difference.
DET_BOX_TOL_REL = 0.01
DET_SCORE_TOL = 0.05


def detection_agreement(fp32_path: str, int8_path: str, inputs: Sequence,
                        threads: Optional[int] = None) -> dict:
    """:func:`~mmrepvgg.export.verify.compare_detections` of an end-to-end
    INT8 graph's ``dets``, ``labels`` against the FP32 graph's, summed over
    ``inputs``, plus ``box_tol`` and ``score_tol``."""
    from ..verify import compare_detections, split_dets
    ours, ref, tols = [], [], []
    dets = ['dets', 'labels']
    for feed, a, b in _run_pairs(fp32_path, int8_path, dets, dets, inputs,
                                 threads):
        x = next(iter(feed.values()))
        tols += [DET_BOX_TOL_REL * max(x.shape[-2:])] * x.shape[0]
        ours += split_dets(*b)
        ref += split_dets(*a)
    return dict(compare_detections(ours, ref, tols, DET_SCORE_TOL),
                box_tol=max(tols), score_tol=DET_SCORE_TOL)


def layer_name(node_name: str) -> str:
    """Module path of an exported node: ``/model/stage_1/stage_1.0/
    conv_reparam/Conv`` -> ``stage_1.0.conv_reparam`` (the export wrappers'
    ``model`` / ``detector`` scopes dropped)."""
    parts = [p for p in node_name.strip('/').split('/') if p][:-1]
    while len(parts) > 1 and parts[0] in ('model', 'detector'):
        parts = parts[1:]
    path = []
    for p in parts:  # torch scopes repeat the parent: stage_1/stage_1.0
        if path and p.startswith(path[-1] + '.'):
            path[-1] = p
        else:
            path.append(p)
    return '.'.join(path) or node_name


def layer_errors(fp32_path: str,
                 int8_path: str,
                 inputs: Sequence,
                 threads: Optional[int] = None) -> List[dict]:
    """Per quantized ``Conv`` a row: ``layer`` (module path), ``node``,
    ``out_channels``, ``sqnr_db`` of its INT8 activation (after a folded
    activation) against FP32, accumulated (``qdq_loss_debug``'s
    ``xmodel_err``, streamed); ``weight_sqnr_db`` (``qdq_loss_debug``) and
    ``w_peak_over_mean`` (max/mean |w| of the worst output channel)."""
    from onnxruntime.quantization import qdq_loss_debug as dbg
    fp, qm = load(fp32_path), load(int8_path)
    read_by = consumers(fp.graph)
    weights = dbg.create_weight_matching(str(fp32_path), str(int8_path))
    w_sqnr = dbg.compute_weight_error(weights)
    rows, acts = [], []
    for conv in (n for n in fp.graph.node if n.op_type == 'Conv'):
        act = conv.output[0]
        nxt = read_by.get(act, [])
        if len(nxt) == 1 and nxt[0].op_type in FOLDED_ACTIVATIONS:
            act = nxt[0].output[0]
        if dequantized_name(qm, act) is None:
            continue
        weight = conv.input[1]
        row = dict(layer=layer_name(conv.name), node=conv.name,
                   out_channels=None, weight_sqnr_db=w_sqnr.get(weight))
        if weight in weights:
            w = weights[weight]['float']
            flat = np.abs(w.reshape(w.shape[0], -1).astype(np.float64))
            mean = flat.mean(axis=1)
            row.update(out_channels=int(w.shape[0]), w_peak_over_mean=float(
                (flat.max(axis=1) / np.where(mean > 0, mean, 1)).max()))
        rows.append(row)
        acts.append(act)
    if not rows:
        raise QuantizeError('no quantized Conv layer found (is the INT8 graph '
                            'a QDQ graph of the FP32 graph?)')
    errors = compare_sessions(fp, qm, inputs, acts, threads, outputs=False)
    for row, act in zip(rows, acts):
        row['sqnr_db'] = errors[act]['sqnr_db']
    return rows


def format_layer_table(reports: Mapping[str, Sequence[dict]]) -> str:
    """Markdown table of :func:`layer_errors` rows of several graphs side
    by side (``{label: rows}``), layers matched by position."""
    if not reports:
        return ''
    keys = ('sqnr_db', 'weight_sqnr_db', 'w_peak_over_mean')
    head = ['layer'] + [f'{lab} {col}' for lab in reports
                        for col in ('SQNR dB', 'weight dB', 'max/mean |w|')]
    lines = ['| ' + ' | '.join(head) + ' |',
             '|---|' + '---:|' * (len(head) - 1)]
    for i in range(max(len(r) for r in reports.values())):
        cells = [next(r[i] for r in reports.values() if i < len(r))['layer']]
        for rows in reports.values():
            r = rows[i] if i < len(rows) else {}
            cells += ['n/a' if r.get(k) is None else f'{r[k]:.1f}'
                      for k in keys]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)

"""What INT8 costs: an INT8 graph against its FP32 graph on the same inputs.

* :func:`compare_sessions`: per output, SQNR (dB) and relative error; for an
  end-to-end detector also on the *boundary* tensors (the head's raw
  outputs, :func:`~.static.boundary_tensors`), which keep their shape when
  the post-processing keeps a different number of boxes;
* :func:`detection_agreement`: detections of the two graphs matched;
* :func:`layer_errors`: per conv layer, the accumulated activation error,
  the layer's own activation rounding and its weights' error.
"""
import copy
import math
from collections import Counter, OrderedDict
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mmrepvgg.deploy.verify import relative_error
from .calibration import QuantizeError, as_feeds
from .static import FOLDED_ACTIVATIONS, consumers, load, producers


class ErrorStats:
    """SQNR and the largest relative error (:func:`relative_error`) of one
    tensor over several samples, sums in float64."""

    def __init__(self) -> None:
        self.signal = self.noise = self.rel_err = 0.0
        self.samples = 0
        self.finite = True

    def add(self, reference: np.ndarray, test: np.ndarray) -> 'ErrorStats':
        ref = np.asarray(reference, dtype=np.float64)
        tst = np.asarray(test, dtype=np.float64)
        if ref.shape != tst.shape:
            raise ValueError(f'shapes differ: {ref.shape} vs {tst.shape}')
        self.samples += 1
        self.rel_err = max(self.rel_err, relative_error(ref, tst))
        if np.isfinite(ref).all() and np.isfinite(tst).all():
            self.signal += float(np.sum(ref**2))
            self.noise += float(np.sum((ref - tst)**2))
        else:
            self.finite = False
        return self

    @property
    def sqnr_db(self) -> float:
        """``10 log10(sum ref^2 / sum (ref - test)^2)``: ``inf`` for equal
        tensors, ``-inf`` for a zero signal with noise, ``nan`` when a
        sample held a NaN or infinity."""
        if not self.finite:
            return float('nan')
        if self.noise == 0:
            return float('inf')
        if self.signal == 0:
            return float('-inf')
        return 10.0 * math.log10(self.signal / self.noise)

    def result(self) -> dict:
        return dict(sqnr_db=self.sqnr_db, rel_err=self.rel_err,
                    samples=self.samples)


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``
    in dB (:attr:`ErrorStats.sqnr_db`)."""
    return ErrorStats().add(reference, test).sqnr_db


def add_outputs(model, tensors: Sequence[str]):
    """Copy of ``model`` whose graph also outputs ``tensors``."""
    import onnx
    model = copy.deepcopy(load(model))
    have = {o.name for o in model.graph.output}
    for t in dict.fromkeys(tensors):
        if t not in have:
            model.graph.output.append(
                onnx.helper.make_empty_tensor_value_info(t))
    return model


def _run_pairs(fp32_model, int8_model, ftensors: Sequence[str],
               qtensors: Sequence[str], inputs: Sequence,
               threads: Optional[int]):
    """Yield, per input, its feed, the FP32 graph's ``ftensors`` and the
    INT8 graph's ``qtensors`` (added as outputs where they are not)."""
    from ..runtime import input_names, make_session
    fsess, qsess = (make_session(add_outputs(m, t).SerializeToString(),
                                 threads)
                    for m, t in ((fp32_model, ftensors),
                                 (int8_model, qtensors)))
    for feed in as_feeds(inputs, input_names(fsess)):
        yield (feed, fsess.run(list(ftensors), feed),
               qsess.run(list(qtensors), feed))


def _qdq_after(read_by, tensor: str):
    """``(QuantizeLinear, its DequantizeLinear's output)`` reading
    ``tensor`` in a QDQ graph, or ``(None, None)``."""
    for qn in read_by.get(tensor, []):
        for dq in read_by.get(qn.output[0], []) \
                if qn.op_type == 'QuantizeLinear' else []:
            if dq.op_type == 'DequantizeLinear':
                return qn, dq.output[0]
    return None, None


def dequantized_name(int8_model, tensor: str) -> Optional[str]:
    """Name of the dequantized copy of float ``tensor`` in a QDQ graph, or
    of the tensor itself where it stays float; ``None`` if the graph has
    neither."""
    graph = load(int8_model).graph
    name = _qdq_after(consumers(graph), tensor)[1]
    return name or (tensor if tensor in producers(graph) else None)


def compare_sessions(fp32_model,
                     int8_model,
                     inputs: Sequence,
                     extra_tensors: Sequence[str] = (),
                     threads: Optional[int] = None,
                     outputs: bool = True) -> 'OrderedDict':
    """Per-output SQNR and relative error of an INT8 graph against its FP32
    graph on the same inputs.

    Args:
        fp32_model: FP32 ``ModelProto`` or path.
        int8_model: INT8 ``ModelProto`` or path.
        inputs (Sequence): arrays (first input) or feed dicts.
        extra_tensors (Sequence[str]): float tensors of the FP32 graph to
            compare too (e.g. the boundary tensors); in the INT8 graph their
            dequantized copy (:func:`dequantized_name`) is read.
        threads (int, optional): onnxruntime threads.
        outputs (bool): compare the graph outputs too (``False`` for
            detections, see :func:`detection_agreement`).

    Returns:
        OrderedDict: name -> ``sqnr_db``, ``rel_err``, ``samples``, ``kind``
        (``output`` or ``boundary``); an output whose shape differs between
        the graphs in some sample (a detector keeping another number of
        boxes) gets ``shape_mismatch`` (count) and is measured on the others.
    """
    fp32_model, int8_model = load(fp32_model), load(int8_model)
    outs = [o.name for o in fp32_model.graph.output] if outputs else []
    extra = [t for t in extra_tensors if t not in outs]
    q_extra = []
    for t in extra:
        name = dequantized_name(int8_model, t)
        if name is None:
            raise QuantizeError(f'tensor {t} is not in the INT8 graph')
        q_extra.append(name)
    names = outs + extra
    if not names:
        raise QuantizeError('nothing to compare')
    stats = OrderedDict((n, ErrorStats()) for n in names)
    mismatch = Counter()
    for _, a, b in _run_pairs(fp32_model, int8_model, names,
                              outs + q_extra, inputs, threads):
        for name, x, y in zip(names, a, b):
            if np.shape(x) != np.shape(y):
                mismatch[name] += 1
            else:
                stats[name].add(x, y)
    result = OrderedDict()
    for name, s in stats.items():
        result[name] = dict(s.result(),
                            kind='output' if name in outs else 'boundary')
        if mismatch[name]:
            result[name]['shape_mismatch'] = mismatch[name]
    return result


#: Detections of the INT8 graph match FP32 ones within this fraction of the
#: input's larger side (box coordinates) ...
DET_BOX_TOL_REL = 0.01
#: ... and this score difference.
DET_SCORE_TOL = 0.05


def detection_agreement(fp32_path: str, int8_path: str, inputs: Sequence,
                        threads: Optional[int] = None) -> dict:
    """How many detections of an end-to-end INT8 graph (``dets``,
    ``labels``) match the FP32 graph's on the same inputs: same label, boxes
    within :data:`DET_BOX_TOL_REL` of the input size, scores within
    :data:`DET_SCORE_TOL`.

    Returns:
        dict: :func:`~mmrepvgg.export.verify.compare_detections` summed over
        the inputs, plus ``box_tol`` and ``score_tol``.
    """
    from ..verify import compare_detections, merge_comparisons, split_dets
    results, first, box_tol = [], 0, 0.0
    dets = ['dets', 'labels']
    for feed, a, b in _run_pairs(fp32_path, int8_path, dets, dets, inputs,
                                 threads):
        x = next(iter(feed.values()))
        tol = DET_BOX_TOL_REL * max(x.shape[-2:])
        box_tol = max(box_tol, tol)
        results.append(compare_detections(split_dets(*b), split_dets(*a),
                                          tol, DET_SCORE_TOL, first))
        first += x.shape[0]
    return dict(merge_comparisons(results), box_tol=box_tol,
                score_tol=DET_SCORE_TOL)


# ------------------------------------------------------------ per layer
def layer_name(node_name: str) -> str:
    """Readable module path of an exported node: ``/model/stage_1/
    stage_1.0/conv_reparam/Conv`` -> ``stage_1.0.conv_reparam`` (the
    export wrappers' ``model`` / ``detector`` scopes dropped)."""
    parts = [p for p in node_name.strip('/').split('/') if p]
    if len(parts) > 1:
        parts = parts[:-1]  # the op itself
    while len(parts) > 1 and parts[0] in ('model', 'detector'):
        parts = parts[1:]
    name = ''
    for p in parts:
        if name and p.startswith(name.rsplit('.', 1)[-1] + '.'):
            # torch scopes repeat the parent: stage_1/stage_1.0
            name = name.rsplit('.', 1)[0] + '.' + p if '.' in name else p
        elif name and (p.startswith(name + '.') or p == name):
            name = p
        else:
            name = f'{name}.{p}' if name else p
    return name or node_name


def _initializer(graph, name: str) -> Optional[np.ndarray]:
    from onnx import numpy_helper
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def _fake_quant(x: np.ndarray, scale: np.ndarray,
                zero: np.ndarray) -> np.ndarray:
    """``x`` quantized to 8 bits with a per-tensor scale and zero point
    (int8 or uint8 by the zero point's type) and dequantized."""
    lo, hi = (-128, 127) if np.asarray(zero).dtype == np.int8 else (0, 255)
    scale = np.asarray(scale, dtype=np.float64)
    zero = np.asarray(zero, dtype=np.float64)
    return (np.clip(np.rint(x / scale) + zero, lo, hi) - zero) * scale


def _quantized_output(read_by, conv) -> Tuple[object, Optional[str]]:
    """:func:`_qdq_after` the conv's output, or after its activation when
    the quantizer kept one (followed from the conv node, so the
    quantizer's renaming of outputs does not matter)."""
    tensor = conv.output[0]
    nxt = read_by.get(tensor, [])
    if len(nxt) == 1 and nxt[0].op_type in FOLDED_ACTIVATIONS:
        tensor = nxt[0].output[0]
    return _qdq_after(read_by, tensor)


def _weight_errors(fp32_path: str, int8_path: str) -> dict:
    """FP32 weight name -> ``(float weights, SQNR dB of the dequantized
    INT8 weights)``, by onnxruntime's ``qdq_loss_debug``."""
    from onnxruntime.quantization import qdq_loss_debug as dbg
    matched = dbg.create_weight_matching(str(fp32_path), str(int8_path))
    errors = dbg.compute_weight_error(matched)
    return {k: (v['float'], errors[k]) for k, v in matched.items()}


def layer_errors(fp32_path: str,
                 int8_path: str,
                 inputs: Sequence,
                 threads: Optional[int] = None) -> List[dict]:
    """Per conv layer of a QDQ INT8 graph, how much INT8 costs.

    For every ``Conv`` of the FP32 graph (graph order) the layer's float
    activation is its output, or that of the activation right after it
    (:data:`~.static.FOLDED_ACTIVATIONS`). Over ``inputs``:

    * ``sqnr_db``: the INT8 graph's dequantized activation vs the FP32
      graph's: the error accumulated up to this layer;
    * ``act_sqnr_db``: the FP32 activation quantized alone with the INT8
      graph's scale and zero point: this layer's own rounding and clipping;
    * ``weight_sqnr_db``: the dequantized INT8 weights vs the FP32 weights
      (onnxruntime's ``qdq_loss_debug``);
    * ``w_peak_over_mean``: ``max|w| / mean|w|`` of the FP32 weights, worst
      output channel: outliers a per-channel scale must cover.

    The activations are measured here, streaming, not with
    ``qdq_loss_debug``: it keeps every tensor of every input in memory, and
    its ``qdq_err`` reads the conv output *before* a ReLU the quantizer
    folded into the QDQ pair (its ``xmodel_err`` equals ``sqnr_db``).

    Returns:
        list[dict]: one row per conv: ``layer`` (module path), ``node``,
        ``out_channels``, ``sqnr_db``, ``act_sqnr_db``, ``weight_sqnr_db``,
        ``w_peak_over_mean``.
    """
    fp, qm = load(fp32_path), load(int8_path)
    fcons, qcons = consumers(fp.graph), consumers(qm.graph)
    qmade = producers(qm.graph)
    qconv = {n.name: n for n in qm.graph.node if n.op_type == 'Conv'}
    weights = _weight_errors(fp32_path, int8_path)
    rows, ftensors, qtensors, qparams = [], [], [], []
    for conv in fp.graph.node:
        if conv.op_type != 'Conv' or conv.name not in qconv:
            continue
        qnode, qname = _quantized_output(qcons, qconv[conv.name])
        if qnode is None:
            continue
        out = conv.output[0]
        nxt = fcons.get(out, [])
        act = len(nxt) == 1 and nxt[0].op_type in FOLDED_ACTIVATIONS
        dq = qmade.get(qconv[conv.name].input[1])
        key = dq.input[0][:-len('_quantized')] if dq is not None else None
        w, w_sqnr = weights.get(key, (None, None))
        row = dict(layer=layer_name(conv.name), node=conv.name,
                   out_channels=int(w.shape[0]) if w is not None else None,
                   weight_sqnr_db=w_sqnr)
        if w is not None:
            flat = np.abs(w.reshape(w.shape[0], -1).astype(np.float64))
            mean = flat.mean(axis=1)
            row['w_peak_over_mean'] = float(
                (flat.max(axis=1) / np.where(mean > 0, mean, 1)).max())
        rows.append(row)
        ftensors.append(nxt[0].output[0] if act else out)
        qtensors.append(qname)
        zero = _initializer(qm.graph, qnode.input[2]) \
            if len(qnode.input) > 2 else np.zeros((), np.uint8)
        qparams.append((_initializer(qm.graph, qnode.input[1]), zero))
    if not rows:
        raise QuantizeError('no quantized Conv layer found (is the INT8 graph '
                            'a QDQ graph of the FP32 graph?)')
    acc = [ErrorStats() for _ in rows]
    own = [ErrorStats() for _ in rows]
    for _, a, b in _run_pairs(fp, qm, ftensors, qtensors, inputs, threads):
        for i, (x, y) in enumerate(zip(a, b)):
            acc[i].add(x, y)
            own[i].add(x, _fake_quant(x, *qparams[i]))
    for row, a, o in zip(rows, acc, own):
        row['sqnr_db'], row['act_sqnr_db'] = a.sqnr_db, o.sqnr_db
    return rows


def format_layer_table(reports: Mapping[str, Sequence[dict]]) -> str:
    """Markdown table comparing :func:`layer_errors` of several graphs
    (e.g. ``{'RepVGG': rows, 'QARepVGG': rows}``), layers matched by
    position (same architecture, same conv order)."""
    labels = list(reports)
    if not labels:
        return ''
    n = max(len(r) for r in reports.values())
    head = ['layer']
    for lab in labels:
        head += [f'{lab} SQNR dB', f'{lab} act dB', f'{lab} weight dB',
                 f'{lab} max/mean |w|']
    lines = ['| ' + ' | '.join(head) + ' |',
             '|---|' + '---:|' * (len(head) - 1)]
    keys = ('sqnr_db', 'act_sqnr_db', 'weight_sqnr_db', 'w_peak_over_mean')
    for i in range(n):
        cells = [next(r[i] for r in reports.values() if i < len(r))['layer']]
        for lab in labels:
            r = reports[lab][i] if i < len(reports[lab]) else {}
            cells += ['n/a' if r.get(k) is None else f'{r[k]:.1f}'
                      for k in keys]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)

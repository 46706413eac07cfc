"""An exported end-to-end ONNX detector in mmdet's own test loop.

``tools/test.py CONFIG MODEL.onnx`` runs mmengine's ``Runner.test()``
unchanged: the config's test dataset, pipeline, data preprocessor and
evaluator; only the model is :class:`OnnxRuntimeDetector`, whose
``predict`` feeds the preprocessed batch to onnxruntime and turns ``dets``
and ``labels`` into ``DetDataSample.pred_instances`` the way mmdet's dense
heads do with ``rescale=True``: boxes divided by the ``scale_factor`` of the
test resize (mmdet's ``scale_boxes``, no clipping to ``ori_shape``, as
mmdet). So the metrics printed (``coco/bbox_mAP`` ...) are comparable with
the PyTorch model's.

Input sizes: a graph with dynamic height and width takes the batch as the
preprocessor padded it; a graph with a fixed size gets the batch padded
(bottom/right, zeros, as the preprocessor pads) to that size, and a fixed
batch size is filled up with zero images. A graph without the
``img_shape`` input clips boxes to the padded batch: here they are clipped
again to each image's ``img_shape`` (mmdet clips before NMS, so on padded
batches a box crossing the padding border can differ slightly; the graph
with ``--img-shape-input`` is exact).
"""
import json
import os.path as osp
from typing import List, Optional, Sequence

import numpy as np
import torch
from mmdet.models.detectors.base import BaseDetector
from mmdet.registry import MODELS
from mmengine.structures import InstanceData

from mmrepvgg.utils.cli import ToolError
from . import runtime
from .metadata import METADATA_KEY, read_metadata


class EvaluateError(ToolError):
    """The ONNX file cannot be evaluated; the message names it."""


def check_end2end_graph(onnx_file: str, session=None) -> dict:
    """The graph inputs (name -> onnxruntime ``NodeArg``) of an end-to-end
    detector graph: input ``input`` (and optionally ``img_shape``), outputs
    ``dets`` and ``labels`` first.

    Args:
        onnx_file (str): the graph.
        session (onnxruntime.InferenceSession, optional): a session of it
            (one is made otherwise).

    Raises:
        EvaluateError: any other graph signature (e.g. a raw-output graph
            exported without ``--postprocess``).
    """
    if session is None:
        session = runtime.make_session(onnx_file, 1, None)
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = runtime.output_names(session)
    if 'input' not in inputs or outputs[:2] != ['dets', 'labels']:
        raise EvaluateError(
            f'{onnx_file}: not an end-to-end detector graph (inputs '
            f'{sorted(inputs)}, outputs {outputs}; expected input and '
            'dets, labels: export it with tools/export_onnx.py '
            '--postprocess)')
    extra = set(inputs) - {'input', 'img_shape'}
    if extra:
        raise EvaluateError(f'{onnx_file}: unknown graph inputs '
                            f'{sorted(extra)}')
    return inputs


@MODELS.register_module()
class OnnxRuntimeDetector(BaseDetector):
    """A detector whose ``predict`` is an end-to-end ONNX graph.

    Args:
        onnx_file (str): graph with input ``input`` (and optionally
            ``img_shape``) and outputs ``dets`` (N, K, 5) and ``labels``
            (N, K), as ``tools/export_onnx.py --postprocess`` writes.
        data_preprocessor (dict): the config's ``DetDataPreprocessor``.
        threads (int, optional): onnxruntime intra-op threads.
        providers (Sequence[str], optional): onnxruntime providers (CPU by
            default).
        init_cfg (dict, optional): unused (no weights).
    """

    def __init__(self,
                 onnx_file: str,
                 data_preprocessor: Optional[dict] = None,
                 threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor,
                         init_cfg=init_cfg)
        if not osp.isfile(onnx_file):
            raise EvaluateError(f'ONNX file {onnx_file} does not exist')
        self.onnx_file = onnx_file
        self.session = runtime.make_session(onnx_file, threads, providers)
        inputs = check_end2end_graph(onnx_file, self.session)
        self.with_img_shape = 'img_shape' in inputs
        dims = inputs['input'].shape
        self.fixed_batch = dims[0] if isinstance(dims[0], int) else None
        self.fixed_hw = (dims[2], dims[3]) if all(
            isinstance(d, int) for d in dims[2:4]) else None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.settings = json.loads(meta.get(METADATA_KEY, '{}'))
        except ValueError:
            self.settings = {}
        self.clip_border = bool(self.settings.get('clip_border', True))

    # the graph replaces every PyTorch path
    def loss(self, batch_inputs, batch_data_samples):
        raise EvaluateError('an ONNX detector cannot be trained')

    def _forward(self, batch_inputs, batch_data_samples=None):
        raise EvaluateError('an ONNX detector has no tensor mode; use '
                            'predict')

    def extract_feat(self, batch_inputs):
        raise EvaluateError('an ONNX detector has no features')

    def _run(self, x: np.ndarray, shapes: np.ndarray):
        n, _, h, w = x.shape
        if self.fixed_hw is not None:
            fh, fw = self.fixed_hw
            if h > fh or w > fw:
                raise EvaluateError(
                    f'{self.onnx_file}: the graph takes {fh}x{fw} inputs, '
                    f'the pipeline gives {h}x{w}: export it for the '
                    "config's test size or with dynamic sizes")
            x = np.pad(x, ((0, 0), (0, 0), (0, fh - h), (0, fw - w)))
        step = self.fixed_batch or n
        dets, labels = [], []
        for start in range(0, n, step):
            xb, sb = x[start:start + step], shapes[start:start + step]
            fill = step - xb.shape[0]
            if fill:
                xb = np.concatenate([xb, np.zeros((fill, ) + xb.shape[1:],
                                                  xb.dtype)])
                sb = np.concatenate([sb, np.repeat(sb[-1:], fill, 0)])
            feeds = dict(input=xb)
            if self.with_img_shape:
                feeds['img_shape'] = sb
            d, lab = runtime.run(self.session, feeds, ['dets', 'labels'])
            dets.append(d[:step - fill])
            labels.append(lab[:step - fill])
        return np.concatenate(dets), np.concatenate(labels)

    def predict(self, batch_inputs: torch.Tensor, batch_data_samples: list,
                rescale: bool = True) -> list:
        """Detections of a preprocessed batch, as mmdet's detectors return
        them (``pred_instances`` with ``bboxes``, ``scores``, ``labels``)."""
        from mmdet.structures.bbox import scale_boxes
        x = batch_inputs.detach().float().cpu().numpy()
        shapes = np.asarray([s.metainfo.get('img_shape', x.shape[2:])[:2]
                             for s in batch_data_samples], np.int64)
        dets, labels = self._run(np.ascontiguousarray(x), shapes)
        results: List[InstanceData] = []
        for sample, d, lab, (h, w) in zip(batch_data_samples, dets, labels,
                                          shapes):
            keep = lab >= 0
            bboxes = torch.from_numpy(np.ascontiguousarray(d[keep, :4]))
            if self.clip_border and not self.with_img_shape and (
                    h < x.shape[2] or w < x.shape[3]):
                bboxes[:, 0::2].clamp_(min=0, max=float(w))
                bboxes[:, 1::2].clamp_(min=0, max=float(h))
            if rescale:
                scale_factor = [1 / s for s in sample.metainfo['scale_factor']]
                bboxes = scale_boxes(bboxes, scale_factor)
            results.append(InstanceData(
                bboxes=bboxes,
                scores=torch.from_numpy(np.ascontiguousarray(d[keep, 4])),
                labels=torch.from_numpy(lab[keep].astype(np.int64))))
        return self.add_pred_to_datasample(batch_data_samples, results)


# ------------------------------------------------------------ tools/test.py
def onnx_test_config(args):
    """The runner config of ``tools/test.py CONFIG MODEL.onnx``: the
    config's test set, pipeline, preprocessor and evaluator, the model
    replaced by :class:`OnnxRuntimeDetector`.

    Raises:
        ToolError: options that do not apply to an ONNX file, missing files.
    """
    from mmrepvgg.apis.runner import load_runner_config
    for flag, on in (('--tta', getattr(args, 'tta', False)),
                     ('--deploy', getattr(args, 'deploy', False)),
                     ('--non-strict', getattr(args, 'non_strict', False))):
        if on:
            raise EvaluateError(f'{flag} does not apply to an ONNX file '
                                f'({args.checkpoint})')
    if getattr(args, 'launcher', 'none') != 'none':
        raise EvaluateError(f'{args.checkpoint}: ONNX evaluation runs in one '
                            'process (--launcher none)')
    out = getattr(args, 'out', None)
    if out is not None and not out.endswith(('.pkl', '.pickle')):
        raise EvaluateError(f'--out {out}: must be a .pkl or .pickle file')
    cfg = load_runner_config(args, [(args.checkpoint, 'ONNX file')])
    pre = cfg.model.get('data_preprocessor')
    if pre is None:
        raise EvaluateError(f'{args.config}: model.data_preprocessor is '
                            'missing (the ONNX graph takes the preprocessed '
                            'batch)')
    cfg.model = dict(type='OnnxRuntimeDetector',
                     onnx_file=osp.abspath(args.checkpoint),
                     data_preprocessor=pre)
    cfg.load_from = None
    cfg.resume = False
    hooks = [h for h in cfg.get('custom_hooks', []) or []
             if h.get('type') != 'SwitchToDeployHook']
    cfg.custom_hooks = hooks
    if getattr(args, 'show', False) or getattr(args, 'show_dir', None):
        vis = cfg.default_hooks.get('visualization')
        if vis is None:
            raise EvaluateError('--show/--show-dir need a "visualization" '
                                'hook in default_hooks')
        vis.draw = True
        if args.show:
            vis.show = True
            vis.wait_time = args.wait_time
        if args.show_dir:
            vis.test_out_dir = args.show_dir
    if out is not None:
        dump = dict(type='DumpDetResults', out_file_path=out)
        ev = cfg.test_evaluator
        cfg.test_evaluator = list(ev) + [dump] if isinstance(
            ev, (list, tuple)) else [ev, dump]
    return cfg


def test_onnx(args) -> int:
    """``tools/test.py`` for a ``.onnx`` checkpoint: mmdet's test loop with
    onnxruntime detections; one ``error:`` line on bad input."""
    from mmrepvgg.apis.runner import run_runner, run_tool

    def body():
        import mmrepvgg  # noqa: F401  (registers modules)
        cfg = onnx_test_config(args)
        # refused before the runner creates its work dir and log
        check_end2end_graph(cfg.model['onnx_file'])
        settings = read_metadata(cfg.model['onnx_file'])
        if settings:
            from mmrepvgg.export.postprocess import describe_settings
            print(f'ONNX {args.checkpoint}: post-processing in the graph: '
                  f'{describe_settings(settings)}', flush=True)
        run_runner(cfg, args, 'test')

    return run_tool(body, args, interrupted='interrupted')


test_onnx.__test__ = False  # not a pytest test

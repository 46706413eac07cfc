"""Whole-detector forms timed side by side with their mAP (the demo, the
benchmark's ``--detector``); the demo's picture of their detections."""
from functools import partial
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from mmrepvgg.utils.timing import measure
from .report import md_table

#: The detector's INT8 mAP may be this much below its FP32 mAP (issue 18).
MAX_INT8_DROP = 0.01


def format_summary(rows: Sequence[dict], title: str = '',
                   map_label: str = 'toy-val mAP') -> str:
    """The demo's one table, Markdown: form | ``map_label`` (None: n/a) |
    latency | speed-up (vs the first row), under ``title``."""
    return '\n'.join(([title] if title else []) + md_table(
        ['form', map_label, 'latency ms', 'speed-up'],
        [[r['form'], 'n/a' if r.get('map') is None else f'{r["map"]:.3f}',
          f'{r["latency_ms"]:.2f}', f'{r["speedup"]:.2f}x'] for r in rows]))


def forms(cfg, config_path: str, checkpoint: str,
          onnx_files: Mapping[str, str], openvino: bool = False) -> dict:
    """Calls (``fns``) of a trained detector's forms on its first test
    image (``input``): PyTorch training and deploy ``predict``, each of
    ``onnx_files`` (name -> end-to-end graph) on onnxruntime and, with
    ``openvino``, on OpenVINO (else ``skipped``: form -> why), all with
    PyTorch's ``threads``; and the ``training`` and ``deploy`` models."""
    from mmrepvgg.apis.convert import (build_model, load_weights,
                                       read_state_dict)
    from mmrepvgg.deploy import switch_to_deploy
    from mmrepvgg.export.openvino import unusable_reason
    from mmrepvgg.export.runtime import input_names, make_session
    from mmrepvgg.export.verify import dataset_batch
    training = build_model(cfg)
    load_weights(training, read_state_dict(checkpoint)[0], checkpoint,
                 config_path)
    deploy = switch_to_deploy(training.eval(), inplace=False, verbose=False)
    x, samples, note = dataset_batch(cfg, training, 1)
    if x is None:
        raise ValueError(f'{config_path}: {note}')
    feed = dict(input=x.numpy(), img_shape=np.asarray(
        [s.metainfo['img_shape'][:2] for s in samples], np.int64))
    n = torch.get_num_threads()

    def run(path, runtime='onnxruntime'):
        sess = make_session(path, n, runtime=runtime, precision='f32')
        return partial(sess.run, None, {k: feed[k] for k in input_names(sess)})

    fns = {name: (lambda m=m: m.predict(x, samples, rescale=False))
           for name, m in (('PyTorch training', training),
                           ('PyTorch deploy', deploy))}
    fns.update((name, run(path)) for name, path in onnx_files.items())
    skipped = {}
    if openvino:
        why = unusable_reason()
        for name, path in onnx_files.items():
            if why is None:
                fns[f'{name} (OpenVINO)'] = run(path, 'openvino')
            else:
                skipped[f'{name} (OpenVINO)'] = why
    return dict(fns=fns, skipped=skipped, input=x, threads=n,
                training=training, deploy=deploy)


def demo_summary(cfg,
                 config_path: str,
                 checkpoint: str,
                 onnx_files: Mapping[str, str],
                 maps: Mapping[str, Optional[float]],
                 repeats: int = 20,
                 warmup: int = 3,
                 openvino: bool = False,
                 map_label: str = 'toy-val mAP',
                 f: Optional[dict] = None) -> dict:
    """Time the forms ``f`` (default: :func:`forms`) side by side: ``rows``
    (with ``maps``, form -> mAP measured elsewhere) and their ``table``,
    ``timing``, ``shape``, ``skipped``."""
    f = f or forms(cfg, config_path, checkpoint, onnx_files, openvino)
    fns, n = f['fns'], f['threads']
    with torch.inference_mode():
        timing = measure(fns, repeats, warmup, threads=n)
    first = next(iter(fns))
    rows = [dict(form=k, map=maps.get(k), latency_ms=1e3 * timing.median(k),
                 speedup=timing.ratio(first, k)['median']) for k in fns]
    shape = tuple(f['input'].shape)
    title = (f'input {"x".join(map(str, shape))}, {n} PyTorch threads; '
             f'{timing.describe()}')
    return dict(rows=rows, table=format_summary(rows, title, map_label),
                timing=timing, shape=shape, skipped=f['skipped'])


def detector_forms(cfg,
                   config_path: str,
                   checkpoint: str,
                   images: Optional[int] = None,
                   repeats: int = 20,
                   warmup: int = 3,
                   log=print) -> dict:
    """:func:`demo_summary` of PyTorch training and deploy, the end-to-end
    FP32 graph and its verified INT8 graph on onnxruntime and OpenVINO, with
    ``maps`` (bbox mAP on ``images`` val images, all: None), ``targets``
    (INT8 mAP within :data:`MAX_INT8_DROP` of FP32) and ``markdown``."""
    from mmrepvgg.export.evaluate import SplitScorer
    from mmrepvgg.export.quantize import quantize_checkpoint
    from mmrepvgg.utils.fileio import scratch_dir
    scorer = SplitScorer(cfg, 'val', images, torch.get_num_threads())
    with scratch_dir('mmrepvgg-bench-detector') as tmp:
        files = {'ONNX FP32': f'{tmp}/fp32.onnx',
                 'ONNX INT8': f'{tmp}/int8.onnx'}
        log('detector: exporting and quantizing the end-to-end graph')
        q = quantize_checkpoint(cfg, config_path, checkpoint,
                                files['ONNX INT8'],
                                fp32_output=files['ONNX FP32'])
        f = forms(cfg, config_path, checkpoint, files, openvino=True)
        maps = {'PyTorch training': scorer.score(f['training'].predict),
                'PyTorch deploy': scorer.score(f['deploy'].predict)}
        for name, path in files.items():
            maps[name] = scorer.graph(path)
            if f'{name} (OpenVINO)' in f['fns']:
                maps[f'{name} (OpenVINO)'] = scorer.graph(path, 'openvino')
        log('detector: timing the forms')
        out = demo_summary(cfg, config_path, checkpoint, files, maps,
                           repeats, warmup, True,
                           f'{scorer.info["split"]} mAP', f)
    targets = []
    for suffix in ('', ' (OpenVINO)'):
        a, b = f'ONNX INT8{suffix}', f'ONNX FP32{suffix}'
        if a in maps and b in maps:
            drop = maps[b] - maps[a]
            targets.append(f'{"PASS" if drop <= MAX_INT8_DROP else "MISS"}'
                           f' detector {a} mAP within {MAX_INT8_DROP:g} of '
                           f'{b}: {maps[a]:.3f} vs {maps[b]:.3f}')
    s = scorer.info
    lines = ['', '## Detector end to end', '',
             f'`{config_path}` with `{checkpoint}`: mAP on {s["images"]} of '
             f'{s["of"]} {s["split"]} images (the config\'s evaluator); '
             f'INT8: {q["config"]}.', '', out['table'], '']
    lines += [f'- skipped: {k} ({v})' for k, v in out['skipped'].items()]
    out.update(maps=maps, targets=targets, markdown='\n'.join(
        lines + [f'- {t}' for t in targets]) + '\n')
    return out


def side_by_side(results: Mapping[str, str],
                 out_file: str,
                 classes: Sequence[str],
                 num_images: int = 4,
                 scale: Optional[int] = None,
                 score_thr: float = 0.3) -> str:
    """One PNG (written atomically, returned) of the first ``num_images``
    test images, one row per image and one column per form (``results``:
    title -> ``tools/test.py --out`` pickle, same test set), detections
    from ``score_thr`` drawn by mmdet's ``DetLocalVisualizer`` on the image
    enlarged ``scale`` times (default: to about 384 pixels)."""
    import cv2
    import mmcv
    from mmdet.structures import DetDataSample
    from mmdet.visualization import DetLocalVisualizer
    from mmengine.structures import InstanceData

    from mmrepvgg.export.verify import dumped_detections
    from mmrepvgg.utils.fileio import atomic_write_bytes
    if not results:
        raise ValueError('no detection results to draw')
    loaded = {title: dumped_detections(path)
              for title, path in results.items()}
    vis = DetLocalVisualizer(name=f'side_by_side_{id(loaded)}',
                             line_width=2)
    vis.dataset_meta = dict(classes=tuple(classes))
    rows = []
    for i in range(min(num_images, *(len(v) for v in loaded.values()))):
        path = next(iter(loaded.values()))[i]['img_path']
        image = mmcv.imread(path, channel_order='rgb')
        k = scale or max(1, round(384 / max(image.shape[:2])))
        image = mmcv.imrescale(image, float(k), interpolation='nearest')
        cells = []
        for title, res in loaded.items():
            if res[i]['img_path'] != path:
                raise ValueError(f'{title}: image {i} is '
                                 f'{res[i]["img_path"]}, not {path}')
            inst = InstanceData(**{key: torch.as_tensor(res[i][key])
                                   for key in ('scores', 'labels')})
            inst.bboxes = torch.as_tensor(res[i]['bboxes']).float() * k
            sample = DetDataSample(pred_instances=inst)
            vis.add_datasample(title, image, sample, draw_gt=False,
                               pred_score_thr=score_thr)
            cell = np.pad(vis.get_image().astype(np.uint8),
                          ((24, 0), (0, 0), (0, 0)), constant_values=255)
            cv2.putText(cell, title[:max(1, cell.shape[1] // 10)], (4, 17),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1,
                        cv2.LINE_AA)
            cells.append(cell)
        rows.append(np.concatenate(cells, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)),
                   constant_values=255) for r in rows]
    ok, data = cv2.imencode('.png', np.ascontiguousarray(
        np.concatenate(rows)[..., ::-1]))
    if not ok:
        raise ValueError(f'{out_file}: PNG encoding failed')
    atomic_write_bytes(out_file, data.tobytes())
    return out_file

"""What an INT8 graph is calibrated and verified on: real images of a
config's split through its test pipeline and data preprocessor, one image
per feed, as the exported graph takes them."""
import contextlib
import copy
import io
import os.path as osp
from collections import Counter
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mmrepvgg.utils.cli import ToolError

#: Dataloader of each split.
SPLITS = dict(train='train_dataloader', val='val_dataloader',
              test='test_dataloader')


class QuantizeError(ToolError):
    """Refused input or failed quantization (names the file or argument)."""


def _inner_dataset(ds_cfg):
    while isinstance(ds_cfg.get('dataset'), dict):  # RepeatDataset etc.
        ds_cfg = ds_cfg['dataset']
    return ds_cfg


def split_dataset_cfg(cfg, split: str):
    """The dataset config of ``split`` with the config's *test* pipeline and
    ``test_mode=True`` (no filtering, no augmentation)."""
    if split not in SPLITS:
        raise QuantizeError(f'split {split!r}: choose from '
                            f'{", ".join(SPLITS)}')
    loader = cfg.get(SPLITS[split])
    if not loader or 'dataset' not in loader:
        raise QuantizeError(f'the config has no {SPLITS[split]}.dataset')
    test_loader = cfg.get('test_dataloader') or cfg.get('val_dataloader')
    if not test_loader or 'dataset' not in test_loader:
        raise QuantizeError('the config has no test_dataloader.dataset '
                            '(its pipeline preprocesses the images)')
    pipeline = _inner_dataset(test_loader['dataset']).get('pipeline')
    if not pipeline:
        raise QuantizeError('the config\'s test dataset has no pipeline')
    ds_cfg = copy.deepcopy(_inner_dataset(loader['dataset']))
    ds_cfg.update(pipeline=copy.deepcopy(pipeline), test_mode=True)
    return ds_cfg


def pick_indices(total: int, num: Optional[int]) -> List[int]:
    """``num`` indices spread evenly over ``range(total)`` (all of them
    when ``num`` is ``None`` or at least ``total``)."""
    if num is None or num >= total:
        return list(range(total))
    if num < 1:
        raise QuantizeError(f'number of images must be >= 1, got {num}')
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, num)})


def build_preprocessor(cfg):
    """The detector's data preprocessor (it holds no weights)."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    dp = cfg.model.get('data_preprocessor')
    if not dp:
        raise QuantizeError('the config\'s model has no data_preprocessor '
                            '(needed to feed real images to the graph)')
    return MODELS.build(copy.deepcopy(dp)).eval()


def preprocessed(cfg, split: str, num: Optional[int], preprocessor=None,
                 one_batch: bool = False) -> Tuple[list, dict]:
    """``num`` images of ``split`` (evenly spread; all when ``None``)
    through the test pipeline and ``preprocessor`` (default
    :func:`build_preprocessor`): ``(inputs, data_samples)`` batches of one
    image each (all in one with ``one_batch``), and ``dict(split, images,
    of, metainfo)``. Verification, calibration and scoring read images
    here."""
    import torch
    from mmengine.dataset import pseudo_collate
    from mmdet.registry import DATASETS
    if preprocessor is None:
        preprocessor = build_preprocessor(cfg)
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    ds_cfg = split_dataset_cfg(cfg, split)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' chat
            ds = DATASETS.build(ds_cfg)
    except Exception as e:  # mmengine wraps errors of the dataset class
        ann = osp.join(ds_cfg.get('data_root') or '',
                       ds_cfg.get('ann_file', ''))
        text = str(e).strip()
        raise QuantizeError(
            f'cannot read the {split} images of the config (annotations '
            f'{ann!r}): {text.splitlines()[0] if text else type(e).__name__}'
        ) from None
    if len(ds) == 0:
        raise QuantizeError(f'the {split} dataset of the config is empty')
    items = [ds[i] for i in pick_indices(len(ds), num)]
    batches = []
    with torch.no_grad():
        for group in [items] if one_batch else [[it] for it in items]:
            b = preprocessor(pseudo_collate(group), False)
            batches.append((b['inputs'].float(), b['data_samples']))
    return batches, dict(split=split, images=len(items), of=len(ds),
                         metainfo=ds.metainfo)


def image_feeds(batches: list, info: dict) -> Tuple[List[dict], dict]:
    """:func:`preprocessed`'s batches as graph feeds ``{'input': 1x3xHxW
    float32, 'img_shape': [[h, w]] int64}``; the info (no ``metainfo``)
    also counts ``shapes``."""
    info = {k: v for k, v in info.items() if k != 'metainfo'}
    feeds = [dict(input=x.cpu().contiguous().numpy(), img_shape=np.array(
        [s.metainfo['img_shape'][:2] for s in samples], np.int64))
        for x, samples in batches]
    info['shapes'] = dict(Counter(f['input'].shape for f in feeds))
    return feeds, info


def as_feeds(inputs, names: Sequence[str]) -> List[Dict[str, np.ndarray]]:
    """Feed dicts for a graph with inputs ``names`` of arrays (the first
    input) or dicts (the graph's inputs kept)."""
    feeds = []
    for x in inputs:
        if not isinstance(x, Mapping):
            x = {names[0]: np.asarray(x, dtype=np.float32)}
        missing = [n for n in names if n not in x]
        if missing:
            raise QuantizeError(f'inputs lack {missing} of the graph')
        feeds.append({k: np.ascontiguousarray(x[k]) for k in names})
    return feeds

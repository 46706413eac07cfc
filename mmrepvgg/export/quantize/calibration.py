"""The inputs a quantized graph is calibrated and verified on: real images
of a config's dataset split through its test pipeline and the detector's
data preprocessor, one image per feed, as the exported graph takes them."""
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
    """Refused input or failed quantization; the message names the file or
    argument at fault."""


def _inner_dataset(ds_cfg):
    while 'dataset' in ds_cfg and isinstance(ds_cfg['dataset'], dict):
        ds_cfg = ds_cfg['dataset']  # RepeatDataset, ClassBalanced... wrappers
    return ds_cfg


def split_dataset_cfg(cfg, split: str):
    """The dataset config of ``split`` (``train``/``val``/``test``) with the
    config's *test* pipeline and ``test_mode=True`` (no filtering, no
    augmentation).

    Raises:
        QuantizeError: the config has no such split or no test pipeline.
    """
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
    ds_cfg = copy.deepcopy(_inner_dataset(loader['dataset']))
    pipeline = _inner_dataset(test_loader['dataset']).get('pipeline')
    if not pipeline:
        raise QuantizeError('the config\'s test dataset has no pipeline')
    ds_cfg['pipeline'] = copy.deepcopy(pipeline)
    ds_cfg['test_mode'] = True
    return ds_cfg


def build_split(cfg, split: str):
    """The dataset of ``split`` (:func:`split_dataset_cfg`), built.

    Raises:
        QuantizeError: naming the annotation file that is missing or
            unreadable.
    """
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    ds_cfg = split_dataset_cfg(cfg, split)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' chat
            ds = DATASETS.build(ds_cfg)
    except Exception as e:  # mmengine wraps errors of the dataset class
        root, ann = ds_cfg.get('data_root', ''), ds_cfg.get('ann_file', '')
        ann = osp.join(root, ann) if root else ann
        text = str(e).strip()
        raise QuantizeError(
            f'cannot read the {split} images of the config (annotations '
            f'{ann!r}): {text.splitlines()[0] if text else type(e).__name__}'
        ) from None
    if len(ds) == 0:
        raise QuantizeError(f'the {split} dataset of the config is empty')
    return ds


def pick_indices(total: int, num: Optional[int]) -> List[int]:
    """``num`` indices spread evenly over ``range(total)`` (all of them
    when ``num`` is ``None`` or at least ``total``)."""
    if num is None or num >= total:
        return list(range(total))
    if num < 1:
        raise QuantizeError(f'number of images must be >= 1, got {num}')
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, num)})


def build_preprocessor(cfg):
    """The detector's data preprocessor (normalization, BGR->RGB, padding)
    built from ``cfg.model.data_preprocessor``: it holds no weights."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    dp = cfg.model.get('data_preprocessor')
    if not dp:
        raise QuantizeError('the config\'s model has no data_preprocessor '
                            '(needed to feed real images to the graph)')
    return MODELS.build(copy.deepcopy(dp)).eval()


def preprocessed_images(cfg,
                        split: str,
                        num: Optional[int],
                        preprocessor=None) -> Tuple[List[dict], dict]:
    """Real images of the config's ``split`` through the test pipeline and
    the data preprocessor, one image each: what an exported graph takes.

    Args:
        cfg (Config): the model config.
        split (str): ``train``, ``val`` or ``test``.
        num (int, optional): how many (evenly spread over the split); all
            when ``None`` or more than the split holds.
        preprocessor (nn.Module, optional): default
            :func:`build_preprocessor` of ``cfg``.

    Returns:
        tuple: feeds ``{'input': 1x3xHxW float32, 'img_shape': 1x2 int64
        (valid h, w inside the padded input)}``, and ``dict(split, images,
        of, shapes)``.
    """
    import torch
    from mmengine.dataset import pseudo_collate
    preprocessor = preprocessor or build_preprocessor(cfg)
    ds = build_split(cfg, split)
    feeds, shapes = [], Counter()
    with torch.no_grad():
        for i in pick_indices(len(ds), num):
            batch = preprocessor(pseudo_collate([ds[i]]), False)
            x = batch['inputs'].float().cpu().contiguous().numpy()
            h, w = batch['data_samples'][0].metainfo['img_shape'][:2]
            feeds.append(dict(input=x, img_shape=np.asarray(
                [[h, w]], dtype=np.int64)))
            shapes[tuple(x.shape)] += 1
    return feeds, dict(split=split, images=len(feeds), of=len(ds),
                       shapes=dict(shapes))


def as_feeds(inputs, names: Sequence[str]) -> List[Dict[str, np.ndarray]]:
    """Feed dicts for a graph with inputs ``names``: an array feeds the
    first input; a dict keeps the graph's inputs (e.g. drops ``img_shape``
    for a graph without it)."""
    feeds = []
    for x in inputs:
        if isinstance(x, Mapping):
            missing = [n for n in names if n not in x]
            if missing:
                raise QuantizeError(f'inputs lack {missing} of the graph')
            feeds.append({k: np.ascontiguousarray(x[k]) for k in names})
        else:
            feeds.append({names[0]: np.ascontiguousarray(
                np.asarray(x, dtype=np.float32))})
    return feeds


class ListReader:
    """onnxruntime's ``CalibrationDataReader`` over a list of feeds."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.feeds):
            return None
        self.pos += 1
        return dict(self.feeds[self.pos - 1])

    def rewind(self) -> None:
        self.pos = 0

    def __len__(self) -> int:
        return len(self.feeds)

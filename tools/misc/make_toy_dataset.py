#!/usr/bin/env python
"""Generate the toy shapes detection dataset (COCO format), deterministically.

    python tools/misc/make_toy_dataset.py [--out data/toy]

Images of squares, circles and triangles in random colours on a noisy
background; ``annotations/{train,val}.json`` in COCO format. Byte-identical
files every time, so the dataset is "bundled" as this script.
"""
import argparse
import importlib.util
import json
import os
import os.path as osp
import runpy
import sys

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('square', 'circle', 'triangle')
MAX_OBJECTS = 3


def draw_image(rng: np.random.RandomState, size: int):
    bg = rng.randint(0, 90, size=3)
    noise = rng.randint(-20, 21, size=(size, size, 3))
    img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    boxes = []
    for _ in range(rng.randint(1, MAX_OBJECTS + 1)):
        for _attempt in range(20):
            s = int(rng.randint(size // 6, size // 2.5))
            x0 = int(rng.randint(0, size - s))
            y0 = int(rng.randint(0, size - s))
            box = (x0, y0, x0 + s, y0 + s)
            if all(_iou(box, b) < 0.1 for b, _ in boxes):
                break
        else:
            continue
        label = int(rng.randint(len(CLASSES)))
        color = tuple(int(c) for c in rng.randint(130, 256, size=3))
        x1, y1 = x0 + s - 1, y0 + s - 1
        if label == 0:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif label == 1:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.polygon([(x0 + s / 2, y0), (x1, y1), (x0, y1)], fill=color)
        boxes.append((box, label))
    return img, boxes


def _iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (union - inter)


def make_split(root: str, split: str, num: int, size: int,
               seed: int) -> dict:
    rng = np.random.RandomState(seed)
    img_dir = osp.join(root, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num):
        img, boxes = draw_image(rng, size)
        name = f'{i:04d}.png'
        img.save(osp.join(img_dir, name))
        images.append(dict(id=i, file_name=name, width=size, height=size))
        for (x0, y0, x1, y1), label in boxes:
            w, h = x1 - x0, y1 - y0
            annotations.append(
                dict(id=len(annotations) + 1, image_id=i,
                     category_id=label + 1, bbox=[x0, y0, w, h],
                     area=float(w * h), iscrowd=0))
    return dict(images=images, annotations=annotations,
                categories=[dict(id=i + 1, name=n)
                            for i, n in enumerate(CLASSES)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='data/toy', help='output folder')
    p.add_argument('--train', type=int, default=96, help='training images')
    p.add_argument('--val', type=int, default=32, help='validation images')
    p.add_argument('--size', type=int, default=128, help='image side (px)')
    args = p.parse_args(argv)
    if args.train < 1 or args.val < 1 or args.size < 32:
        print('error: --train/--val must be >= 1 and --size >= 32',
              file=sys.stderr)
        return 1
    from mmrepvgg.utils.fileio import atomic_folder
    with atomic_folder(args.out) as tmp:
        os.makedirs(osp.join(tmp, 'annotations'))
        for seed, (split, num) in enumerate((('train', args.train),
                                             ('val', args.val))):
            coco = make_split(tmp, split, num, args.size, seed)
            with open(osp.join(tmp, 'annotations', f'{split}.json'), 'w') as f:
                json.dump(coco, f)
    print(f'toy dataset: {args.train} train + {args.val} val images of '
          f'{args.size}x{args.size} in {args.out}')
    return 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)

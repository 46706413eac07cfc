"""tools/dataset_converters/neon_tree_crowns.py on a tiny wheel it is given
(no network): splits that never overlap, the cut-crown rule, the pinned
hash, one-line errors and no half-written output (issue 17)."""
import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from _toolkit import load_tool

TOOL = load_tool('neon_tree_crowns')
W, H, TILE, GAP = 300, 250, 64, 20


def _voc(w, h, boxes):
    objs = ''.join(
        f'<object><name>Tree</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>'
        f'<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>'
        for x0, y0, x1, y1 in boxes)
    return (f'<annotation><size><width>{w}</width><height>{h}</height>'
            f'<depth>3</depth></size>{objs}</annotation>').encode()


def _png(w, h, seed):
    buf = io.BytesIO()
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 255, (h, w, 3), np.uint8)).save(buf, 'PNG')
    return buf.getvalue()


def _boxes(seed, w, h, n):
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        s = int(rng.randint(6, 30))
        x0, y0 = int(rng.randint(0, w - s)), int(rng.randint(0, h - s))
        out.append((x0, y0, x0 + s - 1, y0 + s - 1))  # VOC: inclusive
    return out


@pytest.fixture
def wheel(tmp_path):
    """A wheel-shaped zip with one hold-out and one test image."""
    import zipfile
    path = tmp_path / 'deepforest-fake.whl'
    boxes = {'big': _boxes(0, W, H, 60), 'site': _boxes(1, 80, 80, 5)}
    with zipfile.ZipFile(path, 'w') as z:
        for name, (w, h) in (('big', (W, H)), ('site', (80, 80))):
            z.writestr(f'deepforest/data/{name}.png', _png(w, h, len(name)))
            z.writestr(f'deepforest/data/{name}.xml',
                       _voc(w, h, boxes[name]))
    images = (('big', 'holdout', 60), ('site', 'test', 5))
    return path, images, boxes


def _rects(coco):
    return [(i['source'], i['x'], i['y'], i['width'], i['height'])
            for i in coco['images']]


def test_splits_do_not_overlap_and_boxes_follow_the_rule(wheel, tmp_path):
    path, images, boxes = wheel
    out = tmp_path / 'trees'
    counts = TOOL.convert(str(path), str(out), TILE, GAP, images)
    coco = {s: json.loads((out / 'annotations' / f'{s}.json').read_text())
            for s in ('train', 'val', 'test')}
    train, val = _rects(coco['train']), _rects(coco['val'])
    assert train and val and counts['test'] == (1, 5)
    # the validation band: whole tile rows covering >= 30% of the height
    rows = -(-int(0.3 * H) // TILE)
    top = H - rows * TILE
    want = {top + r * TILE for r in range(rows)}
    assert {y for _, _, y, _, _ in val} == want
    assert len(val) == rows * (W // TILE)
    # training tiles end at least GAP above it: no pixel in both splits
    assert max(y + h for _, _, y, _, h in train) <= top - GAP
    assert min(x for _, x, _, _, _ in train) == 0
    assert max(x + w for _, x, _, w, _ in train) == W  # the image is covered
    for split in ('train', 'val'):
        img_ids = {i['id']: i for i in coco[split]['images']}
        for ann in coco[split]['annotations']:
            img = img_ids[ann['image_id']]
            x, y, w, h = ann['bbox']
            assert 0 <= x and 0 <= y and x + w <= TILE and y + h <= TILE
            # which crown is it, and how much of it is inside the tile?
            full = [b for b in boxes['big']
                    if max(b[0], img['x']) - img['x'] == x
                    and max(b[1], img['y']) - img['y'] == y]
            assert full, ann
            x0, y0, x1, y1 = full[0]
            area = (x1 + 1 - x0) * (y1 + 1 - y0)
            assert ann['iscrowd'] == int(w * h / area < 0.5), (ann, full)
    # every crown wholly inside a validation tile is in it, not ignored
    inside = sum(1 for _, x, y, w, h in val for b in boxes['big']
                 if b[0] >= x and b[1] >= y and b[2] < x + w and b[3] < y + h)
    whole = sum(1 for a in coco['val']['annotations']
                if not a['iscrowd'] and a['bbox'][2] * a['bbox'][3] in
                {(b[2] + 1 - b[0]) * (b[3] + 1 - b[1]) for b in boxes['big']})
    assert whole >= inside > 0
    # the test image is whole, with its crowns in VOC's inclusive pixels
    test_boxes = sorted(tuple(a['bbox']) for a in coco['test']['annotations'])
    assert test_boxes == sorted((x0, y0, x1 + 1 - x0, y1 + 1 - y0)
                                for x0, y0, x1, y1 in boxes['site'])
    tile = Image.open(out / 'val' / coco['val']['images'][0]['file_name'])
    assert tile.size == (TILE, TILE)
    # mmdet reads it
    from mmdet.datasets import CocoDataset
    ds = CocoDataset(data_root=str(out), ann_file='annotations/val.json',
                     data_prefix=dict(img='val/'), test_mode=True,
                     metainfo=dict(classes=('tree', )), pipeline=[])
    assert len(ds) == len(val)


def _main(argv, capsys):
    code = TOOL.main([str(a) for a in argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, err


def test_wheel_with_another_hash_is_refused(wheel, tmp_path, capsys):
    path, _, _ = wheel
    out = tmp_path / 'out'
    code, err = _main(['--wheel', path, '--out', out], capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f'error: --wheel {path}: sha256 ')
    assert TOOL.WHEEL_SHA256 in err[0]
    assert not out.exists()


def test_unfetchable_wheel_is_one_line(tmp_path, capsys, monkeypatch):
    class Failed:
        returncode, stderr = 1, 'ERROR: No matching distribution found'
    monkeypatch.setattr(TOOL.subprocess, 'run', lambda *a, **k: Failed())
    cache, out = tmp_path / 'cache', tmp_path / 'out'
    code, err = _main(['--cache-dir', cache, '--out', out], capsys)
    assert code == 1 and len(err) == 1, err
    assert 'cannot fetch deepforest==2.1.0' in err[0]
    assert 'No matching distribution' in err[0] and '--wheel' in err[0]
    assert not out.exists() and os.listdir(cache) == []


def test_fetched_wheel_is_checked_before_it_is_cached(tmp_path, capsys,
                                                      monkeypatch):
    """A download with the wrong content never enters the cache."""
    def fake_pip(cmd, **kw):
        dest = cmd[cmd.index('-d') + 1]
        with open(os.path.join(dest, TOOL.WHEEL), 'wb') as f:
            f.write(b'not the wheel')

        class Done:
            returncode, stderr = 0, ''
        return Done()
    monkeypatch.setattr(TOOL.subprocess, 'run', fake_pip)
    cache = tmp_path / 'cache'
    code, err = _main(['--cache-dir', cache, '--out', tmp_path / 'o'], capsys)
    assert code == 1 and len(err) == 1 and 'sha256' in err[0], err
    assert os.listdir(cache) == []
    good = hashlib.sha256(b'not the wheel').hexdigest()
    assert good not in err[0].split('expected')[1]


def test_failure_midway_leaves_no_output(wheel, tmp_path):
    """A wheel whose XML disagrees with the pinned crown count: refused,
    and neither the output nor a temporary folder is left."""
    path, images, _ = wheel
    out = tmp_path / 'trees'
    bad = (images[0], ('site', 'test', 6))
    with pytest.raises(Exception, match='site.xml has 5 crowns, expected 6'):
        TOOL.convert(str(path), str(out), TILE, GAP, bad)
    assert sorted(os.listdir(tmp_path)) == [path.name]

"""Tests for nonlocalnet.data: every on-disk format is written here in its exact layout (tiny sizes)."""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from nonlocalnet.data import (
    CIFAR10_MEAN,
    DATASETS,
    IMAGENET_MEAN,
    BatchTransform,
    DemoDataset,
    RestrictedUnpickler,
    UnsafePickleError,
    build_dataset,
    generate_demo,
    load_restricted,
)
from nonlocalnet.data.demo import GLYPH_SIZE, GLYPHS
from nonlocalnet.data.imaging import center_box, random_box
from nonlocalnet.data.safe_pickle import _reconstruct
from nonlocalnet.data.ucf101 import sample_frame_indices

# ----------------------------------------------------------------------------------------------- CIFAR


def _dump(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def _cifar_data(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def make_cifar10(root, per_batch=2, test=3, seed=0):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(1, 6):
        data, labels = _cifar_data(rng, per_batch), [int(v) for v in rng.integers(0, 10, per_batch)]
        batches.append((data, labels))
        _dump(d / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels,
                                      b"data": data, b"filenames": [b"x.png"] * per_batch})
    tdata, tlabels = _cifar_data(rng, test), [int(v) for v in rng.integers(0, 10, test)]
    _dump(d / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": tlabels, b"data": tdata,
                             b"filenames": [b"t.png"] * test})
    names = [f"class{i}".encode() for i in range(10)]
    _dump(d / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return d, batches, (tdata, tlabels)


def make_cifar100(root, n_train=4, n_test=2, seed=1):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = _cifar_data(rng, n)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [int(v) for v in rng.integers(0, 20, n)]
        _dump(d / split, {b"filenames": [b"f.png"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
                          b"coarse_labels": coarse, b"data": data})
        out[split] = (data, fine, coarse)
    _dump(d / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                       b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return d, out


def test_cifar10_round_trip(tmp_path):
    d, batches, (tdata, tlabels) = make_cifar10(tmp_path)
    train = build_dataset("cifar10", tmp_path, "train")  # parent directory
    data = np.concatenate([b[0] for b in batches])
    labels = sum((b[1] for b in batches), [])
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == labels
    # pixel (c, y, x) of image i is data[i, c * 1024 + y * 32 + x]
    for i, c, y, x in [(0, 0, 0, 0), (3, 1, 5, 7), (9, 2, 31, 30), (6, 2, 17, 0)]:
        assert int(train.images[i, c, y, x]) == int(data[i, c * 1024 + y * 32 + x])
    assert torch.equal(train.images.reshape(10, -1), torch.from_numpy(data))
    img, label = train[4]
    assert isinstance(label, int) and label == labels[4] and torch.equal(img, train.images[4])
    assert train.classes == [f"class{i}" for i in range(10)]
    assert train.num_classes == 10 and train.mean == CIFAR10_MEAN and train.input_shape == (3, 32, 32)
    assert train.info.augment == {"crop_padding": 4, "flip": True}
    test = build_dataset("cifar10", d, "test")  # the directory itself; "val" is an alias
    assert test.labels.tolist() == tlabels
    assert torch.equal(test.images.reshape(3, -1), torch.from_numpy(tdata))
    assert build_dataset("CIFAR-10", d, "val").labels.tolist() == tlabels


def test_cifar100_fine_and_coarse(tmp_path):
    d, out = make_cifar100(tmp_path)
    fine = build_dataset("cifar100", tmp_path, "train")
    data, fine_labels, coarse_labels = out["train"]
    assert fine.num_classes == 100 and fine.labels.tolist() == fine_labels
    assert int(fine.images[2, 1, 3, 4]) == int(data[2, 1024 + 3 * 32 + 4])
    assert fine.classes[7] == "fine7"
    coarse = build_dataset("cifar100", d, "test", label_type="coarse")
    assert coarse.num_classes == 20 and coarse.labels.tolist() == out["test"][2]
    assert coarse.classes[19] == "coarse19"
    assert coarse.std != fine.mean and len(coarse) == 2


class _Py2Pickler(pickle._Pickler):
    """Writes like Python 2's cPickle did for the original CIFAR files: str as BINSTRING, numpy.core."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None):
        if obj is _reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def test_python2_style_pickle_loads(tmp_path):
    d, batches, _ = make_cifar10(tmp_path)
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    with open(d / "data_batch_2", "wb") as fh:
        _Py2Pickler(fh, protocol=2).dump({b"data": data, b"labels": [7, 8], b"batch_label": b"b2"})
    raw = (d / "data_batch_2").read_bytes()
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    ds = build_dataset("cifar10", d, "train")
    assert ds.labels[2:4].tolist() == [7, 8]
    assert torch.equal(ds.images[2:4].reshape(2, -1), torch.from_numpy(data))


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    _dump(evil, {b"data": _Evil(f"touch {marker}"), b"labels": [0]})
    with pytest.raises(UnsafePickleError) as err:
        load_restricted(evil)
    msg = str(err.value)
    assert str(evil) in msg and ".system'" in msg  # posix.system / nt.system
    assert not marker.exists()
    # the same file planted in a CIFAR directory
    d, _, _ = make_cifar10(tmp_path / "c")
    os.replace(evil, d / "data_batch_4")
    with pytest.raises(UnsafePickleError, match="data_batch_4"):
        build_dataset("cifar10", d, "train")
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(V1+1\ntR.",
    b"c_codecs\nencode\n(Vabc\nVrot13\ntR.",  # allowed global, refused codec
    b"cnumpy\nload\n(Vx\ntR.",
])
def test_other_globals_refused(payload):
    with pytest.raises(UnsafePickleError):
        RestrictedUnpickler(io.BytesIO(payload), encoding="latin1").load()


def test_cifar_errors(tmp_path):
    d, _, _ = make_cifar10(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("cifar10", d, "train")
    assert str(err.value) == (f"CIFAR-10 directory {d} lacks data_batch_3; "
                              "expected data_batch_1..5, test_batch, batches.meta")
    assert len(build_dataset("cifar10", d, "test")) == 3  # the test split does not need it
    with pytest.raises(FileNotFoundError, match="does not exist; expected train, test, meta"):
        build_dataset("cifar100", tmp_path / "nope", "train")
    _dump(d / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"test_batch: 'data' must be a uint8 array of shape \(N, 3072\)"):
        build_dataset("cifar10", d, "test")
    _dump(d / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(ValueError, match="outside"):
        build_dataset("cifar10", d, "test")
    (d / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read"):
        build_dataset("cifar10", d, "test")


def test_build_dataset_errors(tmp_path):
    with pytest.raises(ValueError) as err:
        build_dataset("mnist", tmp_path, "train")
    for name in DATASETS:
        assert name in str(err.value)
    assert sorted(DATASETS) == ["cifar10", "cifar100", "cub200", "demo", "folder", "ucf101"]
    with pytest.raises(TypeError, match="unknown option.*sizee.*valid options: size"):
        build_dataset("demo", None, "train", sizee=3)
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset("demo", None, "holdout")
    with pytest.raises(ValueError, match="root directory is required"):
        build_dataset("cifar10", None, "train")


# ------------------------------------------------------------------------------------ image folders


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _solid(color, h=20, w=30):
    return np.broadcast_to(np.array(color, np.uint8), (h, w, 3))


def test_image_folder(tmp_path):
    root = tmp_path / "imnet"
    _save(root / "train" / "dog" / "a.png", _solid((10, 20, 30)))
    _save(root / "train" / "dog" / "b.jpg", _solid((200, 100, 50)))
    _save(root / "train" / "cat" / "c.png", _solid((1, 2, 3), 40, 16))
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    half = np.zeros((24, 24, 3), np.uint8)
    half[:, :12] = (255, 0, 0)
    half[:, 12:] = (0, 0, 255)
    _save(root / "val" / "dog" / "v.png", half)
    train = build_dataset("folder", root, "train", size=16)
    assert train.classes == ["cat", "dog"] and train.num_classes == 2
    assert [(os.path.basename(p), y) for p, y in train.samples] == [("c.png", 0), ("a.png", 1), ("b.jpg", 1)]
    assert train.mean == IMAGENET_MEAN and train.input_shape == (3, 16, 16)
    img, label = train[1]
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 16) and label == 1
    assert img[:, 0, 0].tolist() == [10, 20, 30] and bool((img == img[:, :1, :1]).all())
    # training crops are reproducible per (seed, epoch, index)
    assert torch.equal(train[2][0], train[2][0])
    val = build_dataset("folder", root, "val", size=8, resize=8)
    img, label = val[0]
    assert label == 1 and img.shape == (3, 8, 8)
    assert img[:, 4, 0].tolist() == [255, 0, 0] and img[:, 4, 7].tolist() == [0, 0, 255]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset("folder", tmp_path / "missing", "train")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"lacks val or test/"):
        build_dataset("folder", tmp_path, "val")
    with pytest.raises(ValueError, match="holds no images"):
        build_dataset("folder", tmp_path, "train")
    _save(tmp_path / "val" / "zzz" / "x.png", _solid((0, 0, 0)))
    with pytest.raises(ValueError, match="class folder"):
        build_dataset("folder", tmp_path, "val")


def test_geometry_helpers():
    box, out = center_box(40, 20, size=16, resize=32)  # shorter side 20 -> 32: scale 1.6, crop 10x10 source
    assert out == (16, 16) and box == pytest.approx((15.0, 5.0, 25.0, 15.0))
    rng = np.random.default_rng(0)
    for _ in range(20):
        x0, y0, x1, y1 = random_box(50, 30, rng, scale=(0.3, 1.0))
        assert 0 <= x0 < x1 <= 50 and 0 <= y0 < y1 <= 30
        assert (x1 - x0) * (y1 - y0) >= 0.3 * 1500 - 1e-6


def make_cub(root):
    cub = root / "CUB_200_2011"
    colors = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (9, 9, 9)}
    paths = {1: "001.Albatross/a1.jpg", 2: "002.Auklet/b1.png", 3: "001.Albatross/a2.png",
             4: "002.Auklet/b2.png"}
    for i, p in paths.items():
        _save(cub / "images" / p, _solid(colors[i], 12, 12))
    (cub / "images.txt").write_text("".join(f"{i} {p}\n" for i, p in paths.items()))
    (cub / "image_class_labels.txt").write_text("1 1\n2 2\n3 1\n4 2\n")
    (cub / "train_test_split.txt").write_text("1 1\n2 0\n3 0\n4 1\n")
    (cub / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")
    return cub


def test_cub200(tmp_path):
    cub = make_cub(tmp_path)
    train = build_dataset("cub200", tmp_path, "train", size=8)  # parent directory
    assert train.num_classes == 2 and train.classes == ["001.Albatross", "002.Auklet"]
    assert [(os.path.basename(p), y) for p, y in train.samples] == [("a1.jpg", 0), ("b2.png", 1)]
    test = build_dataset("cub200", cub, "test", size=8)
    assert [(os.path.basename(p), y) for p, y in test.samples] == [("b1.png", 1), ("a2.png", 0)]
    img, label = test[1]
    assert label == 0 and img.shape == (3, 8, 8)
    assert bool((img[2] == 255).all()) and int(img[:2].max()) == 0  # a2.png is solid blue
    (cub / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("cub200", cub, "train")
    assert "lacks train_test_split.txt; expected images.txt, image_class_labels.txt" in str(err.value)


def make_ucf(root, class_ind=True, n_frames=(10, 3, 7)):
    videos = [("ApplyEyeMakeup", "v_ApplyEyeMakeup_g08_c01"), ("Biking", "v_Biking_g01_c02"),
              ("Archery", "v_Archery_g02_c01")]
    for (cls, vid), n in zip(videos, n_frames):
        for k in range(n):  # frame k is a solid gray of value 10 * (k + 1)
            _save(root / "frames" / cls / vid / f"frame{k + 1}.jpg", _solid((10 * (k + 1),) * 3, 16, 20))
    splits = root / "splits"
    splits.mkdir()
    if class_ind:
        (splits / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n3 Biking\n")
    (splits / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nBiking/v_Biking_g01_c02.avi 3\n")
    (splits / "testlist01.txt").write_text("Archery/v_Archery_g02_c01.avi\n")


def test_sample_frame_indices():
    assert sample_frame_indices(10, 4) == [1, 3, 6, 8]  # stride 2.5, centered
    assert sample_frame_indices(10, 4, offset=0.0) == [0, 2, 5, 7]
    assert sample_frame_indices(3, 5) == [0, 0, 1, 2, 2]  # stride 0.6: fewer frames than T repeat
    assert sample_frame_indices(8, 8, offset=0.99) == list(range(8))


def test_ucf101(tmp_path):
    make_ucf(tmp_path)
    test = build_dataset("ucf101", tmp_path, "test", frames=4, size=8)
    assert test.classes == ["ApplyEyeMakeup", "Archery", "Biking"] and test.num_classes == 3
    assert test.input_shape == (3, 4, 8, 8) and len(test) == 1
    clip, label = test[0]
    assert label == 1 and clip.dtype == torch.uint8 and clip.shape == (3, 4, 8, 8)
    # 7 frames, T=4: stride 1.75, centered -> frames 0, 2, 4, 6 -> gray 10, 30, 50, 70 (JPEG: +-2)
    levels = clip.float().mean(dim=(0, 2, 3))
    assert torch.allclose(levels, torch.tensor([10.0, 30.0, 50.0, 70.0]), atol=2.5)
    train = build_dataset("ucf101", tmp_path, "train", frames=4, size=8, seed=3)
    assert [y for _, y in train.samples] == [0, 2]
    clip, label = train[0]  # 10 frames, stride 2.5, random offset in [0, 2.5)
    gray = (clip.float().mean(dim=(0, 2, 3)) / 10).round().long() - 1
    steps = gray[1:] - gray[:-1]
    assert label == 0 and int(gray[0]) in (0, 1, 2) and set(steps.tolist()) <= {2, 3}
    assert torch.equal(train[0][0], clip)  # reproducible for the same (seed, epoch, index)
    clip3, _ = train[1]  # 3 frames for T=4: repeated frames
    assert clip3.shape == (3, 4, 8, 8)


def test_ucf101_without_class_ind_and_errors(tmp_path):
    make_ucf(tmp_path, class_ind=False)
    ds = build_dataset("ucf101", tmp_path, "test", frames=2, size=8)
    assert ds.classes == ["ApplyEyeMakeup", "Archery", "Biking"] and ds.samples[0][1] == 1
    with pytest.raises(FileNotFoundError, match="lacks splits/testlist02.txt"):
        build_dataset("ucf101", tmp_path, "test", fold=2)
    (tmp_path / "splits" / "testlist01.txt").write_text("Archery/v_Archery_g09_c09.avi\n")
    with pytest.raises(FileNotFoundError, match="v_Archery_g09_c09 does not exist"):
        build_dataset("ucf101", tmp_path, "test")


# ----------------------------------------------------------------------------------------------- demo


def test_demo_deterministic_and_balanced():
    a = build_dataset("demo", None, "train", train_size=200, seed=5)
    b = DemoDataset(None, "train", train_size=200, seed=5)
    c = build_dataset("demo", None, "train", train_size=200, seed=6)
    t = build_dataset("demo", None, "test", test_size=101, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images) and not torch.equal(a.images[:101], t.images)
    assert a.images.shape == (200, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.labels.dtype == torch.int64
    assert int(a.labels.sum()) == 100 and int(t.labels.sum()) == 50
    assert a.num_classes == 2 and a.input_shape == (3, 32, 32) and a.mean == t.mean and a.std == t.std
    assert all(0.05 < m < 0.3 for m in a.mean) and all(0.05 < s < 0.3 for s in a.std)
    # label == (same glyph); both glyph patterns equally frequent overall
    assert torch.equal(a.labels, (a.glyph_ids[:, 0] == a.glyph_ids[:, 1]).long())
    counts = torch.bincount(a.glyph_ids.reshape(-1), minlength=4)
    assert int(counts.min()) > 60


def test_demo_glyphs_are_drawn_far_apart():
    images, labels, glyph_ids, pos = generate_demo(64, np.random.default_rng(0), size=32, min_distance=16)
    d = pos[:, 0] - pos[:, 1]
    assert (np.hypot(d[:, 0], d[:, 1]) >= 16).all()
    assert pos.min() >= 1 and pos.max() <= 32 - GLYPH_SIZE - 1
    for i in range(64):
        for j in range(2):
            y, x = pos[i, j]
            patch = images[i, :, y:y + GLYPH_SIZE, x:x + GLYPH_SIZE]
            mask = GLYPHS[glyph_ids[i, j]]
            on = patch[:, mask]
            assert (on == on[:, :1]).all() and on.min() >= 96  # one bright color on the 9 glyph pixels
            assert patch[:, ~mask].max() <= 48  # background noise only inside the box
    assert (GLYPHS.sum(axis=(1, 2)) == 9).all() and len({g.tobytes() for g in GLYPHS}) == 4


def test_demo_glyph_subset():
    import hashlib
    a = build_dataset("demo", None, "train", train_size=400, seed=2, glyphs=["plus", "cross"])
    assert a.glyphs == ("plus", "cross") and set(a.glyph_ids.unique().tolist()) == {0, 1}
    assert torch.equal(a.labels, (a.glyph_ids[:, 0] == a.glyph_ids[:, 1]).long()) and int(a.labels.sum()) == 200
    # with two kinds, a "different" pair is always one of each
    diff = a.glyph_ids[a.labels == 0]
    assert (diff.min(1).values == 0).all() and (diff.max(1).values == 1).all()
    # the glyphs are painted as GLYPHS[glyph_ids]: check one
    y, x = a.glyph_positions[0, 0].tolist()
    patch = a.images[0, 0, y:y + GLYPH_SIZE, x:x + GLYPH_SIZE].numpy()
    assert ((patch >= 96) == GLYPHS[int(a.glyph_ids[0, 0])]).all()
    # the default draws from all four exactly as before the option existed (GENERATOR_VERSION 1)
    d = build_dataset("demo", None, "train", train_size=200, seed=5)
    assert d.glyphs == ("plus", "cross", "L", "T")
    assert hashlib.md5(d.images.numpy().tobytes()).hexdigest() == "65a4fb40d6a4779f64ebf9d4dea91013"
    for bad in (["plus"], ["plus", "plus"], ["plus", "star"], "plus"):
        with pytest.raises(ValueError, match="glyphs"):
            build_dataset("demo", None, "train", train_size=10, glyphs=bad)


def test_demo_cache(tmp_path):
    a = build_dataset("demo", tmp_path, "test", test_size=10)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    b = build_dataset("demo", tmp_path, "test", test_size=10)
    assert torch.equal(a.images, b.images) and torch.equal(a.glyph_positions, b.glyph_positions)
    c = build_dataset("demo", tmp_path, "test", test_size=10, glyphs=["L", "T"])  # its own file
    assert len(list(tmp_path.iterdir())) == 2 and set(c.glyph_ids.unique().tolist()) <= {2, 3}
    with pytest.raises(ValueError, match="not achievable"):
        build_dataset("demo", None, "train", size=16, min_distance=20)
    loader = torch.utils.data.DataLoader(a, batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == a.labels[:4].tolist()


# ------------------------------------------------------------------------------------- BatchTransform


def test_batch_transform_eval_exact():
    x = torch.randint(0, 256, (3, 3, 5, 6), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    out = BatchTransform(mean, std, train=False)(x)
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(
        std, dtype=torch.float64)[:, None, None]
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out.double(), ref, atol=1e-6, rtol=0)
    assert float(out[0, 1, 0, 0]) == pytest.approx((int(x[0, 1, 0, 0]) / 255 - 0.5) / 0.25, abs=1e-6)
    clips = torch.randint(0, 256, (2, 3, 4, 5, 6), dtype=torch.uint8)
    tf = BatchTransform(mean, std, train=False)
    assert torch.equal(tf(clips)[:, :, 2], tf(clips[:, :, 2].contiguous()))


def test_batch_transform_random_crop():
    x = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding is recognisable
    tf = BatchTransform((0.0,) * 3, (1.0,) * 3, train=True, crop_padding=4, flip=False,
                        generator=torch.Generator().manual_seed(0))
    out = tf.augment(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    offsets = set()
    for i in range(16):
        found = [(oy, ox) for oy in range(9) for ox in range(9)
                 if torch.equal(padded[i, :, oy:oy + 8, ox:ox + 8], out[i])]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 4  # per-sample offsets
    again = BatchTransform((0.0,) * 3, (1.0,) * 3, train=True, crop_padding=4, flip=False,
                           generator=torch.Generator().manual_seed(0)).augment(x)
    assert torch.equal(out, again)
    norm = tf(x)
    assert norm.dtype == torch.float32 and norm.shape == x.shape and float(norm.max()) <= 1.0


def test_batch_transform_flip_and_clips():
    x = torch.randint(0, 256, (32, 3, 4, 6), dtype=torch.uint8)
    tf = BatchTransform((0.5,) * 3, (0.5,) * 3, train=True, crop_padding=0, flip=True,
                        generator=torch.Generator().manual_seed(1))
    out = tf.augment(x)
    flipped = [bool(torch.equal(out[i], x[i].flip(-1))) for i in range(32)]
    kept = [bool(torch.equal(out[i], x[i])) for i in range(32)]
    assert all(f != k for f, k in zip(flipped, kept)) and 4 < sum(flipped) < 28
    # expected decisions: the generator's first draw after manual_seed(1)
    expect = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(1)).bool().tolist()
    assert flipped == expect
    # clips: one crop/flip for all frames of a clip
    frame = torch.randint(1, 256, (8, 3, 1, 8, 8), dtype=torch.uint8)
    clips = frame.expand(8, 3, 5, 8, 8).contiguous()
    tf = BatchTransform((0.0,) * 3, (1.0,) * 3, train=True, crop_padding=2,
                        generator=torch.Generator().manual_seed(2))
    out = tf(clips)
    assert out.shape == (8, 3, 5, 8, 8) and out.dtype == torch.float32
    assert torch.equal(out, out[:, :, :1].expand_as(out))
    assert not torch.equal(out, clips.float() / 255)
    eval_out = BatchTransform((0.0,) * 3, (1.0,) * 3, train=False)(clips)
    assert torch.equal(eval_out, clips.float() / 255)


def test_batch_transform_errors_and_dataset_helper():
    tf = BatchTransform((0.5,) * 3, (0.5,) * 3, train=True)
    with pytest.raises(TypeError, match="uint8"):
        tf(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        tf(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="std must be positive"):
        BatchTransform((0.5,), (0.0,), train=False)
    ds = build_dataset("demo", None, "test", test_size=4)
    t = ds.batch_transform(train=True, generator=torch.Generator().manual_seed(0))
    assert t.train and t.crop_padding == 0 and t.flip
    e = ds.batch_transform(train=False)
    assert torch.allclose(e(ds.images).mean(dim=(0, 2, 3)), torch.zeros(3), atol=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_transform_cuda():
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    cpu = BatchTransform((0.5,) * 3, (0.5,) * 3, train=True, generator=gen)(x)
    gen.manual_seed(0)
    cuda = BatchTransform((0.5,) * 3, (0.5,) * 3, train=True, generator=gen)(x.cuda())
    assert cuda.is_cuda and torch.allclose(cuda.cpu(), cpu)
    cuda_gen = torch.Generator(device="cuda").manual_seed(0)
    out = BatchTransform((0.5,) * 3, (0.5,) * 3, train=True, generator=cuda_gen)(x.cuda())
    assert out.shape == x.shape and out.is_cuda

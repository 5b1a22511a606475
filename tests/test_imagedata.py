"""ImageNet-style data (engine.imagedata): class folders of PNG and JPEG files of odd sizes, the validation layout
with a labels file, the evaluation transform, the packed store (round trip, several shards, resume, corrupt and
truncated shards) and the command line (certify on a folder and on its packed store give the same rows)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine import cli, data, models
from engine.data import DataError
from engine.imagedata import ImageFolderData, ImageView, PackedData, load_image, pack, resize_size


def _write(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


@pytest.fixture
def folder(tmp_path):
    """3 classes (folders named out of order), PNG / JPEG, RGB / grey / RGBA, odd sizes, a nested folder, a text file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    _write(root / "zebra" / "b.png", rng.integers(0, 256, (45, 37, 3), dtype=np.uint8))
    _write(root / "zebra" / "a.jpg", rng.integers(0, 256, (60, 81, 3), dtype=np.uint8))
    _write(root / "apple" / "x.png", rng.integers(0, 256, (40, 40), dtype=np.uint8))  # grey
    _write(root / "apple" / "sub" / "y.png", rng.integers(0, 256, (33, 70, 4), dtype=np.uint8))  # RGBA, nested
    _write(root / "mango" / "m.JPEG", rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    (root / "mango" / "notes.txt").write_text("not an image")
    return root


def test_folder_order_labels_and_shapes(folder):
    ds = ImageFolderData(folder, 32)
    assert ds.classes == ["apple", "mango", "zebra"]
    names = [p.relative_to(folder).as_posix() for p, _ in ds.samples]
    assert names == ["apple/x.png", "apple/sub/y.png", "mango/m.JPEG", "zebra/a.jpg", "zebra/b.png"]
    assert ds.targets == [0, 0, 1, 2, 2]
    for k in range(len(ds)):
        img, label = ds[k]
        assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 32, 32) and label == ds.targets[k]
    view = ImageView(ds, (3, 32, 32))
    assert view.shape == (5, 3, 32, 32) and torch.equal(view[torch.tensor([4, 0])], torch.stack([ds[4][0], ds[0][0]]))
    assert torch.equal(view[1:3], torch.stack([ds[1][0], ds[2][0]]))


def test_transform_crops_the_centre_exactly_and_resizes_in_proportion(tmp_path):
    """An image whose shorter side is already size / 0.875 is not resampled: the crop is its exact centre, at
    torchvision's CenterCrop offsets. A resized image keeps its aspect (shorter side to 256 for 224) and a constant
    image stays constant."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (300, 256, 3), dtype=np.uint8)  # H 300, W 256: short side 256 = resize_size(224)
    _write(tmp_path / "a.png", arr)
    assert resize_size(224) == 256
    out = load_image(tmp_path / "a.png", 224).numpy().transpose(1, 2, 0)
    top, left = int(round((300 - 224) / 2.0)), int(round((256 - 224) / 2.0))
    assert np.array_equal(out, arr[top : top + 224, left : left + 224])
    _write(tmp_path / "c.png", np.full((37, 90, 3), 77, np.uint8))
    assert torch.equal(load_image(tmp_path / "c.png", 16), torch.full((3, 16, 16), 77, dtype=torch.uint8))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="bad.png"):
        load_image(tmp_path / "bad.png", 16)


def test_validation_layout(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "val"
    for name in ("v1.png", "v2.jpg", "v3.png"):
        _write(root / name, rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    (tmp_path / "wnid.txt").write_text("v1.png n02\nv2.jpg n01\n\nv3.png n02\n")
    with pytest.raises(DataError, match="give the class list"):  # names are numbered by the full class list
        ImageFolderData(root, 16, labels_file=tmp_path / "wnid.txt")
    for d in ("n00", "n01", "n02", "n03"):  # a training folder with a class the validation file does not use
        (tmp_path / "train" / d).mkdir(parents=True)
    ds = ImageFolderData(root, 16, labels_file=tmp_path / "wnid.txt", classes=tmp_path / "train")
    assert ds.classes == ["n00", "n01", "n02", "n03"] and ds.targets == [2, 1, 2]
    (tmp_path / "names.txt").write_text("n02\nn01\n")
    assert ImageFolderData(root, 16, labels_file=tmp_path / "wnid.txt", classes=tmp_path / "names.txt").targets == [0, 1, 0]
    with pytest.raises(DataError, match="not in the class list: n02"):
        ImageFolderData(root, 16, labels_file=tmp_path / "wnid.txt", classes=["n01"])
    (tmp_path / "idx.txt").write_text("v3.png 7\nv1.png 0\n")
    ds = ImageFolderData(root, 16, labels_file=tmp_path / "idx.txt")
    assert ds.targets == [7, 0] and len(ds.classes) == 8 and tuple(ds[0][0].shape) == (3, 16, 16)
    for text, match in (("v9.png 1\n", "v9.png, which is not a file"), ("v1.png\n", "expected '<file name> <label>'"),
                        ("", "no labels")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(DataError, match=match):
            ImageFolderData(root, 16, labels_file=tmp_path / "bad.txt")
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderData(root, 16)


def test_pack_round_trip_over_several_shards_and_resume(folder, tmp_path):
    ds = ImageFolderData(folder, 24)
    index = pack(ds, tmp_path / "packed", shard_images=2, source={"root": str(folder)})
    assert [s["count"] for s in index["shards"]] == [2, 2, 1] and index["image_shape"] == [3, 24, 24]
    packed = PackedData(tmp_path / "packed")
    assert len(packed) == len(ds) and packed.classes == ds.classes and packed.targets.tolist() == ds.targets
    for k in range(len(ds)):
        assert torch.equal(packed[k][0], ds[k][0]) and packed[k][1] == ds[k][1]
    with pytest.raises(DataError, match="already holds a packed store"):
        pack(ds, tmp_path / "packed")

    class Failing:  # stops at image 3: the first shard is kept, a second run continues after it
        classes, targets = ds.classes, ds.targets

        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            if i == 3:
                raise KeyboardInterrupt
            return ds[i]

    with pytest.raises(KeyboardInterrupt):
        pack(Failing(), tmp_path / "again", shard_images=2)
    assert json.loads((tmp_path / "again" / "index.partial.json").read_text())["shards"][0]["count"] == 2
    with pytest.raises(DataError, match="unfinished pack"):
        PackedData(tmp_path / "again")
    pack(ds, tmp_path / "again", shard_images=2)
    again = PackedData(tmp_path / "again")
    assert all(torch.equal(again[k][0], packed[k][0]) for k in range(len(ds)))
    assert not (tmp_path / "again" / "index.partial.json").exists()
    with pytest.raises(DataError, match="another pack"):  # a partial pack of other settings is not continued
        with pytest.raises(KeyboardInterrupt):
            pack(Failing(), tmp_path / "third", shard_images=2)
        pack(ds, tmp_path / "third", shard_images=3)


def test_damaged_stores_are_refused_with_the_shard_name(folder, tmp_path):
    pack(ImageFolderData(folder, 16), tmp_path / "p", shard_images=2)
    shard = tmp_path / "p" / "shard-00001.npy"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10])
    with pytest.raises(DataError, match="shard-00001.npy has .* bytes"):
        PackedData(tmp_path / "p")
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    store = PackedData(tmp_path / "p")  # sizes fine: the hash is checked when the shard is first read
    store[0]
    with pytest.raises(DataError, match="shard-00001.npy does not match its sha256"):
        store[2]
    shard.unlink()
    with pytest.raises(DataError, match="shard-00001.npy is missing"):
        PackedData(tmp_path / "p")
    with pytest.raises(DataError, match="not a packed store"):
        PackedData(folder)


def test_cli_certify_folder_and_packed_store_give_the_same_rows(folder, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "resnet20.safetensors"
    models.save(models.build("resnet20", num_classes=3), ckpt, sigma=0.25)
    assert cli.main(["data", "pack", str(folder), str(tmp_path / "store"), "--image-size", "32", "--shard-images", "2",
                     "--quiet"]) == 0
    base = ["certify", "--checkpoint", str(ckpt), "--n0", "8", "--n", "40", "--quiet"]
    assert cli.main([*base, "--dataset", "imagefolder", "--data-root", str(folder), "--image-size", "32",
                     "--out", str(tmp_path / "f.tsv")]) == 0
    assert cli.main([*base, "--dataset", "packed", "--data-root", str(tmp_path / "store"),
                     "--out", str(tmp_path / "p.tsv")]) == 0

    def rows(name):
        return [line.split("\t")[:5] for line in (tmp_path / name).read_text().splitlines()]

    assert rows("f.tsv") == rows("p.tsv") and len(rows("f.tsv")) == 6
    settings = json.loads((tmp_path / "f.json").read_text())["settings"]
    assert settings["dataset"] == "imagefolder" and settings["image_size"] == 32
    images, labels = data.load_dataset("packed", tmp_path / "store", "test")
    assert images.shape == (5, 3, 32, 32) and labels.tolist() == [0, 0, 1, 2, 2]
    for extra, match in ((["--dataset", "packed", "--data-root", str(tmp_path / "store"), "--image-size", "64"],
                          "not the 64 asked for"),
                         (["--dataset", "mnist", "--val-labels", "x.txt"], "--val-labels and --val-classes apply to"),
                         (["--dataset", "imagenet-val", "--data-root", str(folder)], "needs its labels file"),
                         (["--dataset", "imagefolder"], "needs --data-root")):
        capsys.readouterr()
        assert cli.main([*base, *extra, "--out", str(tmp_path / "x.tsv")]) == 2, match
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err


def _classes_folder(root, names, per_class, seed):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(names):
        for i in range(per_class):
            h, w = rng.integers(9, 15, 2)
            arr = (rng.integers(0, 60, (h, w, 3)) + 60 * c).astype(np.uint8)  # classes differ in brightness
            _write(root / name / f"{i}.{'png' if i % 2 else 'jpg'}", arr)
    return root


def test_cli_train_poison_evaluate_on_image_folders(tmp_path, capsys):
    """train / poison / evaluate take --dataset imagefolder (decoded once into memory) and packed stores: a folder and
    its packed store train the same model; evaluate certifies --test-root, numbered as the training folder."""
    from safetensors.torch import load_file

    from engine.pacd import PoisonSet

    train = _classes_folder(tmp_path / "train", ["cat", "dog", "owl"], 6, 1)
    test = _classes_folder(tmp_path / "test", ["cat", "dog", "owl"], 2, 2)
    assert cli.main(["data", "pack", str(train), str(tmp_path / "store"), "--image-size", "8", "--quiet"]) == 0
    common = ["--arch", "resnet20", "--sigma", "0.25", "--val-size", "6", "--quiet"]
    fit = ["train", "--method", "gaussian", "--epochs", "1", "--batch-size", "4", *common]
    assert cli.main([*fit, "--dataset", "imagefolder", "--data-root", str(train), "--image-size", "8",
                     "--out", str(tmp_path / "f.safetensors")]) == 0
    assert cli.main([*fit, "--dataset", "packed", "--data-root", str(tmp_path / "store"),
                     "--out", str(tmp_path / "p.safetensors")]) == 0
    a, b = load_file(tmp_path / "f.safetensors"), load_file(tmp_path / "p.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = models.read_meta(tmp_path / "f.safetensors")["meta"]
    assert meta["dataset"] == "imagefolder" and meta["image_size"] == 8 and meta["train_size"] == 12

    folder = ["--dataset", "imagefolder", "--data-root", str(train), "--image-size", "8"]
    assert cli.main(["poison", *folder, *common, "--target-class", "1", "--eps", "0.1", "--outer-steps", "1",
                     "--batch-clean", "6", "--batch-poison", "3", "--batch-val", "3", "--upper-k", "2", "--niter1", "1",
                     "--niter2", "1", "--out", str(tmp_path / "poison.safetensors")]) == 0
    images, labels = data.split_validation(*data.load_dataset("packed", tmp_path / "store", "train"), 6)[0]
    ps = PoisonSet.load(tmp_path / "poison.safetensors", (images[:], labels))  # the store's images are the folder's
    assert ps.target_class == 1 and ps.settings["image_size"] == 8 and len(ps) == int((labels == 1).sum())

    ev = ["evaluate", "--poison", str(tmp_path / "poison.safetensors"), *folder, *common, "--epochs", "1",
          "--images", "2", "--n0", "5", "--n", "20", "--controls", "vertex"]
    assert cli.main([*ev, "--test-root", str(test), "--out-dir", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["images"] == 2 and summary["target_class"] == 1 and summary["poisoned"]
    assert json.loads((tmp_path / "ev" / "controls" / "vertex-seed0" / "summary.json").read_text())["images"] == 2
    rows = (tmp_path / "ev" / "certify.tsv").read_text().splitlines()[1:]
    samples = ImageFolderData(test, 8).samples
    assert sorted(samples[int(r.split("\t")[0])][0].parent.name for r in rows) == ["dog", "dog"]  # class 1's files

    _classes_folder(tmp_path / "other", ["cat", "owl"], 2, 3)
    assert cli.main(["data", "pack", str(test), str(tmp_path / "test16"), "--image-size", "16", "--quiet"]) == 0
    for extra, match in (([], "give --test-root"),
                         (["--test-root", str(tmp_path / "other")], "the class indices would not match"),
                         (["--test-dataset", "imagenet-val", "--test-root", str(test)], "needs its labels file"),
                         (["--test-dataset", "packed", "--test-root", str(tmp_path / "test16")],
                          "holds 3x16x16 images but the training images are 3x8x8")):
        capsys.readouterr()
        assert cli.main([*ev, *extra, "--out-dir", str(tmp_path / "never")]) == 2, match
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
    flat = tmp_path / "val"  # the validation layout: test images in one folder, numeric labels
    flat.mkdir()
    lines = []
    for i, (path, label) in enumerate(ImageFolderData(test, 8).samples):
        (flat / f"v{i}{path.suffix}").write_bytes(path.read_bytes())
        lines.append(f"v{i}{path.suffix} {label}")
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    packed = ["evaluate", "--clean", "--target-class", "2", "--dataset", "packed", "--data-root", str(tmp_path / "store"),
              *common, "--epochs", "1", "--images", "2", "--n0", "5", "--n", "20", "--controls", "none"]
    assert cli.main([*packed, "--test-dataset", "imagenet-val", "--test-root", str(flat), "--val-labels",
                     str(tmp_path / "val.txt"), "--out-dir", str(tmp_path / "ev2")]) == 0  # 8x8: the store's size
    rows = (tmp_path / "ev2" / "certify.tsv").read_text().splitlines()[1:]
    assert sorted(int(r.split("\t")[0]) for r in rows) == [4, 5]  # the two owls (class 2) of the flat folder

    mnist = ["evaluate", "--clean", "--target-class", "8", "--sigma", "0.25", "--quiet", "--out-dir", str(tmp_path / "x")]
    for extra, match in ((["--test-root", str(test)], "--test-root and --test-dataset apply to the image data sets"),
                         (["--image-size", "8"], "--image-size applies to the image-folder data sets")):
        capsys.readouterr()
        assert cli.main([*mnist, *extra]) == 2, match
        assert match in capsys.readouterr().err


def test_materialise_decodes_once_in_chunks_and_refuses_a_set_too_large_before_decoding(folder, monkeypatch):
    from engine import imagedata
    from engine.imagedata import materialise

    view, _ = data.load_dataset("imagefolder", folder, "train", image_size=16)
    whole = materialise(view, "the folder", chunk=2)
    assert whole.dtype == torch.uint8 and whole.shape == (5, 3, 16, 16)
    assert all(torch.equal(whole[i], view[i]) for i in range(5))
    assert materialise(whole, "a tensor") is whole

    class Undecodable:  # the same shape; decoding any image fails the test
        def __len__(self):
            return 5

        def __getitem__(self, i):
            raise AssertionError("decoded before the memory check")

    big = ImageView(Undecodable(), (3, 16, 16))  # 3,840 bytes
    monkeypatch.setattr(imagedata, "memory_bytes", lambda: 10_000)
    with pytest.raises(DataError, match=r"the folder holds 5 images of 3x16x16: .*3 x that = .* GiB held, more than 80%"):
        materialise(big, "the folder", copies=3)  # 11,520 > 8,000
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(DataError, match=r"x 3 processes"):
        materialise(big, "the folder")  # each of the node's 3 processes decodes its own copy
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert materialise(view, "the folder", copies=2).shape == (5, 3, 16, 16)  # 7,680 <= 8,000

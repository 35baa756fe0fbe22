"""Images at their own resolution: crops on the device, decoding, the prepared form, shards."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import sslplug
from sslplug.cli import main
from sslplug.config import DataSettings
from sslplug.data import (
    ImageStore,
    Loader,
    center_boxes,
    decode_image,
    fit_batch,
    load_data,
    pad_batch,
    prepare,
    read_store,
    resized_crops,
    sample_boxes,
    write_store,
)
from sslplug.errors import ConfigError, DataError

CPU = torch.device("cpu")


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random colour field: compresses like a photo, differs per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


def _photo_folder(root, sizes, classes=2):
    for i, (h, w) in enumerate(sizes):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(h, w, i)).save(folder / f"{i:03d}.jpg", quality=95)
    return root


SIZES = [(40, 60), (60, 40), (48, 48), (36, 90), (80, 50), (44, 66)] * 3


# ------------------------------------------------------------------------------------------
# crops


def test_random_boxes_lie_inside_each_image_with_the_area_and_aspect_asked():
    extents = torch.tensor([[100, 50], [30, 200], [64, 64], [500, 375]] * 250)
    g = torch.Generator().manual_seed(0)
    boxes = sample_boxes(extents, (0.2, 0.6), (3 / 4, 4 / 3), generator=g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= -1e-4).all()
    assert (boxes[:, 2] <= extents[:, 1] + 1e-3).all()
    assert (boxes[:, 3] <= extents[:, 0] + 1e-3).all()
    share = w * h / extents.prod(dim=1)
    aspect = w / h
    assert share.min() >= 0.2 - 1e-4 and share.max() <= 0.6 + 1e-4
    assert aspect.min() >= 3 / 4 - 1e-4 and aspect.max() <= 4 / 3 + 1e-4
    # positions spread over the free room, not stuck at a corner
    x_room = (extents[:, 1] - w).clamp(min=1e-6)
    assert 0.4 < (boxes[:, 0] / x_room).mean() < 0.6


def test_a_box_that_cannot_fit_falls_back_to_the_centred_box_of_a_valid_aspect():
    extents = torch.tensor([[10, 1000]])  # 100:1, no crop of aspect <= 4/3 covers 90% of it
    box = sample_boxes(extents, (0.9, 1.0), (3 / 4, 4 / 3), generator=torch.Generator())[0]
    w, h = box[2] - box[0], box[3] - box[1]
    assert h == pytest.approx(10) and w == pytest.approx(10 * 4 / 3)
    assert box[0] == pytest.approx((1000 - w) / 2)


def test_an_integer_box_at_its_own_size_copies_its_pixels():
    images = torch.rand(2, 3, 20, 30)
    boxes = torch.tensor([[5.0, 3.0, 13.0, 11.0], [0.0, 12.0, 8.0, 20.0]])
    crops = resized_crops(images, boxes, 8)
    assert torch.allclose(crops[0], images[0, :, 3:11, 5:13], atol=1e-6)
    assert torch.allclose(crops[1], images[1, :, 12:20, 0:8], atol=1e-6)


def test_shrinking_a_box_averages_its_pixels_instead_of_aliasing():
    stripes = torch.zeros(1, 1, 64, 64)
    stripes[..., ::2] = 1.0  # one-pixel stripes: point sampling would give all 0 or all 1
    crop = resized_crops(stripes, torch.tensor([[0.0, 0.0, 64.0, 64.0]]), 8)
    assert torch.allclose(crop, torch.full_like(crop, 0.5), atol=0.02)


def test_padding_repeats_the_edges_so_crops_at_the_border_see_no_black():
    a = torch.full((3, 10, 7), 200, dtype=torch.uint8)
    b = torch.full((3, 4, 12), 100, dtype=torch.uint8)
    canvas, extents = pad_batch([a, b])
    # the portrait image lies on its side: a 7x12 canvas, not 10x12
    assert canvas.shape == (2, 3, 7, 12) and extents.tolist() == [[7, 10, 1], [4, 12, 0]]
    assert (canvas[0] == 200).all() and (canvas[1] == 100).all()
    fitted = fit_batch(canvas, extents, 5)
    assert (fitted[0] == 200).all() and (fitted[1] == 100).all()


def test_portrait_images_are_cropped_upright_with_their_own_aspect_ratios():
    portrait = torch.zeros(3, 60, 20, dtype=torch.uint8)
    portrait[:, :30] = 255  # top half white: an upright crop of the middle is white above
    canvas, extents = pad_batch([portrait, torch.zeros(3, 20, 50, dtype=torch.uint8)])
    assert extents[0].tolist() == [20, 60, 1]
    fitted = fit_batch(canvas, extents, 10)
    assert fitted[0, :, :4].float().mean() > 250 and fitted[0, :, 6:].float().mean() < 5
    # aspect ratios (upright width / height) stay inside (1/2, 1) for the turned image too
    many = extents[:1].expand(2000, 3)
    boxes = sample_boxes(many, (0.1, 0.3), (1 / 2, 1.0), generator=torch.Generator())
    upright_aspect = (boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0])  # turned back
    assert upright_aspect.min() >= 0.5 - 1e-4 and upright_aspect.max() <= 1.0 + 1e-4


def test_fitting_matches_resize_and_centre_crop():
    from torchvision.transforms.v2 import functional as F

    image = torch.from_numpy(_photo(45, 70, 3).copy()).permute(2, 0, 1).contiguous()
    ours = fit_batch(image[None], torch.tensor([[45, 70]]), 15)[0]
    reference = F.center_crop(F.resize(image, 15, antialias=True), [15, 15])
    assert (ours.float() - reference.float()).abs().mean() < 3.0
    assert center_boxes(torch.tensor([[45, 70]])).tolist() == [[12.5, 0.0, 57.5, 45.0]]


def test_the_crop_module_keeps_kornia_on_equal_size_batches_and_crops_within_extents():
    crop = sslplug.RandomResizedCrop(8, scale=(0.5, 1.0))
    torch.manual_seed(0)
    ours = crop(torch.rand(4, 3, 16, 16))
    torch.manual_seed(0)
    kornia = crop.uniform(torch.rand(4, 3, 16, 16))
    assert torch.equal(ours, kornia)
    white, black = torch.full((3, 20, 10), 255, dtype=torch.uint8), torch.zeros(3, 40, 40)
    canvas, extents = pad_batch([white, white, black.to(torch.uint8)])
    out = crop(canvas.float() / 255, extents)
    assert out.shape == (3, 3, 8, 8) and out[:2].min() > 0.99 and out[2].max() == 0


# ------------------------------------------------------------------------------------------
# decoding


def test_decoding_applies_the_exif_orientation(tmp_path):
    pixels = _photo(30, 50, 0)
    pil = Image.fromarray(pixels)
    exif = pil.getexif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to show upright
    pil.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    image = decode_image(tmp_path / "turned.jpg")
    assert image.shape == (3, 50, 30)
    upright = np.rot90(pixels, k=-1)
    assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - upright).mean() < 4


def test_decoding_bounds_the_shorter_side_and_the_aspect_ratio(tmp_path):
    Image.fromarray(_photo(300, 400, 1)).save(tmp_path / "photo.jpg")
    assert decode_image(tmp_path / "photo.jpg", short_side=74).shape == (3, 74, 99)
    assert decode_image(tmp_path / "photo.jpg", short_side=500).shape == (3, 300, 400)
    Image.fromarray(_photo(10, 100, 2)).save(tmp_path / "panorama.png")
    assert decode_image(tmp_path / "panorama.png").shape == (3, 10, 30)


def test_a_folder_default_size_is_the_median_not_the_first_file(tmp_path):
    root = _photo_folder(tmp_path / "d", [(40, 40)] * 6)
    Image.fromarray(_photo(1, 1, 0)).save(root / "c0" / "000_first.png")  # sorts first
    data = load_data(DataSettings(name=str(root), workers=0, test_fraction=0))
    assert data.image_size == 40


def test_a_folder_of_tiny_images_is_refused_with_the_size_named(tmp_path):
    root = _photo_folder(tmp_path / "d", [(3, 4)] * 4)
    with pytest.raises(DataError, match=r"median shorter side 3 px.*data\.image_size"):
        load_data(DataSettings(name=str(root), workers=0))


@pytest.mark.parametrize("size", [4, 5000])
def test_absurd_image_sizes_are_refused(size):
    with pytest.raises(ConfigError, match=rf"image_size must be 0 .* 1024 pixels, got {size}"):
        DataSettings(image_size=size)


# ------------------------------------------------------------------------------------------
# the stored form and the loader


def test_a_folder_of_mixed_sizes_keeps_each_image_at_its_own_resolution(tmp_path):
    root = _photo_folder(tmp_path / "d", SIZES)
    data = load_data(DataSettings(name=str(root), image_size=32, workers=0, test_fraction=0))
    store = data.train.store
    assert store is not None and not store.on_disk
    short = math.ceil(1.15 * 32)
    for (h, w) in store.shapes.tolist():
        assert min(h, w) <= short and max(h, w) <= 3 * min(h, w)
    loader = Loader(data.train, 6, CPU, shuffle=True, drop_last=True, workers=0,
                    full_resolution=True)
    images, _, extents = next(iter(loader.epoch(0)))
    assert images.dtype == torch.uint8 and extents.shape == (6, 3)
    assert (extents[:, :2] <= torch.tensor(images.shape[-2:])).all()
    views = sslplug.MultiViewGenerator(sslplug.byol_recipe(32))
    assert views.full_resolution
    out = views(images, extents)
    assert [v.shape for v in out.images] == [(6, 3, 32, 32)] * 2
    squares, _ = next(iter(Loader(data.train, 6, CPU, True, True, workers=0).epoch(0)))
    assert squares.shape == (6, 3, 32, 32)


def test_generators_written_for_square_batches_are_not_given_extents():
    class Own(sslplug.MultiViewGenerator):
        def forward(self, batch):  # an older subclass: no extents parameter
            return super().forward(batch)

    recipe = sslplug.byol_recipe(16)
    assert not Own(recipe).full_resolution
    assert not sslplug.MultiViewGenerator([torch.nn.Identity()]).full_resolution


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_prepared_data_reads_back_from_memory_and_from_disk_in_workers(tmp_path, encoding):
    root = _photo_folder(tmp_path / "d", SIZES)
    settings = DataSettings(name=str(root), image_size=32, workers=0, test_fraction=0.2)
    source = load_data(settings)
    marker = prepare(settings, tmp_path / "p", encoding=encoding)
    assert marker["splits"]["train"]["images"] == len(source.train)
    assert marker["splits"]["test"]["images"] == len(source.test)
    on_disk = load_data(DataSettings(name=str(tmp_path / "p"), cache_gb=0.0, workers=2))
    in_memory = load_data(DataSettings(name=str(tmp_path / "p"), workers=0))
    assert on_disk.train.store.on_disk and not in_memory.train.store.on_disk
    assert on_disk.image_size == 32 and on_disk.classes == source.classes
    assert torch.equal(on_disk.train.labels, source.train.labels)
    assert on_disk.train.store.shapes.tolist() == source.train.store.shapes.tolist()

    def batches(data, workers):
        loader = Loader(data.train, 5, CPU, shuffle=True, drop_last=True, workers=workers,
                        full_resolution=True, seed=3)
        return list(loader.epoch(1))

    for (a, la, ea), (b, lb, eb), (c, lc, ec) in zip(
        batches(on_disk, 2), batches(in_memory, 0), batches(source, 0)
    ):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ea, eb)
        assert torch.equal(la, lc) and torch.equal(ea, ec)
        tolerance = 0 if encoding == "raw" else 6  # JPEG at quality 95
        assert (a.float() - c.float()).abs().mean() <= tolerance


@pytest.mark.parametrize("workers", [0, 2])
def test_jpeg_bytes_decoded_where_the_batch_goes_give_the_same_batches(tmp_path, workers):
    """On a GPU the loader decodes a JPEG store's bytes there (nvJPEG, a batch per call); the
    same path, run here on the CPU, gives the batches the workers' decoding gives."""
    root = _photo_folder(tmp_path / "d", SIZES)
    prepare(DataSettings(name=str(root), image_size=32, workers=0), tmp_path / "p",
            encoding="jpeg")
    data = load_data(DataSettings(name=str(tmp_path / "p"), cache_gb=0.0 if workers else 4.0))

    def batches(on_device):
        loader = Loader(data.train, 4, CPU, shuffle=True, drop_last=True, workers=workers,
                        full_resolution=True, seed=2)
        assert not loader.decode_on_device  # only on CUDA by default
        loader.decode_on_device = on_device
        return list(loader.epoch(0))

    for (a, la, ea), (b, lb, eb) in zip(batches(True), batches(False)):
        assert torch.equal(a, b) and torch.equal(la, lb)
        assert (ea is None and eb is None) or torch.equal(ea, eb)


def test_prepare_refuses_a_folder_that_is_not_empty_and_cli_reports(tmp_path):
    root = _photo_folder(tmp_path / "d", SIZES[:6])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"exists and is not empty"):
        prepare(DataSettings(name=str(root), workers=0), tmp_path / "full")
    done = subprocess.run(
        [sys.executable, "-m", "sslplug", "prepare", str(root), str(tmp_path / "p"),
         "--image-size", "16", "--workers", "0"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "for 16 px crops (shorter sides up to 19 px, raw)" in done.stdout
    marker, splits = read_store(tmp_path / "p")
    assert marker["classes"] == ["c0", "c1"] and set(splits) == {"train", "test"}
    bad = subprocess.run(
        [sys.executable, "-m", "sslplug", "prepare", str(root), str(tmp_path / "q"),
         "--image-size", "2"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "--image-size must be 0" in bad.stderr


def test_a_store_index_that_outruns_its_file_is_a_clear_error(tmp_path):
    images = [torch.full((3, 4, 5), i, dtype=torch.uint8) for i in range(3)]
    write_store(tmp_path / "p", {"train": ((im, 0) for im in images)}, image_size=8,
                store_scale=1.15, classes=(), encoding="raw", source="test")
    shard = tmp_path / "p" / "train-00000.bin"
    _, splits = read_store(tmp_path / "p")
    store, _ = splits["train"]
    shard.write_bytes(shard.read_bytes()[:70])  # cut short after it was opened
    assert torch.equal(store.images([0])[0], images[0])
    with pytest.raises(DataError, match=r"shorter than its index says.*sslplug prepare"):
        store.images([2])
    with pytest.raises(DataError, match=r"is 70 bytes, but the index.pt beside it places "
                       r"images in it up to byte 180"):
        read_store(tmp_path / "p")  # cut short before: refused when it is read


def _prepared(tmp_path, encoding="raw"):
    """A prepared folder of the 18 photos of ``SIZES`` (two classes, a held-out test split)."""
    root = _photo_folder(tmp_path / "d", SIZES)
    prepare(DataSettings(name=str(root), image_size=16, workers=0), tmp_path / "p",
            encoding=encoding)
    return tmp_path / "p"


def _run_on(data, tmp_path, capsys, *more):
    """``sslplug run`` for one step on ``data``; its exit status and what it wrote to stderr."""
    code = main([
        "run", "--plugin", "simclr", "--data", str(data), "--epochs", "1",
        "--out", str(tmp_path / "run"), "--set", "train.batch_size=4",
        "--set", "train.disable=['progress']", "--set", "data.workers=0",
        "--set", "train.max_steps_per_epoch=1", "--set", "knn.k=3", *more,
    ])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
@pytest.mark.parametrize("cache", ["in memory", "from disk"])
def test_a_truncated_prepared_shard_is_refused_at_load_naming_the_file(
    tmp_path, capsys, encoding, cache
):
    """Held in memory, the cut file used to surface as an error of the health plugin, then of
    knn, then of view_grid, then as a traceback ("Image is incomplete" for JPEG)."""
    folder = _prepared(tmp_path, encoding)
    shard = folder / "train-00000.bin"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    more = ["--set", "data.cache_gb=0"] if cache == "from disk" else []
    code, err = _run_on(folder, tmp_path, capsys, *more)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.strip() == (
        f"sslplug: error: the prepared data file '{shard}' is {size // 2} bytes, but the "
        f"index.pt beside it places images in it up to byte {size}: the file is cut short or "
        f"damaged. Prepare the data again with sslplug prepare"
    )
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.pt"))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[]", "it holds an array, not the JSON object sslplug prepare writes"),
        ('"p"', "it holds a string, not the JSON object sslplug prepare writes"),
        ("null", "it holds null, not the JSON object sslplug prepare writes"),
        ("{}", "its format is None, not 'sslplug-prepared'"),
        (None, "it has no 'classes'"),
    ],
)
def test_a_marker_that_is_not_what_prepare_writes_is_refused(tmp_path, capsys, content, expected):
    folder = _prepared(tmp_path)
    marker = folder / "sslplug-data.json"
    if content is None:  # the right object without one of its fields
        data = json.loads(marker.read_text())
        del data["classes"]
        content = json.dumps(data)
    marker.write_text(content)
    code, err = _run_on(folder, tmp_path, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (
        f"sslplug: error: '{marker}' is not the marker of prepared data: {expected}. Prepare "
        f"the data again with sslplug prepare"
    )


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("no shapes", "its split 'train': it has no 'shapes'"),
        ("no labels", "its split 'test': it has no 'labels'"),
        ("a list", "it holds a list"),
        ("no train", "it holds no 'train' split"),
        ("short offsets", "its split 'train': its 'offsets' are (3,), not (17,)"),
        ("float lengths", "its split 'train': its 'lengths' is not an int64 tensor"),
        ("a path", "its split 'train': its 'files' are ['../train-00000.bin'], not a list"),
    ],
)
def test_an_index_that_is_not_what_prepare_writes_is_refused(tmp_path, capsys, damage, expected):
    folder = _prepared(tmp_path)
    index = torch.load(folder / "index.pt", weights_only=True)
    if damage == "no shapes":
        del index["train"]["shapes"]
    elif damage == "no labels":
        del index["test"]["labels"]
    elif damage == "a list":
        index = [index["train"]]
    elif damage == "no train":
        del index["train"]
    elif damage == "short offsets":
        index["train"]["offsets"] = index["train"]["offsets"][:3]
    elif damage == "float lengths":
        index["train"]["lengths"] = index["train"]["lengths"].float()
    else:
        index["train"]["files"] = ["../train-00000.bin"]
    torch.save(index, folder / "index.pt")
    code, err = _run_on(folder, tmp_path, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(
        f"sslplug: error: '{folder / 'index.pt'}' is not the index of prepared data: {expected}"
    )
    assert err.rstrip().endswith("Prepare the data again with sslplug prepare")


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"\x80\x02}q\x00."])
def test_an_unreadable_index_is_refused(tmp_path, capsys, content):
    folder = _prepared(tmp_path)
    (folder / "index.pt").write_bytes(content)
    code, err = _run_on(folder, tmp_path, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith(
        f"sslplug: error: cannot read the prepared data in '{folder}': '{folder / 'index.pt'}' "
        f"is unreadable ("
    )
    assert err.rstrip().endswith("Prepare the data again with sslplug prepare")


def test_in_memory_store_round_trip():
    images = [torch.randint(0, 255, (3, h, w), dtype=torch.uint8) for h, w in [(3, 4), (5, 2)]]
    store = ImageStore.from_images(images)
    assert all(torch.equal(a, b) for a, b in zip(store.images([0, 1]), images))


# ------------------------------------------------------------------------------------------
# WebDataset shards


def _shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, image, label in samples:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=95)
            files = {f"{key}.jpg": buffer.getvalue()}
            if label is not None:
                files[f"{key}.cls"] = str(label).encode()
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_are_read_with_labels_and_a_held_out_test_split(tmp_path):
    (tmp_path / "shards").mkdir()
    for s in range(2):
        _shard(tmp_path / "shards" / f"part-{s:03d}.tar",
               [(f"s{s}_{i:03d}", _photo(*SIZES[i], i), i % 3) for i in range(10)])
    data = load_data(DataSettings(name=str(tmp_path / "shards"), image_size=24, workers=0,
                                  test_fraction=0.2))
    assert data.classes == ("0", "1", "2") and len(data.train) == 16 and len(data.test) == 4
    assert data.train.store is not None
    streamed = load_data(DataSettings(name=str(tmp_path / "shards"), image_size=24, workers=0,
                                      test_fraction=0.2, cache_gb=0.0))
    assert streamed.train.source is not None
    a = list(Loader(data.train, 4, CPU, True, True, workers=0, seed=1).epoch(0))
    b = list(Loader(streamed.train, 4, CPU, True, True, workers=2, seed=1).epoch(0))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_shards_without_labels_are_unlabelled_and_bad_labels_are_named(tmp_path):
    _shard(tmp_path / "u.tar", [(f"k{i}", _photo(30, 30, i), None) for i in range(4)])
    data = load_data(DataSettings(name=str(tmp_path / "u.tar"), workers=0))
    assert data.classes == () and data.test is None and len(data.train) == 4
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        info = tarfile.TarInfo("k0.cls")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cat"))
    with pytest.raises(DataError, match=r"label 'cat' of sample 'k0'.*not an integer"):
        load_data(DataSettings(name=str(tmp_path / "bad.tar"), workers=0))


# ------------------------------------------------------------------------------------------
# a run


def test_a_run_on_prepared_photos_crops_at_the_stored_resolution(tmp_path, monkeypatch):
    root = _photo_folder(tmp_path / "d", SIZES)
    prepare(DataSettings(name=str(root), image_size=16, workers=0), tmp_path / "p")
    seen = []
    forward = sslplug.MultiViewGenerator.forward

    def spy(self, batch, extents=None):
        seen.append(None if extents is None else tuple(extents.shape))
        return forward(self, batch, extents)

    monkeypatch.setattr(sslplug.MultiViewGenerator, "forward", spy)
    from sslplug.cli import main

    code = main([
        "run", "--plugin", "simclr", "--data", str(tmp_path / "p"), "--epochs", "1",
        "--out", str(tmp_path / "run"), "--set", "train.batch_size=4",
        "--set", "train.disable=['progress']", "--set", "data.workers=0", "--set", "knn.k=3",
        "--set", "tensorboard.embedding_samples=0",
    ])
    assert code == 0
    # the view grid of the first eight, then the steps; the health monitor's views of its
    # fixed sample are made from square images (None)
    assert (8, 3) in seen and seen.count((4, 3)) == len(seen) - 1 - seen.count(None)

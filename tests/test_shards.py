"""WebDataset shards: samples keyed by WebDataset's rule wherever their files lie in the shard
(``tar -C dir -cf shard.tar .`` in directory order), labels all or none, and a truncated or
unreadable shard refused with a message naming it (issue 23)."""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslplug.cli import main
from sslplug.config import DataSettings
from sslplug.data import MAX_CLASSES, ShardSamples, load_data
from sslplug.errors import DataError

CLASSES = 3


def _png(number: int) -> bytes:
    """An image that says which it is: ``10 + number`` rows, every pixel ``10 * number``."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((10 + number, 12, 3), 10 * number, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _folder(root: Path, shard: int, per_shard: int) -> Path:
    """The files of one shard in a folder, as they are before ``tar -C root -cf``: image
    ``NN_III.png`` and its label ``NN_III.cls``; sample ``j`` overall has label ``j % 3``."""
    root.mkdir(parents=True)
    for i in range(per_shard):
        number = shard * per_shard + i
        (root / f"{shard:02d}_{i:03d}.png").write_bytes(_png(number))
        (root / f"{shard:02d}_{i:03d}.cls").write_text(f"{number % CLASSES}\n")
    return root


def _tar_folder(folder: Path, shard: Path) -> Path:
    """``tar -C folder -cf shard .`` with the members in name order: ``./00_000.cls``, ..."""
    with tarfile.open(shard, "w") as tar:
        tar.add(folder, arcname=".")  # sorted, like GNU tar --sort=name
    return shard


def _tar(shard: Path, members: list[tuple[str, bytes]], form: int = tarfile.PAX_FORMAT) -> Path:
    """A shard holding ``members`` (name, bytes) in this order."""
    with tarfile.open(shard, "w", format=form) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return shard


def _labelled(shard: Path, count: int, cls: dict[int, bytes | None] | None = None) -> Path:
    """A shard of ``count`` samples ``./k000``..., with ``.cls`` ``cls[i]`` where given (None:
    no .cls) and the label ``i % 3`` otherwise."""
    cls = cls or {}
    members = []
    for i in range(count):
        label = cls.get(i, str(i % CLASSES).encode())
        members += [(f"./k{i:03d}.cls", label)] if label is not None else []
        members.append((f"./k{i:03d}.png", _png(i)))
    return _tar(shard, members)


def _prepare(capsys, data: Path, out: Path) -> tuple[int, str, str]:
    code = main(["prepare", str(data), str(out), "--image-size", "16", "--workers", "0"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(capsys, data: Path, out: Path) -> str:
    """``sslplug prepare DATA OUT`` fails with one ``sslplug: error:`` line; that line."""
    code, _, err = _prepare(capsys, data, out)
    assert code == 2, err
    assert err.startswith("sslplug: error: ") and "Traceback" not in err, err
    assert not out.exists()
    return err


# ------------------------------------------------------------------------------------------
# keys and counts


def test_shards_tarred_from_a_folder_keep_every_sample_its_label_and_its_image(
    tmp_path, capsys
):
    """``tar -C dir -cf shard.tar .`` names members ``./00_000.png``: every sample is counted
    (not one per shard under the key ``""``), labelled, and read back as the right image."""
    shards, per_shard = tmp_path / "shards", 6
    shards.mkdir()
    for s in range(3):
        _tar_folder(_folder(tmp_path / f"src{s}", s, per_shard), shards / f"shard-{s:02d}.tar")
    with tarfile.open(shards / "shard-00.tar") as tar:
        assert "./00_000.png" in tar.getnames()

    code, out, err = _prepare(capsys, shards, tmp_path / "p")
    assert code == 0, err
    assert re.search(r"train:? 17 image", out) and re.search(r"test:? 1 image", out), out  # 10%

    data = load_data(DataSettings(name=str(shards), image_size=32, workers=0, test_fraction=0))
    assert data.classes == ("0", "1", "2") and len(data.train) == 3 * per_shard
    store = data.train.store
    assert store is not None
    for number, image in enumerate(store.images(range(len(data.train)))):
        assert image.shape == (3, 10 + number, 12), number  # sample `number`, in shard order
        assert (image == 10 * number).all(), number
        assert int(data.train.labels[number]) == number % CLASSES
    # streamed from the shards in workers, by index: the same images and labels
    streamed = ShardSamples(sorted(shards.glob("*.tar")), 37, strict=True)
    for number in (0, 7, 17):
        image, label = streamed[number]
        assert image.shape == (3, 10 + number, 12) and (image == 10 * number).all()
        assert label == number % CLASSES


def test_keys_follow_webdataset(tmp_path):
    """The key is the name up to the first dot of its base name, the folder part kept
    (``./v1.0/00000.png`` is ``./v1.0/00000``); a name whose base name starts with a dot (the
    ``._`` files macOS tar adds) or has none belongs to no sample, as in WebDataset."""
    members = [
        ("./v1.0/00000.cls", b"0"), ("./v1.0/00000.png", _png(0)),
        ("./v1.0/00001.cls", b"1"), ("./v1.0/00001.seg.png", b"x"), ("./v1.0/00001.png", _png(1)),
        ("v1.0/00002.cls", b"2"), ("v1.0/00002.png", _png(2)), ("./._00003.png", b"mac"),
        ("00003.cls", b"0"), ("00003.png", _png(3)), ("./README", b"text"),
    ]  # fmt: skip
    shard = _tar(tmp_path / "s.tar", members)
    samples = ShardSamples([shard], 37, strict=True)
    assert len(samples) == 4 and samples.labels == [0, 1, 2, 0]
    for number in range(4):
        image, label = samples[number]
        assert image.shape == (3, 10 + number, 12) and label == number % CLASSES


def test_a_shard_written_again_at_the_same_path_is_read_anew(tmp_path):
    """Shards are read in place, never copied (wids' dataset copied each shard into a cache in
    /tmp named by its path, and read that copy ever after, even once it was written again)."""
    shard = tmp_path / "s.tar"
    _tar(shard, [(f"k{i}.png", _png(1)) for i in range(3)])
    first = load_data(DataSettings(name=str(shard), image_size=32, workers=0))
    assert first.train.images is not None and (first.train.images == 10).all()
    _tar(shard, [(f"k{i}.png", _png(2)) for i in range(4)])
    second = load_data(DataSettings(name=str(shard), image_size=32, workers=0))
    assert second.train.images is not None and len(second.train) == 4
    assert (second.train.images == 20).all()


def _check_numbered(samples: ShardSamples) -> list[int]:
    """Every sample of ``samples`` is a ``_png(number)`` labelled ``number % 3``: the numbers."""
    numbers = []
    for index in range(len(samples)):
        item = samples[index]
        assert item is not None, index
        image, label = item
        number = int(image[0, 0, 0]) // 10
        assert image.shape == (3, 10 + number, 12) and (image == 10 * number).all(), index
        assert label == number % CLASSES, (index, number, label)
        numbers.append(number)
    return numbers


def test_a_sample_whose_files_are_apart_reads_whole_with_its_label(tmp_path):
    """GNU tar without --sort=name stores files in directory order, which can put a sample's
    .png and .cls far apart: every image first, then every label, in another order."""
    count = 12
    pngs = [(f"./{i:03d}.png", _png(i)) for i in range(count)]
    labels = [(f"./{i:03d}.cls", str(i % CLASSES).encode()) for i in reversed(range(count))]
    shard = _tar(tmp_path / "s.tar", pngs + labels)
    samples = ShardSamples([shard], 37, strict=True)
    assert _check_numbered(samples) == list(range(count))  # in the order of the first files
    data = load_data(DataSettings(name=str(shard), image_size=32, workers=0, test_fraction=0))
    assert data.train.labels.tolist() == [i % CLASSES for i in range(count)]


@pytest.mark.parametrize("form", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_and_non_ascii_member_names_read_fine(tmp_path, form):
    """Names over the 100 bytes of a tar header's name field, or not ASCII, are kept in pax or
    GNU extended headers; ``tarfile`` reads them."""
    names = ["./" + "x" * 120 + f"/{'y' * 90}", "./échantillon", "./画像/猫", "./plain"]
    members = []
    for i, name in enumerate(names):
        members += [(f"{name}.png", _png(i)), (f"{name}.cls", str(i % CLASSES).encode())]
    samples = ShardSamples([_tar(tmp_path / "s.tar", members, form)], 37, strict=True)
    assert _check_numbered(samples) == [0, 1, 2, 3]


def test_a_member_name_twice_is_refused_naming_it(tmp_path, capsys):
    shard = _tar(tmp_path / "s.tar", [("./k0.png", _png(0)), ("./k1.png", _png(1)),
                                      ("./k0.png", _png(2))])  # fmt: skip
    err = _refused(capsys, shard, tmp_path / "p")
    assert (
        f"the member name './k0.png' appears more than once in the WebDataset shard '{shard}'"
        in err
    )


def test_a_hard_linked_image_is_read_from_the_file_it_links_to(tmp_path):
    """tar stores a second name of a file as a link to the first: its sample has that image."""
    folder = _folder(tmp_path / "src", 0, 3)
    os.link(folder / "00_000.png", folder / "00_003.png")
    (folder / "00_003.cls").write_text("0")
    shard = _tar_folder(folder, tmp_path / "s.tar")
    with tarfile.open(shard) as tar:
        assert tar.getmember("./00_003.png").islnk()
    assert _check_numbered(ShardSamples([shard], 37, strict=True)) == [0, 1, 2, 0]


def test_a_sample_without_a_readable_image_is_skipped_and_counted_or_named(tmp_path):
    shard = _tar(tmp_path / "s.tar", [
        ("./k0.png", _png(0)), ("./k1.txt", b"no image"), ("./k2.png", b"not a png"),
        ("./k3.png", _png(3)),
    ])  # fmt: skip
    data = load_data(DataSettings(name=str(shard), image_size=32, workers=0))
    assert len(data.train) == 2 and data.skipped == 2
    samples = ShardSamples([shard], 37, strict=True)
    with pytest.raises(DataError, match=r"sample './k1' in the WebDataset shard .*no image among "
                                         r"its files \['./k1.txt'\]"):  # fmt: skip
        samples[1]
    with pytest.raises(DataError, match=r"the image './k2.png' of sample './k2' in the "
                                         r"WebDataset shard .*data.strict=false"):  # fmt: skip
        samples[2]


def test_a_shard_written_again_while_it_is_read_is_refused(tmp_path):
    shard = _labelled(tmp_path / "s.tar", 3)
    samples = ShardSamples([shard], 37, strict=False)
    _labelled(shard, 4)
    with pytest.raises(DataError, match=f"the WebDataset shard '{shard}' changed while"):
        samples[0]


# ------------------------------------------------------------------------------------------
# labels


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (b"-1", "the label '-1' of sample './k002' (member './k002.cls') in the WebDataset "
                "shard '{shard}' is negative"),
        (b"3.5", "the label '3.5' of sample './k002' (member './k002.cls') in the WebDataset "
                 "shard '{shard}' is not an integer class index"),
        (b"\xff\xfe1", "the label b'\\xff\\xfe1' of sample './k002' (member './k002.cls') in "
                       "the WebDataset shard '{shard}' is not UTF-8 text"),
        (b"10000000000", "the label '10000000000' of sample './k002' (member './k002.cls') "
                         f"in the WebDataset shard '{{shard}}' is too large to be a class "
                         f"index (at most {MAX_CLASSES} classes)"),
        (b"", "the label '' of sample './k002' (member './k002.cls') in the WebDataset shard "
              "'{shard}' is not an integer class index"),
    ],
)
def test_a_bad_label_is_refused_naming_the_shard_and_the_member(tmp_path, capsys, cls, expected):
    shard = _labelled(tmp_path / "s.tar", 6, {2: cls})
    err = _refused(capsys, shard, tmp_path / "p")
    assert expected.format(shard=shard) in err
    assert "an integer from 0 to 99999" in err


def test_labels_on_some_samples_only_are_refused_not_taken_for_unlabelled(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    _labelled(shards / "a.tar", 4)
    _labelled(shards / "b.tar", 4, {3: None})
    err = _refused(capsys, shards, tmp_path / "p")
    assert (
        f"the sample of member './k003.png' in the WebDataset shard '{shards / 'b.tar'}' has "
        f"no .cls label, while 7 of the 8 samples of '{shards}' have one" in err
    )
    assert "either every sample has a .cls label" in err


def test_shards_without_any_label_are_unlabelled(tmp_path):
    shard = _tar(tmp_path / "u.tar", [(f"./k{i}.png", _png(i)) for i in range(5)])
    data = load_data(DataSettings(name=str(shard), image_size=32, workers=0))
    assert data.classes == () and data.test is None and len(data.train) == 5


def test_a_test_split_with_a_label_above_the_train_labels_counts_its_class(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "test").mkdir()
    _labelled(tmp_path / "d" / "train" / "a.tar", 4, {i: b"0" for i in range(4)})
    _labelled(tmp_path / "d" / "test" / "a.tar", 2, {0: b"0", 1: b"4"})
    data = load_data(DataSettings(name=str(tmp_path / "d"), image_size=32, workers=0))
    assert data.num_classes == 5 and data.test.labels.tolist() == [0, 4]


# ------------------------------------------------------------------------------------------
# damaged shards


def _cut(good: Path, bad: Path, where: str) -> Path:
    """``good`` cut short: inside the data of its last image, 100 bytes into a header, or at a
    block boundary after a member (no end-of-archive blocks)."""
    data = good.read_bytes()
    with tarfile.open(good) as tar:
        members = tar.getmembers()
    last = members[-1]
    keep = {
        "inside a member": last.offset_data + last.size // 2,
        "inside a header": last.offset + 100,
        "after a member": last.offset,
    }[where]
    bad.write_bytes(data[:keep])
    return bad


@pytest.mark.parametrize("where", ["inside a member", "inside a header", "after a member"])
def test_a_truncated_shard_is_refused_naming_it(tmp_path, capsys, where):
    good = _labelled(tmp_path / "good.tar", 4)
    (tmp_path / "shards").mkdir()
    shutil.copy(good, tmp_path / "shards" / "a.tar")
    bad = _cut(good, tmp_path / "shards" / "b.tar", where)
    err = _refused(capsys, tmp_path / "shards", tmp_path / "p")
    assert f"sslplug: error: the WebDataset shard '{bad}' is truncated or damaged: " in err
    assert err.rstrip().endswith("Copy or write the shard again")
    assert len(err.strip().splitlines()) == 1


def test_a_run_on_a_truncated_shard_stops_with_one_line(tmp_path, capsys):
    bad = _cut(_labelled(tmp_path / "good.tar", 4), tmp_path / "bad.tar", "inside a header")
    code = main(["run", "--data", str(bad), "--epochs", "1", "--out", str(tmp_path / "run"),
                 "--set", "data.workers=0", "--set", "train.disable=['progress']"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"sslplug: error: the WebDataset shard '{bad}' is truncated") and (
        "Traceback" not in err
    )


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_a_member_stored_sparse_is_refused_naming_it(tmp_path, capsys):
    folder = tmp_path / "src"
    folder.mkdir()
    with open(folder / "k0.png", "wb") as file:
        file.truncate(1 << 20)  # a hole, which tar --sparse stores as such
    (folder / "k0.cls").write_text("0")
    shard = tmp_path / "s.tar"
    subprocess.run(["tar", "--sparse", "-C", str(folder), "-cf", str(shard), "."], check=True)
    with tarfile.open(shard) as tar:
        if not tar.getmember("./k0.png").issparse():
            pytest.skip("this file system keeps no holes")
    err = _refused(capsys, shard, tmp_path / "p")
    assert f"the member './k0.png' of the WebDataset shard '{shard}' is stored sparse" in err


def test_a_shard_that_is_not_a_tar_is_refused(tmp_path, capsys):
    import gzip

    shard = tmp_path / "s.tar"
    shard.write_bytes(gzip.compress(_labelled(tmp_path / "good.tar", 2).read_bytes()))
    err = _refused(capsys, shard, tmp_path / "p")
    assert f"the WebDataset shard '{shard}' is not an uncompressed tar file" in err


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("sort", [[], ["--sort=name"]])
def test_shards_packed_with_gnu_tar_are_read_whole(tmp_path, sort):
    """The command of the issue, ``tar -C dir -cf shard.tar .``, with GNU tar itself, on folders
    written in a scrambled order: files in directory order, a sample's .png and .cls apart."""
    shards, per_shard = tmp_path / "shards", 8
    shards.mkdir()
    for s in range(2):
        folder = tmp_path / f"src{s}"
        folder.mkdir()
        files = [(f"{s:02d}_{i:03d}", s * per_shard + i) for i in range(per_shard)]
        writes = [(f"{name}.png", _png(n)) for name, n in files]
        writes += [(f"{name}.cls", f"{n % CLASSES}\n".encode()) for name, n in files]
        random.Random(s).shuffle(writes)
        for name, data in writes:
            (folder / name).write_bytes(data)
        command = ["tar", *sort, "-C", str(folder), "-cf", str(shards / f"{s}.tar"), "."]
        done = subprocess.run(command, capture_output=True)
        if done.returncode:
            pytest.skip(f"{' '.join(command)}: {done.stderr.decode()}")
    samples = ShardSamples(sorted(shards.glob("*.tar")), 37, strict=True)
    assert sorted(_check_numbered(samples)) == list(range(2 * per_shard))
    data = load_data(DataSettings(name=str(shards), image_size=32, workers=0, test_fraction=0))
    assert data.train.store is not None and len(data.train) == 2 * per_shard
    for image, label in zip(data.train.store.images(range(2 * per_shard)), data.train.labels):
        assert int(label) == int(image[0, 0, 0]) // 10 % CLASSES

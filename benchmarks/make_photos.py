"""Write a labelled folder of photo-like JPEGs of mixed sizes, for measuring the data path.

    python benchmarks/make_photos.py /tmp/photos50k --count 50000 --classes 10 --seed 0

Writes ``OUT/<class>/NNNNN.jpg``: image ``i`` belongs to class ``i % classes`` (up to ten,
one shape each), its height and width are drawn independently from 250 to 500 px (portrait,
landscape and nearly square), and its pixels are the same on every machine for the same seed.
Each image is a smooth random colour field with its class's shape drawn in a random colour at
a random position, size and turn, plus pixel noise: the JPEGs (quality 90) take about 2 bits a
pixel, near photographs (2 to 4) rather than flat drawings, and kNN on them means something.
One image in 50 is stored turned with EXIF orientation 6 ("rotate 90 degrees clockwise to
display"), so a reader that ignores EXIF sees it on its side.

Files that exist are kept, and a file is written under a temporary name and renamed, so an
interrupted run is resumed by running the same command again. Prints how long it took.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIDES = (250, 500)
QUALITY = 90
EXIF_EVERY = 50
EXIF_ORIENTATION_TAG = 0x0112
ROTATED_CLOCKWISE = 6
SHAPES = (
    "disk", "square", "triangle", "ring", "cross",
    "bar", "diamond", "star", "stripes", "dots",
)  # fmt: skip


def class_name(label: int) -> str:
    """The folder name of class ``label``: its shape."""
    return SHAPES[label]


def _colour_field(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A smooth random RGB field: a coarse random grid, upsampled bicubically."""
    grid = rng.integers(0, 256, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3))
    return Image.fromarray(grid.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)


def _polygon(cx: float, cy: float, radius: float, corners: int, turn: float) -> list[tuple]:
    return [
        (
            cx + radius * math.cos(turn + 2 * math.pi * k / corners),
            cy + radius * math.sin(turn + 2 * math.pi * k / corners),
        )
        for k in range(corners)
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple, turn: float, fill: tuple
) -> None:
    """Draw ``shape`` inside the square ``box`` = (cx, cy, radius), turned by ``turn`` radians."""
    cx, cy, r = box
    if shape == "disk":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, turn), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, turn), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r / 3)))
    elif shape == "cross":
        for angle in (turn, turn + math.pi / 2):
            dx, dy = r * math.cos(angle), r * math.sin(angle)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=fill, width=max(2, int(r / 3)))
    elif shape == "bar":
        dx, dy = r * math.cos(turn), r * math.sin(turn)
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=fill, width=max(2, int(r / 2.5)))
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r / 2, cy), (cx, cy + r), (cx - r / 2, cy)], fill=fill)
    elif shape == "star":
        points = _polygon(cx, cy, r, 10, turn)
        inner = _polygon(cx, cy, r * 0.45, 10, turn)
        draw.polygon([points[k] if k % 2 == 0 else inner[k] for k in range(10)], fill=fill)
    elif shape == "stripes":
        width = max(2, int(r / 4))
        for offset in range(-3, 4):
            x = cx + offset * 2 * width
            draw.line((x, cy - r, x, cy + r), fill=fill, width=width)
    else:
        for dx, dy in ((-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)):
            x, y, d = cx + dx * r, cy + dy * r, r * 0.3
            draw.ellipse((x - d, y - d, x + d, y + d), fill=fill)


def make_photo(index: int, classes: int, seed: int) -> tuple[Image.Image, bool]:
    """Image ``index`` as it should be seen, and whether it is to be stored with EXIF rotation."""
    rng = np.random.default_rng([seed, index])
    height, width = (int(side) for side in rng.integers(SIDES[0], SIDES[1] + 1, size=2))
    image = _colour_field(rng, height, width)
    radius = float(rng.uniform(0.2, 0.4)) * min(height, width)
    centre = (
        float(rng.uniform(radius, width - radius)),
        float(rng.uniform(radius, height - radius)),
        radius,
    )
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    shape = SHAPES[index % classes]
    _draw_shape(ImageDraw.Draw(image), shape, centre, float(rng.uniform(0, math.pi)), colour)
    pixels = np.asarray(image, dtype=np.int16)
    noise = rng.normal(0.0, 6.0, size=pixels.shape).astype(np.int16)
    photo = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    return photo, index % EXIF_EVERY == EXIF_EVERY - 1


def photo_path(out: Path, index: int, count: int, classes: int) -> Path:
    digits = max(5, len(str(count - 1)))
    return out / class_name(index % classes) / f"{index:0{digits}d}.jpg"


def _write(job: tuple[Path, int, int, int, int]) -> int:
    """Write one image unless its file exists; 1 when written, 0 when kept."""
    out, index, count, classes, seed = job
    path = photo_path(out, index, count, classes)
    if path.exists():
        return 0
    photo, rotated = make_photo(index, classes, seed)
    exif = Image.Exif()
    if rotated:
        # Stored turned a quarter to the left; orientation 6 says to turn it right to display.
        photo = photo.transpose(Image.Transpose.ROTATE_90)
        exif[EXIF_ORIENTATION_TAG] = ROTATED_CLOCKWISE
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    photo.save(partial, format="JPEG", quality=QUALITY, exif=exif.tobytes())
    os.replace(partial, path)
    return 1


def make_photos(out: Path, count: int, classes: int, seed: int, workers: int) -> int:
    """Write the missing images of the folder; returns how many were written."""
    for label in range(classes):
        (out / class_name(label)).mkdir(parents=True, exist_ok=True)
    jobs = [(out, index, count, classes, seed) for index in range(count)]
    if workers <= 1:
        return sum(map(_write, jobs))
    with multiprocessing.Pool(workers) as pool:
        return sum(pool.imap_unordered(_write, jobs, chunksize=64))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the folder to write (made if missing)")
    parser.add_argument("--count", type=_positive, default=50_000, help="images in all")
    parser.add_argument("--classes", type=_positive, default=10, help="class subfolders, 1 to 10")
    parser.add_argument("--seed", type=int, default=0, help="0 or more; same seed, same images")
    parser.add_argument("--workers", type=_positive, default=2, help="processes that encode")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    if args.classes > len(SHAPES):
        parser.error(f"--classes must be 1 to {len(SHAPES)} (one shape each), got {args.classes}")
    start = time.perf_counter()
    written = make_photos(args.out, args.count, args.classes, args.seed, args.workers)
    seconds = time.perf_counter() - start
    print(
        f"{args.out}: {written} images written, {args.count - written} already there, "
        f"{args.classes} classes, in {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()

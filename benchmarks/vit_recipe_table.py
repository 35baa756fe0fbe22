"""The table of docs/benchmarks.md's DINO, iBOT and DINOv2 section from run folders: kNN top-1
of the random initialisation and after epochs 5, 10 and 15 (``knn.every`` 5, the default),
with the health measures at the end (effective rank, spread) and the teacher's class-token
entropy over the last logged steps::

    python benchmarks/vit_recipe_table.py runs/ibot-0 runs/dinov2-0 ...
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def row(folder: Path) -> str:
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    # measured before the first step and every knn.every (5) epochs: 0, 5, 10, 15
    knn = dict(zip((0, 5, 10, 15), (s.value for s in events.Scalars("knn/top1")), strict=False))
    tags = events.Tags()["scalars"]
    rank = events.Scalars("eval/rank_features")[-1].value
    spread = events.Scalars("eval/spread_features")[-1].value
    last = [s.value for s in events.Scalars("train/teacher_entropy")][-20:]
    entropy = sum(last) / len(last) if "train/teacher_entropy" in tags else math.nan
    cells = [f"{knn.get(e, math.nan):.1f}%" for e in (0, 5, 10, 15)]
    gain = knn.get(15, math.nan) - knn.get(0, math.nan)
    name, seed = folder.name.rsplit("-", 1)
    return (
        f"| {name} | {seed} | {' | '.join(cells)} | **{gain:+.1f}** | {rank:.1f} | {spread:.3f} "
        f"| {entropy:.2f} |"
    )


def main(folders: list[str]) -> None:
    print(
        "| method | seed | random init | epoch 5 | epoch 10 | epoch 15 | gain | rank | spread "
        "| teacher entropy |"
    )
    print("|---" * 10 + "|")
    for folder in folders:
        print(row(Path(folder)))


if __name__ == "__main__":
    main(sys.argv[1:])

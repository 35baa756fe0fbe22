"""``train.keep_freed_memory``: on glibc the process keeps the large blocks it frees, so a step
does not map and zero its activations again (``sslplug.runtime.keep_freed_memory``)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from sslplug import engine
from sslplug.config import TrainSettings
from tests.conftest import FAST
from tests.harness import train_pinned

# Frees and allocates a 64 MiB tensor 20 times and prints the page faults that took: each fresh
# mapping of it faults in 16,384 pages of 4 KiB.
_PROBE = """
import resource, sys, torch
from sslplug.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = torch.empty(16 << 20)
    block.fill_(1.0)
    del block
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt's thresholds are glibc's; elsewhere keep_freed_memory reports False",
)
def test_kept_blocks_are_not_mapped_and_zeroed_again_at_every_allocation():
    kept, faults_kept = _faults("keep")
    _, faults_default = _faults("default")
    assert kept == "True"
    assert faults_default > 20 * 16384 * 0.9  # glibc maps the block anew every time
    assert faults_kept < faults_default / 10  # kept: mapped once


@pytest.mark.parametrize("keep", [True, False])
def test_a_run_keeps_freed_memory_unless_told_not_to(monkeypatch, tmp_path, keep):
    calls = []
    monkeypatch.setattr(engine, "keep_freed_memory", lambda: calls.append(1) or True)
    setting = [] if keep else ["train.keep_freed_memory=false"]
    train_pinned(
        tmp_path / "run",
        [
            *FAST,
            "train.epochs=1",
            "train.max_steps_per_epoch=1",
            "knn.every=0",
            "health.every=0",
            *setting,
        ],
    )
    assert TrainSettings().keep_freed_memory is True  # the default
    assert calls == ([1] if keep else [])

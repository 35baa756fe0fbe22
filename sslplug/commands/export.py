"""``sslplug export``: write a run's backbone as a plain state dict, with a JSON note of its
settings and of how to load it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sslplug.errors import OutputError
from sslplug.plugins import PluginRegistry

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "write the backbone as a plain state dict (and a JSON note of its settings)"
DESCRIPTION = (
    "Write the backbone of a run's encoder to OUT.pt as a plain state dict, and a note "
    "of its settings and of how to load it to OUT.json (OUT.pt with the suffix .json, so "
    "OUT.pt may not end in .json). Both are written whole or not at all. An existing "
    "file is replaced only with --force; an sslplug checkpoint or a file of the run "
    "(last.pt, settings.toml, summary.json) never is."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, metavar="RUN_OR_CHECKPOINT")
    parser.add_argument("out", metavar="OUT.pt", help="the file to write (not a folder)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT.pt and OUT.json if they exist (never a checkpoint or a file of the run)",
    )


def run(args: argparse.Namespace, registry: PluginRegistry) -> int:
    import torch

    from sslplug.outputs import TEMPORARY_EXTRA, check_name_lengths
    from sslplug.pretrained import build_encoder, export_backbone, load_run

    if args.out.endswith(("/", os.sep)) and not Path(args.out).is_dir():
        raise OutputError(
            f"{args.out!r} ends in {args.out[-1]!r}, so it names a folder; give the name of a "
            f"file to write, such as {str(Path(args.out) / 'backbone.pt')!r}"
        )
    out = Path(args.out)
    # OUT.pt and its note OUT.json are written under temporary names, 14 bytes longer
    longer = TEMPORARY_EXTRA + max(0, len(".json") - len(os.fsencode(out.suffix)))
    check_name_lengths(
        out, "OUT.pt", longer,
        f" (OUT.pt and its note OUT.json are written first under temporary names up to "
        f"{longer} bytes longer)",
    )
    saved = load_run(args.source, registry)
    image_size = saved.state.get("image_size") or 32
    encoder = build_encoder(saved, registry, image_size, 0, torch.device("cpu"))
    note = export_backbone(saved, encoder, out, image_size, force=args.force)
    print(f"backbone written to {out}; settings and how to load it in {note}")
    return 0

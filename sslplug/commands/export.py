"""``sslplug export``: write a run's backbone as a plain state dict or an ONNX model, with a JSON
note of its settings and of how to load or run it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sslplug.errors import OutputError
from sslplug.plugins import PluginRegistry

__all__ = ["DESCRIPTION", "FORMATS", "HELP", "add_arguments", "run"]

# sslplug.pretrained.EXPORT_FORMATS, named here so that --help does not import torch
FORMATS = ("state_dict", "onnx")

HELP = "write the backbone as a plain state dict or an ONNX model (and a JSON note of its settings)"
DESCRIPTION = (
    "Write the backbone of a run's encoder to OUT: its weights as a plain state dict "
    "(--format state_dict, the default; OUT.pt), or an ONNX model of images to pooled features "
    "with a dynamic batch size (--format onnx; OUT.onnx; needs pip install 'sslplug[onnx]'). "
    "A note of its settings and of how to load or run it goes to OUT.json (OUT with the suffix "
    ".json, so OUT may not end in .json). Both are written whole or not at all. An existing "
    "file is replaced only with --force; an sslplug checkpoint or a file of the run "
    "(last.pt, settings.toml, summary.json) never is."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, metavar="RUN_OR_CHECKPOINT")
    parser.add_argument(
        "out", metavar="OUT", help="the file to write (not a folder): OUT.pt, or OUT.onnx"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="state_dict",
        help="state_dict (default): the weights, for torch; onnx: an ONNX model, for deployment",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT and OUT.json if they exist (never a checkpoint or a file of the run)",
    )


def _check_suffix(out: str, format: str) -> None:
    """Refuse an ONNX model under another name than ``*.onnx``, and a state dict under that
    name: either file would be taken for what it is not."""
    suffix = Path(out).suffix.lower()
    if format == "onnx" and suffix != ".onnx":
        raise OutputError(
            f"--format onnx writes an ONNX model, and {out!r} does not end in .onnx; name it "
            f"{str(Path(out).with_suffix('.onnx'))!r}, for instance"
        )
    if format == "state_dict" and suffix == ".onnx":
        raise OutputError(
            f"{out!r} ends in .onnx, but --format state_dict (the default) writes torch's state "
            f"dict; add --format onnx for an ONNX model, or name it "
            f"{str(Path(out).with_suffix('.pt'))!r}"
        )


def run(args: argparse.Namespace, registry: PluginRegistry) -> int:
    import torch

    from sslplug.onnx_export import require_onnx
    from sslplug.outputs import TEMPORARY_EXTRA, check_name_lengths
    from sslplug.pretrained import build_encoder, export_backbone, load_run

    if args.out.endswith(("/", os.sep)) and not Path(args.out).is_dir():
        raise OutputError(
            f"{args.out!r} ends in {args.out[-1]!r}, so it names a folder; give the name of a "
            f"file to write, such as {str(Path(args.out) / 'backbone.pt')!r}"
        )
    _check_suffix(args.out, args.format)
    if args.format == "onnx":
        require_onnx()  # before the run is read and its encoder built
    out = Path(args.out)
    what = "OUT.onnx" if args.format == "onnx" else "OUT.pt"
    # OUT and its note OUT.json are written under temporary names, 14 bytes longer
    longer = TEMPORARY_EXTRA + max(0, len(".json") - len(os.fsencode(out.suffix)))
    check_name_lengths(
        out, what, longer,
        f" ({what} and its note OUT.json are written first under temporary names up to "
        f"{longer} bytes longer)",
    )
    saved = load_run(args.source, registry)
    image_size = saved.state.get("image_size") or 32
    encoder = build_encoder(saved, registry, image_size, 0, torch.device("cpu"))
    note = export_backbone(saved, encoder, out, image_size, force=args.force, format=args.format)
    if args.format == "onnx":
        print(
            f"backbone written to {out} as an ONNX model (input 'images' of any batch size and "
            f"{image_size}x{image_size} px, output 'features'); settings and how to run it in "
            f"{note}"
        )
    else:
        print(f"backbone written to {out}; settings and how to load it in {note}")
    return 0

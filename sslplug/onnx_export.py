"""A backbone as an ONNX model (``sslplug export --format onnx``), for deployment without torch.

The model is the backbone as evaluation reads it: images in, pooled features out (for a ViT
the class token or mean patch token after the final norm, as ``model.pool`` says; for a ResNet
or the small ConvNet its forward). Its input is named ``images``, float32
``(batch, 3, S, S)`` normalised with ImageNet's mean and deviation (``sslplug.augment.MEAN``,
``STD``); its output ``features``, ``(batch, D)``. The batch size is dynamic; the image side
``S`` is the one the run was trained at, fixed in the graph (a ViT's position embedding is
resampled for that size once, at export).

It is made by torch's default exporter, ``torch.onnx.export(dynamo=True)`` (through
``torch.export``, with onnxscript), which exports the small ConvNet, the torchvision ResNets and
timm's ViTs (``dynamic_img_size`` included) as they are. ONNX Runtime then runs the model on a
fixed random batch of 1 and of 3 images before anything is written, and the export is refused
when its features differ from torch's; the note records the largest difference. ONNX, onnxscript
and ONNX Runtime are the optional extra ``sslplug[onnx]``.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
from torch import nn

from sslplug.augment import MEAN, STD
from sslplug.errors import OutputError
from sslplug.vit import ViTBackbone

__all__ = ["INPUT", "OUTPUT", "onnx_model", "onnx_note", "require_onnx"]

INPUT = "images"
OUTPUT = "features"
# what the export needs: the exporter's packages, and ONNX Runtime for the check
_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# the batch sizes the exported model is run at before it is written (the batch is dynamic)
_CHECK_BATCHES = (1, 3)
# ONNX Runtime's features may differ from torch's by float32 rounding, no more: by 1e-4 and
# 1e-4 of the largest feature (a ResNet's reach 100 after a few steps: 6e-5 apart measured)
_ATOL, _RTOL = 1e-4, 1e-4
# a protobuf message (an ONNX file with its weights inside) holds at most 2 GiB
_MAX_BYTES = 2**31 - 2**24


def require_onnx() -> None:
    """Raise ``OutputError`` in one line when a package the ONNX export needs is missing."""
    for name in _PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise OutputError(
                f"--format onnx needs the packages {', '.join(_PACKAGES)}, and {name} cannot be "
                f"imported ({exc}); pip install 'sslplug[onnx]'"
            ) from None


def onnx_model(net: nn.Module, image_size: int) -> tuple[bytes, dict[str, Any]]:
    """The backbone ``net`` (in eval mode, on the CPU) as the bytes of an ONNX model for
    ``image_size`` px images with a dynamic batch, and what the note says of it: the ONNX
    opset, and the largest difference to torch's features that ONNX Runtime showed.

    Raises ``OutputError`` when a package is missing, the weights are over ONNX's 2 GiB, the
    exporter fails, or ONNX Runtime's features differ from torch's."""
    require_onnx()
    weights = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    if weights > _MAX_BYTES:
        raise OutputError(
            f"the backbone's weights take {weights / 2**30:.1f} GiB, more than the 2 GiB an ONNX "
            f"file holds with its weights inside; export it with --format state_dict"
        )
    net = net.cpu().eval()
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        program: Any = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
        content = program.model_proto.SerializeToString()
    except Exception as exc:  # torch.export's and the exporter's own errors, of many kinds
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OutputError(
            f"torch.onnx.export could not export the backbone {type(net).__name__} "
            f"({type(exc).__name__}: {first}); export it with --format state_dict"
        ) from None
    opset = next((o.version for o in program.model_proto.opset_import if o.domain == ""), None)
    return content, {"opset": opset, "checked": _check(net, content, image_size)}


def _check(net: nn.Module, content: bytes, image_size: int) -> dict[str, Any]:
    """Run the ONNX model ``content`` under ONNX Runtime on random batches of each size in
    ``_CHECK_BATCHES``; raise ``OutputError`` when its features are not torch's."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch is given
    session = onnxruntime.InferenceSession(content, options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    largest = 0.0
    for batch in _CHECK_BATCHES:
        images = torch.randn(batch, 3, image_size, image_size, generator=generator)
        with torch.no_grad():
            expected = net(images).numpy()
        (got,) = session.run([OUTPUT], {INPUT: images.numpy()})
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else np.nan
        if not diff <= _ATOL + _RTOL * float(np.abs(expected).max()):  # NaN fails too
            raise OutputError(
                f"ONNX Runtime's features of the exported backbone are not torch's (batch of "
                f"{batch}: shape {got.shape} against {expected.shape}, largest difference "
                f"{diff}); nothing was written. Export it with --format state_dict"
            )
        largest = max(largest, diff)
    return {
        "onnxruntime": onnxruntime.__version__,
        "batch_sizes": list(_CHECK_BATCHES),
        "max_abs_diff": largest,
    }


def onnx_note(net: nn.Module, filename: str, image_size: int, feature_dim: int) -> dict[str, Any]:
    """The note's entries on the ONNX model ``filename`` of the backbone ``net``: its input and
    output, and the lines of Python that run it with ONNX Runtime on images in ``[0, 1]``."""
    shape = ["batch", 3, image_size, image_size]  # a named dimension: any batch size
    size, features = f"(batch, 3, {image_size}, {image_size})", f"(batch, {feature_dim})"
    output: dict[str, Any] = {"name": OUTPUT, "shape": ["batch", feature_dim], "dtype": "float32"}
    if isinstance(net, ViTBackbone):  # which token the features are, after the final norm
        output["pool"] = {"token": "the class token", "avg": "the mean patch token"}[net.pool]
    return {
        "input": {
            "name": INPUT,
            "shape": shape,
            "dtype": "float32",
            "normalisation": "(images in [0, 1] - mean) / std, channel by channel",
            "mean": list(MEAN),
            "std": list(STD),
        },
        "output": output,
        "run": [
            "import numpy as np, onnxruntime",
            f"session = onnxruntime.InferenceSession({filename!r})",
            f"mean = np.array({list(MEAN)!r}, np.float32).reshape(1, 3, 1, 1)",
            f"std = np.array({list(STD)!r}, np.float32).reshape(1, 3, 1, 1)",
            f"images = ((images - mean) / std).astype(np.float32)  # in [0, 1], {size}",
            f"features = session.run([{OUTPUT!r}], {{{INPUT!r}: images}})[0]  # {features}",
        ],
    }

"""``sslplug export --format onnx``: the backbone of a short run as an ONNX model that ONNX Runtime
runs at any batch size with torch's features, the note's lines that run it, the one-line
message without the packages, and the rules on names and existing files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sslplug.augment import normalize
from sslplug.cli import main
from sslplug.commands.export import FORMATS
from sslplug.errors import OutputError
from sslplug.nn import SmallConvNet
from sslplug.onnx_export import _check
from sslplug.pretrained import EXPORT_FORMATS, build_encoder, load_run

from .conftest import FAST
from .harness import run_one_epoch

onnxruntime = pytest.importorskip("onnxruntime")

# one step of BYOL and no monitors at the start: the run exists to be exported
QUICK = [
    *FAST,
    "train.max_steps_per_epoch=1",
    "knn.baseline=false",
    "health.baseline=false",
    "tensorboard.embedding_samples=0",
]


def _train(shapes_folder: Path, out: Path, backbone: str) -> Path:
    return run_one_epoch(shapes_folder, out, QUICK, "--backbone", backbone)


@pytest.fixture(scope="module")
def small_run(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(shapes_folder, tmp_path_factory.mktemp("onnx") / "small", "small")


def _session(path: Path) -> Any:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _assert_exports_as_torch_computes(run: Path, out: Path, registry, feature_dim: int) -> None:
    """Export ``run`` to ``out`` as ONNX; ONNX Runtime's features at batch sizes 1 and 5 are
    ``encoder.backbone``'s, and the note's own lines give them from images in [0, 1]."""
    assert main(["export", str(run), str(out), "--format", "onnx"]) == 0
    note = json.loads(out.with_suffix(".json").read_text())
    assert note["format"] == "onnx" and note["feature_dim"] == feature_dim
    assert note["input"]["name"] == "images" and note["input"]["shape"] == ["batch", 3, 32, 32]
    assert note["output"] == {**note["output"], "name": "features", "shape": ["batch", feature_dim]}
    assert note["checked"]["max_abs_diff"] <= 1e-4 and "load" not in note
    encoder = build_encoder(load_run(run, registry), registry, 32, 0, torch.device("cpu"))
    session = _session(out)
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["features"]
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 5):
        images = torch.rand(batch, 3, 32, 32, generator=generator)
        with torch.no_grad():
            expected = encoder.backbone(normalize(images)).numpy()
        (got,) = session.run(["features"], {"images": normalize(images).numpy()})
        assert got.shape == (batch, feature_dim)
        assert np.abs(got - expected).max() <= 1e-4
    # the note's recipe, run as written beside the file, on images in [0, 1]
    scope: dict[str, Any] = {"images": images.numpy()}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(out.parent)
        exec("\n".join(note["run"]), scope)
    assert np.abs(scope["features"] - expected).max() <= 1e-4


def test_the_small_convnet_runs_under_onnxruntime_with_torchs_features(
    small_run, tmp_path, registry
):
    _assert_exports_as_torch_computes(small_run, tmp_path / "small.onnx", registry, 128)


@pytest.mark.slow  # a run of a ResNet-18 or a ViT and its export: 11 to 14 s each
@pytest.mark.parametrize(("backbone", "feature_dim"), [("resnet18", 512), ("vit_tiny", 192)])
def test_a_resnet_and_a_vit_run_under_onnxruntime_with_torchs_features(
    shapes_folder, tmp_path, registry, backbone, feature_dim
):
    run = _train(shapes_folder, tmp_path / backbone, backbone)
    out = tmp_path / f"{backbone}.onnx"
    _assert_exports_as_torch_computes(run, out, registry, feature_dim)
    note = json.loads(out.with_suffix(".json").read_text())
    if backbone == "vit_tiny":  # the class token, after the final norm: what evaluation reads
        assert note["output"]["pool"] == "the class token" and note["timm_args"]["img_size"] == 32
    else:
        assert note["cifar_stem"] is True


def test_an_export_whose_features_are_not_torchs_is_refused(small_run, tmp_path):
    out = tmp_path / "small.onnx"
    assert main(["export", str(small_run), str(out), "--format", "onnx"]) == 0
    other = SmallConvNet().eval()  # another initialisation than the run's
    with pytest.raises(OutputError, match="features of the exported backbone are not torch's"):
        _check(other, out.read_bytes(), 32)


def test_without_the_onnx_packages_the_error_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    out = tmp_path / "b.onnx"
    assert main(["export", str(tmp_path / "no-run"), str(out), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sslplug: error: ") and err.count("\n") == 1, err
    assert "pip install 'sslplug[onnx]'" in err and "onnx cannot be imported" in err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_only_with_force(small_run, tmp_path, capsys):
    out = tmp_path / "b.onnx"
    out.write_text("an older export")
    assert main(["export", str(small_run), str(out), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "add --force to replace it" in err
    assert out.read_text() == "an older export" and not out.with_suffix(".json").exists()
    assert main(["export", str(small_run), str(out), "--format", "onnx", "--force"]) == 0
    assert [o.name for o in _session(out).get_outputs()] == ["features"]


@pytest.mark.parametrize(
    ("name", "format", "expected"),
    [
        ("b.pt", "onnx", "does not end in .onnx; name it"),
        ("b.onnx", "state_dict", "add --format onnx for an ONNX model, or name it"),
    ],
)
def test_the_name_must_say_the_format(tmp_path, capsys, name, format, expected):
    out = tmp_path / name
    assert main(["export", str(tmp_path / "no-run"), str(out), "--format", format]) == 2
    assert expected in capsys.readouterr().err and not out.exists()


def test_the_command_offers_the_formats_export_backbone_writes():
    assert FORMATS == EXPORT_FORMATS

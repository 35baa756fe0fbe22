"""The plugin contract, version 2, from the outside: two third-party-style plugins written
against ``import sslplug`` alone (``tests/fixtures/third_party``) train through the engine and
resume bit-exactly, and each leans on a different part of the contract.

- ``dino_like`` (Caron et al. 2021): views in groups of two sizes, a target update that reads the
  global crops only, optimiser rules (a last layer frozen for an epoch, clipping, a weight-decay
  schedule), a capability of its own, the centre as checkpointed state of the target update,
  and a temperature warm-up that reads ``run.progress``.
- ``moco_like`` (Chen et al. 2020): a queue of keys kept with the key encoder, filled in
  ``step()`` and handed to the loss through ``Outputs.extras``.

Each plugin trains once for three epochs of three steps while a lifecycle plugin (``Recorder``)
watches through the public hooks; the tests read that one run. Resume is checked against it: a
run of the same settings stopped after epoch 2 and resumed must end with equal tensors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sslplug
from sslplug.checkpoint import load_checkpoint
from sslplug.config import RunConfig, RunContext, load_config
from sslplug.engine import train
from sslplug.errors import ComponentMismatchError
from sslplug.nn import build_backbone
from sslplug.plugins import PluginRegistry

from .harness import StopAfterEpoch, assert_public_api_only

FIXTURES = Path(__file__).parent / "fixtures" / "third_party"
BATCH = 64
STEPS = 3  # per epoch
EPOCHS = 3
SIZE = 32  # of the default data, "shapes"


def _load(name: str) -> types.ModuleType:
    """Import a fixture plugin by its file path, as its own top-level module."""
    module_name = f"sslplug_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, FIXTURES / f"{module_name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


dino_like = _load("dino_like")
moco_like = _load("moco_like")
PLUGINS = {"dino_like": dino_like, "moco_like": moco_like}

# the settings every run here shares; the plugin's own ones come from _SETTINGS
_COMMON = [
    f"train.epochs={EPOCHS}",
    f"train.batch_size={BATCH}",
    f"train.max_steps_per_epoch={STEPS}",
    "train.log_every=1",
    'train.disable=["progress", "knn", "health", "view_grid", "tensorboard"]',
    "knn.baseline=false",
    "health.baseline=false",
    "knn.every=0",
    "health.every=0",
    "data.workers=0",
]
_SETTINGS = {
    # DINO's weight decay starts at 0.04 and ends at 0.4; a warm-up of one epoch shows both
    # the rise of the teacher temperature and its plateau in three epochs
    "dino_like": ["optim.weight_decay=0.04", "dino_like.warmup_teacher_temp_epochs=1"],
    # a queue of four batches wraps around in a run of nine steps
    "moco_like": ["moco_like.queue_size=256"],
}


def _registry(name: str, *extra: object) -> PluginRegistry:
    """A fresh registry: the installed plugins, the fixture ``name``, and ``extra`` lifecycle
    plugins."""
    registry = PluginRegistry()
    registry.load_entry_points()
    assert registry.register(PLUGINS[name], name), registry.failures
    for index, plugin in enumerate(extra):
        assert registry.register(plugin, f"extra{index}"), registry.failures
    return registry


def _config(registry: PluginRegistry, name: str, out: Path) -> RunConfig:
    return load_config(
        None,
        [f"components.plugin={name}", f"train.out={out}", *_COMMON, *_SETTINGS[name]],
        registry.settings_classes(),
    )


def _state(module: nn.Module | None) -> dict[str, Tensor]:
    return {} if module is None else {k: v.detach().clone() for k, v in module.state_dict().items()}


def _shapes(views: sslplug.Views) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(image.shape) for image in views.images)


class Recorder:
    """A lifecycle plugin that watches a run from outside, through the lifecycle hooks and torch
    forward hooks on ``run.parts``: the views the encoder and the target update are given, what
    the target update returns, the metrics and the target update's own buffers after every step,
    and the component states before the first step (``states[0]``) and after every epoch
    (``states[e]``)."""

    def __init__(self) -> None:
        self.encoder_views: list[tuple[tuple[int, ...], ...]] = []
        self.target_views: list[tuple[tuple[int, ...], ...]] = []
        self.target_outputs: list[sslplug.Outputs] = []
        self.metrics: list[dict[str, float]] = []
        self.buffers: list[dict[str, Tensor]] = []
        self.states: list[dict[str, dict[str, Tensor]]] = []

    def _snapshot(self, run: RunContext) -> None:
        self.states.append({name: _state(m) for name, m in run.parts.modules().items()})

    def _target_called(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self.target_views.append(_shapes(args[0]))
        self.target_outputs.append(
            sslplug.Outputs(
                projections=tuple(p.clone() for p in out.projections),
                extras={k: v.clone() for k, v in out.extras.items()},
            )
        )

    @sslplug.hookimpl
    def sslplug_run_start(self, run: RunContext) -> None:
        parts = run.parts
        parts.encoder.register_forward_pre_hook(
            lambda module, args: self.encoder_views.append(_shapes(args[0]))
        )
        parts.target_update.register_forward_hook(self._target_called)
        self._snapshot(run)

    @sslplug.hookimpl
    def sslplug_step_end(self, run: RunContext, metrics: dict[str, float]) -> None:
        self.metrics.append(dict(metrics))
        target = run.parts.target_update
        self.buffers.append({k: v.clone() for k, v in target.named_buffers(recurse=False)})

    @sslplug.hookimpl
    def sslplug_epoch_end(self, run: RunContext) -> None:
        self._snapshot(run)


@attrs.define
class Finished:
    """A finished run of a fixture plugin and what the ``Recorder`` saw of it."""

    name: str
    summary: dict[str, Any]
    recorder: Recorder
    run_dir: Path
    checkpoint: dict[str, Any]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one thread: runs compared bit for bit must reduce in the same order, and the
    module-scoped runs start before ``conftest``'s per-test thread setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_watched(name: str, out: Path) -> Finished:
    recorder = Recorder()
    registry = _registry(name, recorder)
    with _one_thread():
        summary = train(_config(registry, name, out), registry)
    return Finished(name, summary, recorder, out, load_checkpoint(out))


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    return _train_watched("dino_like", tmp_path_factory.mktemp("dino") / "run")


@pytest.fixture(scope="module")
def moco_run(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    return _train_watched("moco_like", tmp_path_factory.mktemp("moco") / "run")


def _assert_trained_on_the_default_data(done: Finished) -> None:
    summary = done.summary
    assert summary["data"] == "shapes"
    assert set(summary["components"].values()) == {done.name}
    assert summary["epochs"] == EPOCHS and summary["steps"] == EPOCHS * STEPS
    losses = [m["loss"] for m in done.recorder.metrics]
    assert len(losses) == EPOCHS * STEPS
    assert all(math.isfinite(value) for value in losses), losses
    assert math.isfinite(summary["final_loss"])


def _resume_is_bit_exact(done: Finished, tmp_path: Path) -> None:
    """The same settings as ``done``, stopped after epoch 2 and resumed with a fresh registry
    (plugins hold no global state), end with the very same tensors."""
    name, out = done.name, tmp_path / "resumed"
    registry = _registry(name, StopAfterEpoch(EPOCHS - 1))
    with _one_thread(), pytest.raises(KeyboardInterrupt):
        train(_config(registry, name, out), registry)
    assert load_checkpoint(out)["epoch"] == EPOCHS - 1
    registry = _registry(name)
    with _one_thread():
        train(_config(registry, name, out), registry, resume=out)

    resumed, straight = load_checkpoint(out), done.checkpoint
    assert resumed["step"] == straight["step"] == EPOCHS * STEPS
    for component in ("views", "encoder", "loss", "target_update"):
        assert resumed[component].keys() == straight[component].keys(), component
        for key, value in straight[component].items():
            assert torch.equal(resumed[component][key], value), f"{component}.{key}"


# DINO -----------------------------------------------------------------------------------------


def test_dino_like_trains_on_the_default_data(dino_run: Finished) -> None:
    _assert_trained_on_the_default_data(dino_run)
    entropy = [m["teacher_entropy"] for m in dino_run.recorder.metrics]
    assert all(0 <= h <= math.log(dino_like.DINOSettings().out_dim) for h in entropy), entropy


def test_dino_like_teacher_sees_the_global_crops_and_the_student_all_eight(
    dino_run: Finished,
) -> None:
    recorder = dino_run.recorder
    global_crop, local_crop = (BATCH, 3, SIZE, SIZE), (BATCH, 3, 14, 14)
    assert recorder.encoder_views == [(global_crop,) * 2 + (local_crop,) * 6] * EPOCHS * STEPS
    assert recorder.target_views == [(global_crop,) * 2] * EPOCHS * STEPS
    for outputs in recorder.target_outputs:
        probs = outputs.extras["teacher_probs"]
        assert probs.shape == (2, BATCH, 256)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, BATCH))


def test_dino_like_teacher_temperature_warms_up_over_the_first_epoch(dino_run: Finished) -> None:
    temperatures = [m["teacher_temperature"] for m in dino_run.recorder.metrics]
    # epoch_float = step / 3 over a warm-up of one epoch, then the plateau at 0.07
    expected = [0.04 + 0.03 * min(1.0, step / STEPS) for step in range(EPOCHS * STEPS)]
    assert temperatures == pytest.approx(expected)
    assert temperatures[0] == pytest.approx(0.04) and temperatures[-1] == pytest.approx(0.07)


def test_dino_like_centres_and_sharpens_with_the_centre_of_earlier_steps(
    dino_run: Finished,
) -> None:
    recorder = dino_run.recorder
    center = torch.zeros(1, 256)
    for step, outputs in enumerate(recorder.target_outputs):
        logits = torch.stack(outputs.projections).float()
        temperature = recorder.metrics[step]["teacher_temperature"]
        expected = F.softmax((logits - center) / temperature, dim=-1)
        torch.testing.assert_close(outputs.extras["teacher_probs"], expected)
        center = 0.9 * center + 0.1 * logits.mean(dim=(0, 1))
        torch.testing.assert_close(recorder.buffers[step]["center"], center)
    # the centre is state of the target update: the checkpoint holds its last value
    assert torch.equal(
        dino_run.checkpoint["target_update"]["center"], recorder.buffers[-1]["center"]
    )


def test_dino_like_last_layer_is_frozen_during_the_first_epoch(dino_run: Finished) -> None:
    states = [s["encoder"] for s in dino_run.recorder.states]  # before training, after 1, 2, 3
    assert len(states) == EPOCHS + 1
    direction = "projector.prototypes.0.parametrizations.weight.original1"
    magnitude = "projector.prototypes.0.parametrizations.weight.original0"
    hidden = "projector.mlp.0.weight"
    assert torch.equal(states[0][direction], states[1][direction])
    assert not torch.equal(states[0][hidden], states[1][hidden])  # the rest trains meanwhile
    assert not torch.equal(states[1][direction], states[2][direction])
    assert torch.equal(dino_run.checkpoint["encoder"][direction], states[-1][direction])
    # norm_last_layer: the magnitude of the weight-normalised layer stays 1 throughout
    assert torch.equal(states[-1][magnitude], torch.ones_like(states[-1][magnitude]))
    teacher = [s["target_update"] for s in dino_run.recorder.states]
    key = "network.1.prototypes.0.parametrizations.weight.original1"
    assert torch.equal(teacher[0][key], teacher[1][key])  # an EMA of an unchanged layer


def test_dino_like_resumes_bit_exactly(dino_run: Finished, tmp_path: Path) -> None:
    _resume_is_bit_exact(dino_run, tmp_path)


def test_dino_cross_entropy_matches_torch_soft_target_cross_entropy() -> None:
    torch.manual_seed(0)
    teacher = F.softmax(torch.randn(2, 5, 7), dim=-1)
    student = tuple(torch.randn(5, 7) for _ in range(4))
    loss = dino_like.dino_cross_entropy(teacher, student, (0, 1), 0.1)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    reference = sum(F.cross_entropy(student[j] / 0.1, teacher[i]) for i, j in pairs) / len(pairs)
    torch.testing.assert_close(loss, reference)


def test_dino_like_needs_its_teacher() -> None:
    registry = _registry("dino_like")
    assert [c.name for c in registry.capabilities_of("dino_like")] == ["dino_teacher_probs"]
    config = load_config(
        None,
        ["components.plugin=dino_like", "components.target_update=none"],
        registry.settings_classes(),
    )
    backbone, dim = build_backbone("small", SIZE)
    with pytest.raises(ComponentMismatchError, match="requires dino_teacher_probs"):
        registry.build(config, RunContext(config=config, image_size=SIZE), backbone, dim)


def test_dino_likes_absolute_weight_decay_end_still_works_with_a_deprecation_warning() -> None:
    registry = _registry("dino_like")
    config = load_config(None, ["components.plugin=dino_like"], registry.settings_classes())
    backbone, dim = build_backbone("small", SIZE)
    parts = registry.build(config, RunContext(config=config, image_size=SIZE), backbone, dim)
    with pytest.warns(DeprecationWarning) as caught:
        rules = parts.optim_rules()
    message = str(caught[0].message)
    assert "the encoder of plugin 'dino_like' sets OptimRules(weight_decay_end=0.4)" in message
    assert "weight_decay_end_factor" in message and "until sslplug 0.3" in message
    assert [r.weight_decay_end for r in rules if r.weight_decay_end is not None] == [0.4]


# MoCo -----------------------------------------------------------------------------------------


def test_moco_like_trains_on_the_default_data(moco_run: Finished) -> None:
    _assert_trained_on_the_default_data(moco_run)
    assert all(0 <= m["positive_accuracy"] <= 1 for m in moco_run.recorder.metrics)


def test_moco_like_queue_pointer_advances_by_the_batch(moco_run: Finished) -> None:
    size = 256
    pointers = [int(b["queue_ptr"]) for b in moco_run.recorder.buffers]
    assert pointers == [(BATCH * (step + 1)) % size for step in range(EPOCHS * STEPS)]
    assert int(moco_run.checkpoint["target_update"]["queue_ptr"]) == pointers[-1]


def test_moco_like_queue_holds_the_keys_of_the_last_steps(moco_run: Finished) -> None:
    recorder, size = moco_run.recorder, 256
    queue = moco_run.checkpoint["target_update"]["queue"]
    assert torch.equal(queue, recorder.buffers[-1]["queue"])
    last = EPOCHS * STEPS
    for step in range(last - size // BATCH, last):  # the four batches that fill the queue
        rows = (BATCH * step + torch.arange(BATCH)) % size
        keys = recorder.target_outputs[step].projections[1]  # the second view's keys
        assert torch.equal(queue[rows], keys), f"step {step}"
    # and the loss saw the queue as it stood before each step
    for step in range(1, last):
        assert torch.equal(
            recorder.target_outputs[step].extras["queue"], recorder.buffers[step - 1]["queue"]
        )


def test_moco_like_resumes_bit_exactly(moco_run: Finished, tmp_path: Path) -> None:
    _resume_is_bit_exact(moco_run, tmp_path)


def _key_encoder(queue_size: int, dim: int = 4) -> Any:
    encoder = sslplug.ProjectorEncoder(nn.Flatten(), 12, nn.Linear(12, dim), dim)
    return moco_like.MoCoKeyEncoder(encoder, moco_like.MoCoSettings(queue_size=queue_size))


def test_moco_queue_wraps_around_a_size_that_is_no_multiple_of_the_batch() -> None:
    target = _key_encoder(queue_size=100)
    batches = [torch.full((64, 4), float(n)) for n in (1, 2, 3)]
    for batch in batches:
        target.enqueue(batch)
    assert int(target.queue_ptr) == (3 * 64) % 100
    expected = torch.empty(100)
    expected[0:28] = 2.0  # the second batch wrapped: rows 64-99, then 0-27
    expected[64:100] = 2.0
    expected[28:92] = 3.0  # the third batch overwrote rows 28-91
    assert torch.equal(target.queue[:, 0], expected)

    target.enqueue(torch.arange(150.0).unsqueeze(1).expand(150, 4))  # more than the queue holds
    rows = (92 + torch.arange(100)) % 100
    assert torch.equal(target.queue[rows, 0], torch.arange(50.0, 150.0))
    assert int(target.queue_ptr) == 92


def test_info_nce_matches_its_formula() -> None:
    torch.manual_seed(0)
    query, key = (F.normalize(torch.randn(6, 5), dim=1) for _ in range(2))
    queue = F.normalize(torch.randn(9, 5), dim=1)
    loss, _ = moco_like.info_nce(query, key, queue, 0.2)
    positive = torch.exp((query * key).sum(1).double() / 0.2)
    negative = torch.exp(query.double() @ queue.double().T / 0.2).sum(1)
    reference = -torch.log(positive / (positive + negative)).mean()
    torch.testing.assert_close(loss.double(), reference)


def test_moco_loss_needs_the_queue() -> None:
    registry = _registry("moco_like")
    config = load_config(
        None,
        ["components.plugin=moco_like", "components.target_update=byol"],
        registry.settings_classes(),
    )
    backbone, dim = build_backbone("small", SIZE)
    with pytest.raises(ComponentMismatchError, match="requires moco_queue"):
        registry.build(config, RunContext(config=config, image_size=SIZE), backbone, dim)


# both -----------------------------------------------------------------------------------------

_ALLOWED_IMPORTS = {
    "__future__",
    "collections.abc",
    "copy",
    "attrs",
    "kornia",
    "kornia.augmentation",
    "torch",
    "torch.nn",
    "torch.nn.functional",
    "sslplug",
}


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_fixture_uses_the_public_api_only(name: str) -> None:
    assert_public_api_only(Path(PLUGINS[name].__file__), _ALLOWED_IMPORTS)


def test_multi_crop_views_flow_through_the_view_grid_and_the_benchmark(tmp_path):
    from PIL import Image

    from sslplug.bench import BenchSettings, run_bench

    registry = _registry("dino_like")
    config = load_config(
        None,
        [
            "components.plugin=dino_like",
            "train.epochs=1",
            "train.batch_size=32",
            "train.max_steps_per_epoch=1",
            'train.disable=["progress", "knn", "tensorboard"]',
            "knn.baseline=false",
            "health.baseline=false",
            "data.workers=0",
            f"train.out={tmp_path}",
        ],
        registry.settings_classes(),
    )
    train(config, registry)
    width, height = Image.open(tmp_path / "views.png").size
    assert (width, height) == (8 * 33 + 1, 8 * 33 + 1)  # 8 views, the local ones scaled up

    settings = BenchSettings(
        plugin="dino_like", batch_size=16, steps=1, warmup=0, repeats=1, baseline=False,
        device="cpu", workers=0,
    )  # fmt: skip
    results = run_bench(settings, registry)
    assert results["sslplug_views"]["images_per_second"] > 0
    assert results["sslplug_step"]["images_per_second"] > 0

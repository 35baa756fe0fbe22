"""The mixing matrices of ``docs/methods.md``, checked against the plugins themselves.

Two tables: every method (``--plugin M``) on every method's augmentation
(``--augmentation A``), and every method's encoder, view generator and target network
(``--plugin E``) under every method's loss (``--loss L``). A cell is ``✓`` when the mix builds
and one training step (forward, loss, backward, optimiser step, target update) runs on the
default data's image size, and ``✗`` when it is refused before the first step with a
``ComponentMismatchError`` that names both plugins. Anything else, an exception during the
step or a refusal that names only one side, fails the test.

Each row runs on the small backbone, or on ``vit_micro`` when the row's method refuses the small
backbone on its own (MAE and I-JEPA need patch tokens): a cell then shows whether the mix works
where the row's method can run at all.

Print the tables as the docs show them with ``python tests/test_mixing_matrix.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from sslplug.assembly import assemble
from sslplug.config import load_config
from sslplug.engine import train_step
from sslplug.errors import ComponentMismatchError
from sslplug.plugins import COMPONENTS, PluginRegistry

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
AXES = {"augmentation": "--augmentation", "loss": "--loss"}
SIZE, BATCH = 32, 8
# distillation's teacher: random weights, as its default teacher is downloaded and tests run
# offline; set in every cell (the section is there whatever the plugins chosen)
TEACHER = "distill.teacher=random:small"


def methods(registry: PluginRegistry) -> list[str]:
    """The installed plugins that provide every component but maybe a target network."""
    needed = set(COMPONENTS) - {"target_update"}
    return [name for name in registry.names() if needed <= set(registry.provides(name))]


def backbone(registry: PluginRegistry, plugin: str) -> str:
    """``small``, or ``vit_micro`` for a method that needs the tokens of a ViT."""
    config = load_config(
        assignments=[f"components.plugin={plugin}", TEACHER],
        plugin_settings=registry.settings_classes(),
    )
    try:
        assemble(config, registry, image_size=SIZE, device=torch.device("cpu"), train=False)
    except ComponentMismatchError as error:
        if "patch_tokens" in str(error) or "patch tokens" in str(error):
            return "vit_micro"
        raise
    return "small"


def cell(registry: PluginRegistry, plugin: str, component: str, other: str) -> str:
    """``✓`` when ``--plugin plugin --<component> other`` trains a step, ``✗`` when refused."""
    config = load_config(
        assignments=[
            f"components.plugin={plugin}",
            f"components.{component}={other}",
            f"model.backbone={backbone(registry, plugin)}",
            TEACHER,
        ],
        plugin_settings=registry.settings_classes(),
    )
    torch.manual_seed(0)
    try:
        built = assemble(
            config, registry, image_size=SIZE, device=torch.device("cpu"), steps_per_epoch=2,
            total_steps=2,
        )  # fmt: skip
    except ComponentMismatchError as error:
        names = {repr(plugin), repr(other)}
        assert all(n in str(error) for n in names), f"refusal names not both plugins: {error}"
        return "✗"
    assert built.optimization is not None
    batch = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8)
    views = built.parts.views(batch)
    loss, _, _ = train_step(
        built.parts, built.optimization, views, 0, 2, torch.autocast("cpu", enabled=False)
    )
    assert torch.isfinite(loss), f"{plugin} with the {component} of {other}: loss {loss}"
    return "✓"


def table(registry: PluginRegistry, component: str) -> str:
    names = methods(registry)
    lines = [
        f"| `--plugin` \\ `{AXES[component]}` | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for plugin in names:
        cells = [cell(registry, plugin, component, other) for other in names]
        lines.append(f"| {plugin} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def documented(component: str) -> str:
    text = DOCS.read_text()
    found = re.search(
        rf"<!-- mixing matrix: {component} -->\n(.*?)\n<!-- end of matrix -->", text, re.DOTALL
    )
    assert found, f"docs/methods.md has no mixing matrix for the {component}"
    return found.group(1).strip()


@pytest.mark.slow  # one training step for each of the mixes
@pytest.mark.parametrize("component", list(AXES))
def test_mixing_matrix_in_the_docs_is_what_the_plugins_do(registry, component):
    measured = table(registry, component)
    assert documented(component) == measured, f"docs/methods.md should read:\n{measured}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    found = PluginRegistry()
    found.load_entry_points()
    for axis in sys.argv[1:] or list(AXES):
        print(f"<!-- mixing matrix: {axis} -->\n{table(found, axis)}\n<!-- end of matrix -->\n")

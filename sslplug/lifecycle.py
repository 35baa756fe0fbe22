"""The lifecycle hooks of one run (run start, step end, evaluate, epoch end, run end), typed,
called on every plugin the user has not switched off; a plugin that raises is named."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pluggy

from sslplug.config import RunContext
from sslplug.errors import PluginError, SslplugError

__all__ = ["LIFECYCLE_HOOKS", "Lifecycle"]

LIFECYCLE_HOOKS = frozenset(
    f"sslplug_{hook}" for hook in ("run_start", "step_end", "evaluate", "epoch_end", "run_end")
)


class Lifecycle:
    """The lifecycle hooks of one run, typed, without the plugins the user switched off.

    An exception raised inside a lifecycle plugin becomes a ``PluginError`` that names the
    plugin and the hook; an interruption (``KeyboardInterrupt``) and sslplug's own errors pass
    through unchanged.
    """

    def __init__(
        self, pm: pluggy.PluginManager, disabled: Sequence[Any], plugins: Sequence[str] = ()
    ) -> None:
        # the installed plugins taking part, whose settings a run saves
        self.plugins = tuple(plugins)
        self._callers = {
            hook.removeprefix("sslplug_"): pm.subset_hook_caller(hook, remove_plugins=disabled)
            for hook in LIFECYCLE_HOOKS
        }

    def _call(self, hook: str, **kwargs: Any) -> Any:
        caller = self._callers[hook]
        try:
            return caller(**kwargs)
        except SslplugError:
            raise
        except Exception as exc:
            codes = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()}
            frame, name = exc.__traceback__, "?"
            while frame is not None:
                name = codes.get(frame.tb_frame.f_code, name)
                frame = frame.tb_next
            raise PluginError(
                f"lifecycle plugin {name!r} raised in sslplug_{hook}: {exc!r}; switch it off "
                f"with --disable {name} or fix it"
            ) from exc

    def run_start(self, run: RunContext) -> None:
        self._call("run_start", run=run)

    def step_end(self, run: RunContext, step: int, metrics: dict[str, float]) -> None:
        self._call("step_end", run=run, step=step, metrics=metrics)

    def evaluate(self, run: RunContext, epoch: int) -> dict[str, float]:
        merged: dict[str, float] = {}
        for result in reversed(self._call("evaluate", run=run, epoch=epoch)):
            merged.update(result or {})
        return merged

    def epoch_end(self, run: RunContext, epoch: int, metrics: dict[str, float]) -> None:
        self._call("epoch_end", run=run, epoch=epoch, metrics=metrics)

    def run_end(
        self, run: RunContext, summary: dict[str, Any], error: BaseException | None = None
    ) -> None:
        self._call("run_end", run=run, summary=summary, error=error)

"""How a run computes and for how long: ``train.compile``, ``train.precision=auto`` on CPUs with
and without native bf16, and ``train.max_minutes``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sslplug import runtime
from sslplug.checkpoint import load_checkpoint
from sslplug.cli import main
from sslplug.components import Views
from sslplug.errors import ConfigError
from sslplug.pretrained import build_encoder, load_run
from sslplug.runtime import autocast_context, cpu_has_native_bf16, resolve_precision

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_compiler_and_detection():
    """No compiled code and no cached CPU answer leak from one test into another."""
    torch._dynamo.reset()
    cpu_has_native_bf16.cache_clear()
    yield
    torch._dynamo.reset()
    cpu_has_native_bf16.cache_clear()


def _with(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


# --- train.precision -----------------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_a_cpu_is_bf16_only_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    precision = resolve_precision("auto", CPU)
    assert precision.name == ("bf16" if native else "fp32")
    assert ("with native bf16" if native else "without native bf16") in precision.reason
    context = autocast_context("auto", CPU)
    if native:
        assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16
        with context:
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    else:
        with context:
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_explicit_precision_and_cuda_ignore_the_cpu(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("fp32", CPU).name == "fp32"
    assert resolve_precision("bf16", CPU).name == "bf16"
    assert resolve_precision("auto", torch.device("cuda")).name == "bf16"
    assert resolve_precision("fp32", torch.device("cuda")).name == "fp32"


def test_an_unknown_precision_is_refused_with_the_valid_ones():
    with pytest.raises(ConfigError, match="'fp16' is not a precision; valid: auto, bf16, fp32"):
        resolve_precision("fp16", CPU)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "native"),
    [(True, False, True), (False, True, True), (False, False, False)],
)
def test_native_bf16_is_asked_of_torch_first(monkeypatch, amx, avx512_bf16, native):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    # /proc/cpuinfo is not asked when torch can answer
    monkeypatch.setattr(runtime, "_cpuinfo_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))
    assert cpu_has_native_bf16() is native


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse2 avx2 avx512f avx512_bf16", True),
        ("fpu amx_tile amx_bf16", True),
        ("avx512f", False),
    ],
)
def test_native_bf16_falls_back_on_proc_cpuinfo(monkeypatch, tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    read = runtime._cpuinfo_flags
    monkeypatch.setattr(runtime, "_cpuinfo_flags", lambda: read(cpuinfo))
    assert cpu_has_native_bf16() is native


def test_cpuinfo_without_flags_or_file_means_no_flags(tmp_path):
    assert runtime._cpuinfo_flags(tmp_path / "absent") == frozenset()
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert runtime._cpuinfo_flags(arm) == frozenset()


# --- train.max_minutes ---------------------------------------------------------------------


@pytest.mark.slow  # three sessions of one run: 3 epochs of 2 steps in all
def test_a_time_limit_stops_after_the_epoch_and_the_run_resumes(fast_args, tmp_path, capsys):
    run = tmp_path / "run"
    args = [*_with(fast_args, "--epochs", "3"), "--set", "knn.every=0", "--set", "health.every=0"]
    assert main([*args, "--set", "train.max_minutes=0.0001"]) == 0
    err = capsys.readouterr().err
    assert "train.max_minutes=0.0001: stopped after epoch 1 of 3" in err
    assert f"sslplug run --resume {run}" in err
    assert str(resolve_precision("auto", CPU)) in err  # which precision, and why, once
    assert err.count(str(resolve_precision("auto", CPU))) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by_time_limit"] is True
    assert (summary["epochs"], summary["epochs_planned"], summary["steps"]) == (1, 3, 2)
    assert summary["precision"] == resolve_precision("auto", CPU).name
    # the last epoch is checkpointed and evaluated, though eval.every=0 would wait for epoch 3
    assert load_checkpoint(run)["epoch"] == 1
    [point] = summary["knn_history"]
    assert point["epoch"] == 1 and 0 <= point["top1"] <= 100
    assert 0 < point["train_seconds"] <= point["wall_seconds"]

    # a resumed session has a limit of its own: one more epoch
    assert main(["run", "--resume", str(run)]) == 0
    assert "stopped after epoch 2 of 3" in capsys.readouterr().err
    assert load_checkpoint(run)["epoch"] == 2
    # without the limit, the run ends as planned
    assert main(["run", "--resume", str(run), "--set", "train.max_minutes=0"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by_time_limit"] is False
    assert (summary["epochs"], summary["steps"]) == (3, 6)
    history = summary["knn_history"]
    assert [point["epoch"] for point in history] == [1, 2, 3]
    # seconds count over the sessions, not from each one's start
    for key in ("train_seconds", "wall_seconds"):
        seconds = [point[key] for point in history]
        assert seconds == sorted(seconds) and seconds[0] < seconds[-1]
    assert summary["train_seconds"] == history[-1]["train_seconds"]


def test_without_a_time_limit_a_run_is_not_stopped_early(fast_args, tmp_path):
    assert main([*fast_args, "--set", "train.max_minutes=0"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_by_time_limit"] is False and summary["epochs"] == 2
    assert [point["epoch"] for point in summary["knn_history"]] == [1, 2]


def test_a_negative_time_limit_is_refused(fast_args, capsys):
    assert main([*fast_args, "--set", "train.max_minutes=-1"]) == 2
    assert "max_minutes" in capsys.readouterr().err


# --- train.compile -------------------------------------------------------------------------


def _same_views(batch: int, size: int) -> Views:
    generator = torch.Generator().manual_seed(0)
    return Views(images=tuple(torch.randn(batch, 3, size, size, generator=generator) for _ in "ab"))


@pytest.mark.slow  # compiles the encoder and the target network (a minute on a CPU)
def test_a_compiled_run_keeps_its_checkpoint_and_resumes_without_compile(
    fast_args, tmp_path, registry, capsys
):
    run = tmp_path / "run"
    args = [*_with(fast_args, "--epochs", "1"), "--set", "train.max_steps_per_epoch=1"]
    assert main([*args, "--set", "train.compile=true"]) == 0
    assert "torch.compile on" in capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["compile"] is True and summary["steps"] == 1
    # the checkpoint has the keys of an encoder that was never compiled
    saved = load_checkpoint(run)
    loaded = load_run(run, registry)
    eager = build_encoder(loaded, registry, 32, 0, CPU)
    assert set(saved["encoder"]) == set(eager.state_dict())
    assert not any("_orig_mod" in key for key in saved["encoder"])
    assert not any("_orig_mod" in key for key in saved["target_update"])
    # compiled and not, the trained weights compute the same
    compiled = build_encoder(loaded, registry, 32, 0, CPU)
    compiled.compile()
    views = _same_views(4, 32)
    with torch.no_grad():
        want, got = eager(views), compiled(views)
    for a, b in zip(want.projections + want.features, got.projections + got.features):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # and the run goes on without compiling
    assert main(["run", "--resume", str(run), "--epochs", "2", "--set", "train.compile=false"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["compile"] is False and summary["epochs"] == 2


def _failing_backend(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]):
    raise RuntimeError("no compiler for this device")


def test_a_compile_failure_says_so_and_how_to_train_without(fast_args, monkeypatch, capsys):
    compile_module = nn.Module.compile
    monkeypatch.setattr(
        nn.Module, "compile", lambda self: compile_module(self, backend=_failing_backend)
    )
    args = [*_with(fast_args, "--epochs", "1"), "--set", "train.max_steps_per_epoch=1"]
    assert main([*args, "--set", "train.compile=true"]) == 2
    err = capsys.readouterr().err
    assert "torch.compile failed to compile the model for device 'cpu'" in err
    assert "no compiler for this device" in err
    assert "--set train.compile=false" in err
    assert "plugin 'byol' raised" not in err  # not the plugin's fault


def test_a_plugin_error_in_a_compiled_encoder_is_still_the_plugins(monkeypatch):
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("the plugin's own bug")

    module = Broken()
    module.compile()
    with pytest.raises(ValueError, match="the plugin's own bug"), runtime.compile_failures(CPU):
        module(torch.ones(1))


def test_compile_failures_passes_dynamo_errors_when_compile_is_off():
    from torch._dynamo.exc import BackendCompilerFailed

    module = nn.Linear(2, 2)
    module.compile(backend=_failing_backend)
    with pytest.raises(BackendCompilerFailed), runtime.compile_failures(CPU, compiled=False):
        module(torch.ones(1, 2))
    torch._dynamo.reset()
    with (
        pytest.raises(runtime.CompileError, match=r"train\.compile=false"),
        runtime.compile_failures(CPU),
    ):
        module(torch.ones(1, 2))


@pytest.mark.slow  # compiles BYOL's encoder and target network for the benchmark
def test_bench_compiles_and_reports_the_compile_time(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--batch-size", "32", "--steps", "1", "--repeats", "1", "--warmup", "1"]
    args += ["--workers", "0", "--no-baseline", "--device", "cpu", "--out", str(out)]
    for setting in ("projector_hidden_dim=64", "predictor_hidden_dim=64", "projection_dim=32"):
        args += ["--set", f"byol.{setting}"]
    assert main([*args, "--set", "train.compile=true"]) == 0
    assert "compiled in" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["compile"] is True and results["compile_seconds"] > 0
    assert results["sslplug_step"]["images_per_second"] > 0
    assert results["precision"] == resolve_precision("auto", CPU).name

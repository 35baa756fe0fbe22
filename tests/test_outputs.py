"""What a finished run's commands write, and what they read, under faults injected for real:
``export`` over a checkpoint, a file of the run, an existing file, a folder, a path under a file,
a read-only folder or a full disk; ``eval`` and ``finetune`` in a run folder they cannot write;
checkpoints that are random bytes, truncated, or hold objects that are not plain data; and a
source that is not a run at all."""

from __future__ import annotations

import json
import random
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from sslplug.checkpoint import load_checkpoint, save_checkpoint
from sslplug.cli import main
from sslplug.downstream import record
from sslplug.errors import CheckpointError, OutputError
from sslplug.nn import SmallConvNet

from .conftest import FAST

# torch's advice for a file that weights_only refuses: never to be passed on for a file of
# unknown origin, nor its other wording about its zip reader
_TORCH_ADVICE = ("weights_only", "safe_globals", "Re-running", "miniz", "file an issue")


@pytest.fixture(scope="module")
def run(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished one-epoch BYOL run for the module; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("outputs") / "run"
    args = ["run", "--data", str(shapes_folder), "--epochs", "1", "--out", str(out)]
    for item in FAST:
        args += ["--set", item]
    assert main(args) == 0
    return out


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("sslplug: error: "), err
    assert "Traceback" not in err
    return err


def _assert_no_torch_advice(message: str) -> None:
    for phrase in _TORCH_ADVICE:
        assert phrase not in message, f"{phrase!r} in {message!r}"


# ---- export: never over a checkpoint, a file of the run, or (without --force) any file -------


@pytest.mark.parametrize("target", ["the run's last.pt", "a copy", "a truncated copy"])
@pytest.mark.parametrize("force", [False, True])
def test_export_never_overwrites_a_checkpoint(run, tmp_path, capsys, target, force):
    checkpoint = run / "last.pt"
    before = checkpoint.read_bytes()
    if target == "the run's last.pt":
        out = checkpoint
    else:  # a checkpoint under another name, perhaps cut short: still not to be replaced
        out = tmp_path / "model.pt"
        out.write_bytes(before if target == "a copy" else before[: len(before) // 3])
    kept = out.read_bytes()
    assert main(["export", str(run), str(out), *(["--force"] if force else [])]) == 2
    assert f"{str(out)!r} is an sslplug checkpoint, which is never overwritten" in _error(capsys)
    assert out.read_bytes() == kept and checkpoint.read_bytes() == before
    assert not out.with_suffix(".json").exists()
    assert load_checkpoint(run)["epoch"] == 1  # the run's checkpoint survived, and loads


def test_export_never_replaces_a_device(run, tmp_path, capsys):
    out = tmp_path / "null.pt"
    out.symlink_to("/dev/null")
    assert main(["export", str(run), str(out), "--force"]) == 2
    assert f"{str(out)!r} is not a regular file (a device, a pipe or a socket)" in _error(capsys)
    assert out.is_symlink() and Path("/dev/null").is_char_device()


@pytest.mark.parametrize("name", ["settings.toml", "summary.pt"])  # summary.pt: its note
def test_export_never_replaces_a_file_of_the_run_even_with_force(run, capsys, name):
    before = _files(run)
    assert main(["export", str(run), str(run / name), "--force"]) == 2
    assert "is a file of the run itself, which is never overwritten" in _error(capsys)
    assert _files(run) == before


def test_export_replaces_an_existing_file_only_with_force(run, tmp_path, capsys):
    out = tmp_path / "backbone.pt"
    out.write_text("an older export")
    assert main(["export", str(run), str(out)]) == 2
    err = _error(capsys)
    assert f"{str(out)!r} already exists; give another name, or add --force to replace it" in err
    assert out.read_text() == "an older export" and not out.with_suffix(".json").exists()
    assert main(["export", str(run), str(out), "--force"]) == 0
    SmallConvNet().load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert json.loads(out.with_suffix(".json").read_text())["format"] == "sslplug-backbone"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.json", "backbone.pt"]


def test_export_to_a_name_ending_in_json_is_refused_not_written_twice(run, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["export", str(run), str(out)]) == 2
    err = _error(capsys)
    assert f"{str(out)!r} ends in .json, the name of the settings note" in err
    assert f"name the backbone {str(tmp_path / 'b.pt')!r}" in err
    assert list(tmp_path.iterdir()) == []


# ---- export: a folder, a path under a file, a read-only folder, a full disk ------------------


@pytest.mark.parametrize("case", ["an existing folder", "a name ending in /", "under a file"])
def test_export_to_a_folder_or_under_a_file_is_a_clear_error(run, tmp_path, capsys, case):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.pt").write_text("a file")
    out, expected = {
        "an existing folder": (
            str(tmp_path / "folder"),
            f"{str(tmp_path / 'folder')!r} is a folder; give the name of a file to write in it",
        ),
        "a name ending in /": (
            f"{tmp_path / 'exports'}/",
            f"ends in '/', so it names a folder; give the name of a file to write, such as "
            f"{str(tmp_path / 'exports' / 'backbone.pt')!r}",
        ),
        "under a file": (
            str(tmp_path / "file.pt" / "b.pt"),
            f"{str(tmp_path / 'file.pt')!r} is a file, not a folder",
        ),
    }[case]
    before = _files(tmp_path)
    assert main(["export", str(run), out]) == 2
    assert expected in _error(capsys)
    assert _files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.pt", "folder"]


@pytest.mark.slow  # a child process without root's power over permissions
@pytest.mark.parametrize("out", ["b.pt", "new/b.pt"])
def test_export_to_a_read_only_folder_is_a_clear_error(run, tmp_path, run_cli, out):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        done = run_cli(["export", run, folder / out], unprivileged=True)
    finally:
        folder.chmod(0o755)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert (
        f"sslplug: error: could not write {str(folder / out)!r}: Permission denied; make "
        f"{str(folder)!r} writable (chmod u+w), then try again (nothing was written)"
    ) in done.stderr
    assert list(folder.iterdir()) == []


@pytest.mark.slow  # a child process whose files may not grow past a limit
def test_export_on_a_full_disk_leaves_nothing_behind(run, tmp_path, run_cli):
    out = tmp_path / "exports" / "b.pt"
    done = run_cli(["export", run, out], max_file_bytes=20_000)  # the backbone is about 400 KB
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"could not write {str(out)!r}: a file size limit was reached" in done.stderr
    assert "(nothing was written)" in done.stderr
    assert list(tmp_path.iterdir()) == []  # not even the folder it made for the export


# ---- eval and finetune: the results are printed before saving them can fail -----------------


@pytest.mark.slow  # children without root's power over permissions
@pytest.mark.parametrize(
    ("command", "read_only"), [("eval", "."), ("finetune", "."), ("eval", "tensorboard")]
)
def test_results_are_printed_when_the_run_folder_cannot_be_written(
    run, tmp_path, run_cli, command, read_only
):
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    before = (copy / "summary.json").read_text()
    extra = ["--steps", "2"] if command == "finetune" else []
    (copy / read_only).chmod(0o555)
    try:
        done = run_cli([command, copy, "--labels", "2", *extra], unprivileged=True)
    finally:
        (copy / read_only).chmod(0o755)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "top-1" in done.stdout and "2/class" in done.stdout  # the results table
    assert "sslplug: error: saving the results above failed: " in done.stderr
    summary = json.loads((copy / "summary.json").read_text())
    if read_only == ".":
        assert (
            f"could not write {str(copy / 'summary.json')!r}: Permission denied; make "
            f"{str(copy)!r} writable (chmod u+w), then try again (nothing was written)"
        ) in done.stderr
        assert (copy / "summary.json").read_text() == before
    else:
        assert (
            f"the results were added to {str(copy / 'summary.json')!r}, but not to the "
            f"TensorBoard log {str(copy / 'tensorboard')!r}: Permission denied"
        ) in done.stderr
        frozen = [r for r in summary["evaluations"] if r["kind"] != "health"]
        assert frozen[-1]["labels"] == "2/class"
    assert not list(copy.glob(".*.tmp"))
    assert load_checkpoint(copy)["epoch"] == 1


def test_record_refuses_a_summary_that_is_not_sslplugs_and_leaves_it(tmp_path):
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(OutputError, match=r"cannot add the results to .*summary\.json.*move the"):
        record(tmp_path, [{"labels": "all", "init": "pre-trained", "knn_top1": 50.0}])
    assert (tmp_path / "summary.json").read_text() == "{not json"


def test_record_replaces_the_summary_atomically(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 3}))
    record(tmp_path, [{"labels": "all", "init": "pre-trained", "knn_top1": 50.0}])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["evaluations"][0]["knn_top1"] == 50.0 and summary["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "tensorboard"]


# ---- checkpoints that cannot be read: random bytes, truncated, objects that are not data -----


def _random_bytes(size: int) -> bytes:
    return random.Random(0).randbytes(size)


def _torch_archive_of_random_data(path: Path) -> None:
    """A zip archive laid out as torch.save lays it out, whose pickle is random bytes."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + _random_bytes(500))
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")


@pytest.mark.parametrize("content", ["random bytes", "a torch archive of random data"])
@pytest.mark.parametrize("command", ["eval", "export"])
def test_random_bytes_are_refused_without_torchs_advice(tmp_path, capsys, content, command):
    path = tmp_path / "last.pt"
    if content == "random bytes":
        path.write_bytes(_random_bytes(5000))
    else:
        _torch_archive_of_random_data(path)
    args = [command, str(path)] + ([str(tmp_path / "b.pt")] if command == "export" else [])
    assert main(args) == 2
    err = _error(capsys)
    assert f"{str(path)!r} is not a readable sslplug checkpoint" in err
    assert "sslplug did not write it" in err or "not one that torch.save wrote" in err
    if content == "random bytes":
        assert "or came from an untrusted source" in err
    _assert_no_torch_advice(err)


def test_an_object_that_runs_code_is_refused_as_from_an_untrusted_source(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "sslplug-checkpoint", "version": 1, "x": Evil()}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "it holds an object that needs print (a class or function" in message
    assert "not written by sslplug, or comes from an untrusted source" in message
    _assert_no_torch_advice(message)


class Schedule:
    """Neither a tensor nor plain data: what a careless ``get_extra_state`` might return."""

    def __init__(self, step: int) -> None:
        self.step = step


class _ComponentWithObjectState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def get_extra_state(self) -> Schedule:
        return Schedule(step=7)

    def set_extra_state(self, state: Schedule) -> None:
        pass


def test_a_component_keeping_an_object_in_its_state_is_named(tmp_path, capsys):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "encoder": _ComponentWithObjectState().state_dict()}, path)
    assert main(["eval", str(path)]) == 2
    err = _error(capsys)
    assert f"it holds an object that needs {__name__}.Schedule (a class or function" in err
    assert "components must keep plain data there" in err
    assert "(tensors, numbers, strings, lists, dicts)" in err
    _assert_no_torch_advice(err)


@pytest.mark.parametrize("cut", ["half", "empty"])
@pytest.mark.parametrize("command", ["eval", "finetune", "export"])
def test_a_truncated_checkpoint_says_so(run, tmp_path, capsys, cut, command):
    copy = tmp_path / "run"
    copy.mkdir()
    whole = (run / "last.pt").read_bytes()
    (copy / "last.pt").write_bytes(whole[: len(whole) // 2] if cut == "half" else b"")
    args = [command, str(copy)] + ([str(tmp_path / "b.pt")] if command == "export" else [])
    assert main(args) == 2
    err = _error(capsys)
    path = str(copy / "last.pt")
    if cut == "half":
        expected = f"{path!r} is not a readable sslplug checkpoint: it is truncated "
        expected += f"({len(whole) // 2} bytes of an sslplug checkpoint, without its end)"
    else:
        expected = f"{path!r} is not a readable sslplug checkpoint: it is empty (0 bytes)"
    assert expected in err
    assert "a copy or download that stopped early, or a disk that filled" in err
    assert "the previous one is gone" in err
    _assert_no_torch_advice(err)
    assert not (tmp_path / "b.pt").exists()


def test_the_temporary_file_of_an_interrupted_write_points_to_the_intact_checkpoint(
    run, tmp_path, capsys
):
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    whole = (copy / "last.pt").read_bytes()
    temporary = copy / ".last.pt.k3x9q2ab.tmp"  # as a kill during save_checkpoint leaves it
    temporary.write_bytes(whole[:1000])
    assert main(["eval", str(temporary)]) == 2
    err = _error(capsys)
    assert "it is the temporary file of a checkpoint write that was cut short" in err
    assert f"the checkpoint it was to replace, {str(copy / 'last.pt')!r}, is untouched" in err
    assert load_checkpoint(copy)["epoch"] == 1


# ---- a source that is not a run -------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("missing", "no checkpoint at {missing}: give a run folder that holds last.pt"),
        ("folder", "no checkpoint at {folder}: give a run folder that holds last.pt"),
        ("image", "{image} is not a readable sslplug checkpoint: it is not a zip archive"),
        ("bare", "{bare} holds no encoder weights or settings"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "finetune", "export"])
def test_a_source_that_is_not_a_run_is_a_clear_error(
    shapes_folder, tmp_path, capsys, source, expected, command
):
    paths = {
        "missing": tmp_path / "nowhere" / "last.pt",
        "folder": tmp_path,
        "image": next((shapes_folder / "train").rglob("*.png")),
        "bare": save_checkpoint({"epoch": 1}, tmp_path / "bare.pt"),
    }
    shown = {
        name: repr(str(path / "last.pt" if path.is_dir() else path)) for name, path in paths.items()
    }
    args = [command, str(paths[source])]
    args += [str(tmp_path / "b.pt")] if command == "export" else []
    assert main(args) == 2
    assert expected.format(**shown) in _error(capsys)
    assert not (tmp_path / "b.pt").exists()


@pytest.mark.slow  # a child process without root's power over permissions
def test_an_unreadable_checkpoint_is_a_clear_error(run, tmp_path, run_cli):
    path = tmp_path / "last.pt"
    shutil.copyfile(run / "last.pt", path)
    path.chmod(0o000)
    try:
        done = run_cli(["eval", path], unprivileged=True)
    finally:
        path.chmod(0o600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"cannot read the checkpoint {str(path)!r}: Permission denied" in done.stderr
    assert load_checkpoint(path)["epoch"] == 1

"""Which checkpoints a run keeps, by name, and the file operations that keep and delete them."""

import os

import pytest

from beit_common import BeitDataError, Location
from beit_common.files import copy_atomic, remove_file
from pipelines.checkpoint_history import Kept, kept_checkpoints, kept_name, run_checkpoint, to_prune


def kept(*names: str) -> list[Kept]:
    return [Kept(int(n.rstrip("e")), int(n.rstrip("e")) // 3 if n.endswith("e") else None, Location(n))
            for n in names]


def steps(checkpoints: list[Kept]) -> list[int]:
    return [k.step for k in checkpoints]


def test_names_sort_by_step_and_say_the_epochs_of_one_kept_for_good(tmp_path):
    assert kept_name(12000) == "step-00012000.pt"
    assert kept_name(375300, 300) == "step-00375300-epoch-0300.pt"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in (kept_name(30), kept_name(4), kept_name(9, 3), "notes.pt", "step-7.pt.bak", ".step-00000005.pt.tmp-1"):
        (folder / name).write_bytes(b"")
    found = kept_checkpoints(Location(tmp_path))
    assert [(k.step, k.epoch, k.location.name) for k in found] == [
        (4, None, "step-00000004.pt"), (9, 3, "step-00000009-epoch-0003.pt"), (30, None, "step-00000030.pt")]
    assert kept_checkpoints(Location(tmp_path / "a run from before")) == []
    assert run_checkpoint(Location(tmp_path)) == Location(tmp_path / "checkpoint.pt")
    assert run_checkpoint(Location(tmp_path), 9) == Location(folder / "step-00000009-epoch-0003.pt")
    with pytest.raises(BeitDataError, match=r"keeps no checkpoint of step 5: it keeps steps 4, 9, 30; without `step`, "
                                            r"the latest \(checkpoint.pt\)$"):
        run_checkpoint(Location(tmp_path), 5)
    with pytest.raises(BeitDataError, match=r"it keeps none \(pretrain --keep-checkpoints, "
                                            r"--checkpoint-every-epochs\)"):
        run_checkpoint(Location(tmp_path / "old"), 5)


def test_the_newest_are_kept_with_every_epoch_checkpoint_and_a_rolled_back_future():
    history = kept("3e", "5", "6e", "7", "8")
    assert steps(to_prune(history, newest=2, step=8)) == [5]
    assert steps(to_prune(history, newest=1, step=8)) == [5, 7]
    assert steps(to_prune(history, newest=0, step=8)) == [5, 7, 8]  # 0: none but the epochs'
    assert to_prune(history, newest=10, step=8) == []
    # A run rolled back to step 5 and saving at 6 again deletes nothing past it.
    assert steps(to_prune(kept("3e", "5", "6", "7", "8"), newest=1, step=6)) == [5]


def test_a_copy_is_a_link_where_the_disk_allows_else_a_copy_and_appears_whole(tmp_path, monkeypatch):
    source = tmp_path / "checkpoint.pt"
    source.write_bytes(b"weights")
    copy_atomic(source, tmp_path / "linked.pt")
    assert os.path.samefile(source, tmp_path / "linked.pt")
    # The source is then replaced by a rename, as every write is: the link keeps the old bytes.
    (tmp_path / "new").write_bytes(b"newer")
    os.replace(tmp_path / "new", source)
    assert (tmp_path / "linked.pt").read_bytes() == b"weights"

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # what FAT and many FUSE mounts say

    monkeypatch.setattr(os, "link", no_links)
    copy_atomic(source, tmp_path / "copied.pt")
    assert (tmp_path / "copied.pt").read_bytes() == b"newer" and not os.path.samefile(source, tmp_path / "copied.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "copied.pt", "linked.pt"]  # no temp left
    with pytest.raises(BeitDataError, match="cannot write .*gone.pt"):
        copy_atomic(tmp_path / "missing.pt", tmp_path / "gone.pt")
    remove_file(tmp_path / "copied.pt")
    remove_file(tmp_path / "copied.pt")  # already gone: no error
    assert not (tmp_path / "copied.pt").exists()

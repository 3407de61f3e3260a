"""The ground module: atomic writes that fail in one line, folder locks, file descriptions."""

import errno
import os
import subprocess
from pathlib import Path

import pytest

from beit_common import BeitDataError, describe_file, save_atomic, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def full_disk(tmp: Path):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(BeitDataError, match=rf"^cannot write {target}: No space left on device$"):
        write_atomic(target, full_disk)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs, where the machine lets this process mount one (root); skipped elsewhere."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_torch_saves_on_a_full_disk_are_one_line_and_leave_nothing(tiny_disk):
    import torch

    with pytest.raises(BeitDataError, match=r"checkpoint.pt: No space left on device$"):
        save_atomic({"w": torch.zeros(200_000)}, tiny_disk / "checkpoint.pt")
    assert list(tiny_disk.iterdir()) == []


def test_pretrain_on_a_full_disk_is_one_line(sample_shards, sample_tokens, tiny_disk):
    from helpers import run_cli

    # The tiny model's checkpoint (about 6 MB with its optimizer) cannot fit in 256 KiB.
    result = run_cli("pretrain", "--shards", str(sample_shards), "--tokens", str(sample_tokens), "--out",
                     str(tiny_disk / "run"), "--model", "beit_mim_tiny_patch16_224", "--steps", "1",
                     "--batch-size", "2", "--device", "cpu", "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"Error: cannot write {tiny_disk}/run/checkpoint.pt: "
                                                  "No space left on device"]
    assert not [p for p in (tiny_disk / "run").iterdir() if p.name.endswith(".pt") or ".tmp" in p.name]


def test_files_are_described_by_what_they_hold(tmp_path):
    cases = {"e": b"", "t.txt": b"hello world\n", "z.pt": b"PK\x03\x04rest", "p.parquet": b"PAR1....",
             "j.jpg": b"\xff\xd8\xff\xe0", "b.bin": bytes([0x01, 0xfe, 0xff, 0x9c] * 4)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    assert describe_file(tmp_path / "e") == "an empty file"
    assert describe_file(tmp_path / "t.txt") == "a text file starting 'hello world\\n'"
    assert describe_file(tmp_path / "z.pt") == "a zip archive"
    assert describe_file(tmp_path / "p.parquet") == "a Parquet file"
    assert describe_file(tmp_path / "j.jpg") == "a JPEG image"
    assert describe_file(tmp_path / "b.bin").startswith("binary data starting 01feff9c")

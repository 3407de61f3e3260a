"""The ground module: atomic writes that fail in one line, folder locks, file descriptions, and what a
location answers for the code above it."""

import errno
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from beit_common import BeitDataError, Location, describe_file, resolve_locations, save_atomic, storage, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def full_disk(tmp: Path):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(BeitDataError, match=rf"^cannot write {target}: No space left on device$"):
        write_atomic(target, full_disk)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@given(host=st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?", fullmatch=True),
       pid=st.integers(1, 2**22), name=st.from_regex(r"[a-z0-9_.-]{1,20}", fullmatch=True))
def test_a_temporary_name_says_which_host_and_process_wrote_it(host, pid, name):
    from beit_common.files import temp_writer

    assert temp_writer(f".{name}.tmp-{host}-{pid}") == (host, pid)  # write_atomic's, beside its target
    assert temp_writer(f".{name}.tmp-{host}-{pid}-x1_9abcd.part") == (host, pid)  # an upload's, in the cache
    assert temp_writer(f".{name}.tmp-{pid}") == (None, pid)  # before names carried the host: this one's
    assert temp_writer(f".{name}.tmp-{host}-") is None and temp_writer(name.replace(".tmp-", "")) is None


def test_stale_temporaries_go_only_where_this_host_knows_their_writer_is_gone(tmp_path):
    import socket

    from beit_common.files import remove_stale_temps, temp_name

    gone = _a_dead_pid()
    host = socket.gethostname()
    names = {"mine-dead": f".a.parquet.tmp-{host}-{gone}", "mine-alive": temp_name("b.parquet"),
             "old-dead": f".c.parquet.tmp-{gone}", "other-host": f".d.parquet.tmp-not-{host}-{gone}",
             "upload-dead": f".e.parquet.tmp-{host}-{gone}-abc123.part"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"half")
    removed = {p.name for p in remove_stale_temps(tmp_path)}
    assert removed == {names["mine-dead"], names["old-dead"], names["upload-dead"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["mine-alive"], names["other-host"]])


def _a_dead_pid() -> int:
    done = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True)
    return int(done.stdout)


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


PIPE = "pipe:curl -s -H 'Authorization: Bearer s3cret' https://h/train-000001.tar"


def test_a_location_says_what_its_callers_need_of_its_kind(tmp_path):
    local, url, pipe = Location(tmp_path / "a.tar"), Location("s3://b/p/a.tar?X-Amz-Signature=s3cret"), Location(PIPE)
    assert local.local_path() == tmp_path / "a.tar" and url.local_path() is None and pipe.local_path() is None
    assert local.beside("shards.json") == Location(tmp_path / "shards.json")
    assert Location("s3://b/p/a.tar").beside("shards.json") == "s3://b/p/shards.json" and pipe.beside("x") is None
    folder = Location(tmp_path)
    assert folder.locate("img/1.jpg") == Location(tmp_path / "img" / "1.jpg")
    assert folder.locate("/abs/1.jpg") == "/abs/1.jpg" and folder.locate("gs://b/1.jpg") == "gs://b/1.jpg"
    assert Location("s3://b/root/").locate("img/1.jpg") == "s3://b/root/img/1.jpg"
    (tmp_path / "link").symlink_to(tmp_path)
    linked = Location(tmp_path / "link" / "a.tar")
    assert linked.reference() == str((tmp_path / "a.tar").resolve()) and linked.reference(beside=True) == "a.tar"
    assert "s3cret" not in url.reference() and url.reference(beside=True) == url.reference()
    assert url.reference().startswith("s3://b/p/a.tar?") and "s3cret" not in pipe.reference()


def test_a_local_folder_is_itself_or_a_copy_of_the_files_asked_for(tmp_path, monkeypatch):
    with storage.local_folder(Location(tmp_path), ["x"]) as folder:
        assert folder == tmp_path
    fetched = []
    monkeypatch.setattr(storage, "download", lambda url, local: (fetched.append(url), Path(local).write_text(url)))
    with storage.local_folder(Location("s3://b/run/"), ["model.safetensors", "config.json"]) as folder:
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        assert (folder / "config.json").read_text() == "s3://b/run/config.json"
    assert fetched == ["s3://b/run/model.safetensors", "s3://b/run/config.json"] and not folder.exists()


def test_a_config_turns_its_locations_into_location_values_once(tmp_path):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Config:
        out: object
        sources: object = ()
        classes: object = None
        name: str = "x"

        def __post_init__(self):
            resolve_locations(self, "out", "sources", "classes")

    cfg = Config(out=tmp_path, sources=["s3://b/a.parquet", tmp_path / "b"])
    assert type(cfg.out) is Location and cfg.out == str(tmp_path) and cfg.classes is None and cfg.name == "x"
    assert type(cfg.sources) is list and [type(s) for s in cfg.sources] == [Location, Location]
    assert cfg.sources == ["s3://b/a.parquet", str(tmp_path / "b")]
    assert type(Config(out="o", sources=("a",)).sources) is tuple
    same = Location("s3://b/run")
    assert Config(out=same).out is same

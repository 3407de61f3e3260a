"""Integrity at the edges (issue 33): credentials inside ``pipe:`` commands are never printed or
stored; a batch decodes a bounded number of pixels; DALI's loader dies with its trainer; exports
are written with the umask and their JSON names the weights relative to itself."""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from helpers import REPO, invoke, jpeg_bytes, write_tar
from hypothesis import given
from hypothesis import strategies as st

from beit_common import Location, redact, redacted, write_atomic, write_text_atomic
from beit_data.images import BATCH_PIXELS, ImageTooLarge, probe_image
from beit_data.prefetch import batched

# ---------------------------------------------------------------------------------------------
# Item 6: pipe: commands are redacted like URLs.

PW, TOK, KEY = "hunter2-Pw9", "eyJhbGci.T0k3n-xyz", "Ak-42key-Q7"
SECRETS = (PW, TOK, KEY, base64.b64encode(f"admin:{PW}".encode()).decode())


REDACTIONS = [  # (a pipe: command, the secrets it carries, what must still be read)
    (f"pipe:curl -sSf -u admin:{PW} http://h:80/d/a-000001.tar", [PW], "http://h:80/d/a-000001.tar"),
    (f"pipe:curl -sSf -u{'admin:' + PW} --retry 2 http://h/a.tar", [PW], "--retry 2 http://h/a.tar"),
    (f"pipe:curl --user 'admin:{PW} x' -o - http://h/a.tar", [PW], "-o - http://h/a.tar"),
    (f"pipe:curl --proxy-user=admin:{PW} http://h/a.tar", [PW], "http://h/a.tar"),
    (f"pipe:curl -H 'Authorization: Bearer {TOK}' http://h/a.tar", [TOK], "-H 'Authorization: REDACTED'"),
    (f'pipe:curl -H "Authorization: Basic {SECRETS[3]}" http://h/a.tar', [SECRETS[3]], "http://h/a.tar"),
    (f"pipe:curl -H Authorization: Bearer {TOK} http://h/a.tar", [TOK], "http://h/a.tar"),
    (f'pipe:curl --header="X-Api-Key: {KEY}" -H "Cookie: s={TOK}" http://h/a.tar', [KEY, TOK], "http://h/a.tar"),
    (f"pipe:wget -qO- --header='X-Amz-Security-Token: {TOK}' --password={PW} --http-password {PW}x "
     "https://h/a.tar", [TOK, PW], "https://h/a.tar"),
    (f"pipe:env X_TOKEN={TOK} AWS_SECRET_ACCESS_KEY={KEY} aws s3 cp s3://b/a-000003.tar -", [TOK, KEY],
     "s3://b/a-000003.tar -"),
    (f"pipe:curl -d token={TOK}&n=1 -d 'password={PW}' -d key={KEY} http://h/a.tar", [TOK, PW, KEY], "&n=1"),
    (f"pipe:curl --oauth2-bearer {TOK} http://h/a.tar?sig={KEY}&v=2", [TOK, KEY], "v=2"),
    (f"pipe:curl -s --verbose --pass {PW} --key-file k.pem --api-key={KEY} http://h/a.tar", [PW, KEY], "--verbose"),
]


@pytest.mark.parametrize("command, secrets, kept", REDACTIONS)
def test_every_credential_argument_of_a_pipe_command_is_redacted(command, secrets, kept):
    for text in (command, f"tokenize: {command}", f"{command}: exit 22 (read)", json.dumps({"shards": command})):
        clean = redact(text)
        assert not [s for s in secrets if s in clean], clean
        assert "REDACTED" in clean and redact(clean) == clean
    assert kept in redact(command)
    # The shard's name (which pairs it with its token file) comes from the command as given.
    assert Location(command).name.endswith(".tar") and Location(command).name in redact(command)


@pytest.mark.parametrize("text", [
    "--tokens runs/tok: not found; give --val-tokens too",
    "tokens: 196 a view, key k0001 duplicated, token file x.parquet",
    "sort -u a.tar",  # not a pipe: command, and no user:password after -u
    "pipe:cat /data/a-000001.tar: 3 tokens: key=k0001 is a duplicate of sample-2",
    "pipe:sort -u /data/a.tar",
    "pipe:curl -sSf http://h/a.tar --retry 3 --header 'Accept: */*'",
])
def test_text_without_credentials_is_left_as_it_is(text):
    if "key=k0001" in text:  # `key=` is a credential argument inside a command: over-cautious, never leaky
        assert redact(text) == text.replace("key=k0001", "key=REDACTED")
    else:
        assert redact(text) == text


_SECRET = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/=._~-", min_size=4, max_size=40
                  ).map(lambda s: f"Zq{s}")
_TEMPLATES = ["pipe:curl -u {user}:{s} {url}", "pipe:curl --user={user}:{s} {url}",
              "pipe:curl -H 'Authorization: Bearer {s}' {url}", 'pipe:curl -H "{header}: {s}" {url}',
              "pipe:env {var}={s} curl {url}", "pipe:curl -d {field}={s} {url}", "pipe:wget --{option}={s} -O- {url}",
              "pipe:wget --{option} {s} -O- {url}", "pipe:curl {url}?{field}={s}"]


@given(secret=_SECRET, template=st.sampled_from(_TEMPLATES), user=st.sampled_from(["admin", "u", "svc-01", ""]),
       var=st.sampled_from(["X_TOKEN", "API_KEY", "HF_TOKEN", "DB_PASSWORD", "client_secret", "SAS_SIG"]),
       header=st.sampled_from(["X-Api-Key", "Proxy-Authorization", "X-Auth-Token", "Private-Token", "Cookie"]),
       field=st.sampled_from(["token", "password", "secret", "key", "access_token", "api_key"]),
       option=st.sampled_from(["password", "http-password", "api-key", "auth-token", "secret"]),
       port=st.integers(1, 65535), shard=st.integers(0, 999_999))
def test_a_secret_of_any_spelling_never_survives_redaction(secret, template, user, var, header, field, option, port,
                                                         shard):
    url = f"http://10.0.0.1:{port}/data/train-{shard:06d}.tar"
    command = template.format(s=secret, user=user, var=var, header=header, field=field, option=option, url=url)
    for text in (command, f"{command}: exit 22 (read)", f"tokenize: {command}\nnext line"):
        clean = redact(text)
        assert secret not in clean and redact(clean) == clean
    assert f"train-{shard:06d}.tar" in redact(command)


def test_stored_configs_are_redacted_in_every_nested_string():
    config = {"shards": REDACTIONS[0][0], "val": [REDACTIONS[4][0], (REDACTIONS[9][0], 3)],
              "tokens": "runs/tokens", "steps": 2}
    clean = redacted(config)
    assert not [s for s in SECRETS if s in json.dumps(clean)]
    assert clean["tokens"] == "runs/tokens" and clean["steps"] == 2 and isinstance(clean["val"][1], tuple)


# ---------------------------------------------------------------------------------------------
# Item 14: exports written with the umask, and a JSON that names its weights relative to itself.

@pytest.fixture()
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _private_write(tmp: Path) -> None:
    """A writer that creates its file 0600, as safetensors does."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"weights")
    os.close(fd)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027, 0o000])
@pytest.mark.parametrize("writer", ["text", "private"])
def test_atomic_writes_get_the_permissions_of_the_umask(tmp_path, umask, mask, writer):
    umask(mask)
    path = tmp_path / f"{writer}.bin"
    for _ in range(2):  # a new file, then one replaced
        if writer == "text":
            write_text_atomic(path, "x")
        else:
            write_atomic(path, _private_write)
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_an_export_is_0644_and_its_json_names_the_weights_beside_it(two_step_run, tmp_path, umask, monkeypatch):
    import timm
    import torch

    umask(0o022)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    result = invoke("export", two_step_run, "--out", "exports/enc.safetensors")
    assert result.exit_code == 0, result.output
    folder = invoke("export", two_step_run, "--out", "exports/dir")
    assert folder.exit_code == 0, folder.output
    files = sorted((tmp_path / "exports").rglob("*.*"))
    assert [p.relative_to(tmp_path / "exports").as_posix() for p in files] == [
        "dir/config.json", "dir/model.safetensors", "enc.json", "enc.safetensors"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
    info = json.loads((tmp_path / "exports" / "enc.json").read_text())
    assert info["checkpoint_path"] == "enc.safetensors"
    assert f"checkpoint_path='{tmp_path / 'exports' / 'enc.safetensors'}'" in result.stdout  # absolute when printed
    # The pair moves together, and the JSON still finds its weights from wherever it is read.
    moved = shutil.move(tmp_path / "exports", tmp_path / "elsewhere" / "moved")
    monkeypatch.chdir(REPO)
    json_path = Path(moved) / "enc.json"
    info = json.loads(json_path.read_text())
    weights = json_path.parent / info["checkpoint_path"]
    model = timm.create_model(info["timm_model"], checkpoint_path=str(weights), **info["timm_kwargs"])
    ckpt = torch.load(two_step_run / "checkpoint.pt", weights_only=True)
    assert torch.equal(model.patch_embed.proj.weight, ckpt["model"]["patch_embed.proj.weight"])


# ---------------------------------------------------------------------------------------------
# Item 13: decoded pixels per batch are bounded before decoding; the loader dies with its parent.

@given(costs=st.lists(st.integers(1, 500), max_size=40), size=st.integers(1, 9), budget=st.integers(1, 1200))
def test_batches_end_before_the_pixel_budget_and_keep_every_item_in_order(costs, size, budget):
    batches = list(batched(list(enumerate(costs)), size, cost=lambda item: item[1], budget=budget))
    assert [item for batch in batches for item in batch] == list(enumerate(costs))
    for batch, after in zip(batches, batches[1:] + [None]):
        total = sum(c for _, c in batch)
        assert 0 < len(batch) <= size and (total <= budget or len(batch) == 1)
        if after is not None:  # it ended because it was full, or the next item would pass the budget
            assert len(batch) == size or total + after[0][1] > budget
    assert [len(b) for b in batched(range(7), 3)] == [3, 3, 1]  # without a budget, by count


def huge_png(side: int = 13000) -> bytes:
    """A black 1-bit PNG of ``side`` x ``side``: some 20 KB that decode to 3 bytes a pixel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_a_batch_of_huge_pngs_is_split_or_refused_before_any_is_decoded(tiny_tokenizer, tmp_path, monkeypatch):
    """The reproduction: 20 KB PNGs of 13000 x 13000, under the per-image limit, 507 MB each
    decoded. Four fill more than one batch may decode: they go three and one; with a budget
    under one of them, each is rejected, naming the setting, and DALI sees none."""
    from beit_data.dali_views import DaliViews
    from beit_model.tokenizer import load_tokenizer
    from pipelines.config import TokenizeConfig
    from pipelines.tokenize_shards import TokenizeJob, _prepared_batches

    png = huge_png()
    info = probe_image(png)
    assert len(png) < 25_000 and (info.format, info.width, info.height) == ("PNG", 13000, 13000)
    members = [(f"big{i}.png", png) for i in range(4)] + [("small.jpg", jpeg_bytes((160, 120)))]
    shard = write_tar(tmp_path / "huge-000000.tar", members)
    tokenizer = load_tokenizer(str(tiny_tokenizer))

    def prepared(batch_pixels=None):
        cfg = TokenizeConfig(shards=str(shard), tokenizer=str(tiny_tokenizer), out=str(tmp_path / "t"), views=2,
                             batch_size=8, batch_pixels=batch_pixels, min_size=0, device="cpu")
        rejects = []
        batches = [[s.key for s, _ in batch] for batch, _ in _prepared_batches(Location(shard), TokenizeJob.resolve(
            cfg, tokenizer), rejects)]
        return batches, [(r.key, r.reason) for r in rejects]

    assert 3 * 13000**2 <= BATCH_PIXELS < 4 * 13000**2
    assert prepared() == ([["big0", "big1", "big2"], ["big3", "small"]], [])
    assert prepared(2 * 13000**2) == ([["big0", "big1"], ["big2", "big3"], ["small"]], [])
    reason = "13000x13000 is 169,000,000 pixels, more than one batch may decode (100,000,000); raise it with " \
             "--batch-pixels"
    assert prepared(100_000_000) == ([["small"]], [(f"big{i}", reason) for i in range(4)])

    def no_decode(*args, **kwargs):
        raise AssertionError("DALI was asked to decode an image over the budget")

    monkeypatch.setattr(DaliViews, "decode_or_reject", no_decode)
    small_only = write_tar(tmp_path / "only-000000.tar", members[:2])
    result = invoke("tokenize", "--shards", small_only, "--tokenizer", tiny_tokenizer, "--out", tmp_path / "t",
                    "--views", "2", "--batch-pixels", "100000000", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["images"] == 0 and [r["reason"] for r in summary["reject_list"]] == [reason, reason]
    with pytest.raises(ImageTooLarge, match="raise it with --max-pixels"):
        probe_image(png, max_pixels=10**8, batch_pixels=10**9)  # the decompression-bomb guard speaks first


def test_tokenize_within_a_pixel_budget_writes_the_rows_of_an_unsplit_run(tiny_tokenizer, tmp_path, monkeypatch):
    """Batches cut by pixels decode fewer images at a time and write the same rows; the one image
    over the budget is rejected with its reason."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from beit_data.dali_views import DaliViews

    sides = [(97, 61), (40, 200), (128, 128), (33, 35), (150, 90), (64, 64), (210, 140), (50, 77), (88, 99)]
    members = [(f"k{i:02d}.jpg", jpeg_bytes(size, seed=i)) for i, size in enumerate(sides)]
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "p-000000.tar", members)
    fed: list[list[int]] = []
    decode = DaliViews.decode_or_reject

    def spy(self, encoded, views):
        fed.append([probe_image(e).width * probe_image(e).height for e in encoded])
        return decode(self, encoded, views)

    monkeypatch.setattr(DaliViews, "decode_or_reject", spy)
    budget = 20_000
    args = ["--shards", tmp_path / "shards", "--tokenizer", tiny_tokenizer, "--views", "3", "--batch-size", "4",
            "--min-size", "0", "--device", "cpu", "--quiet"]
    whole = invoke("tokenize", *args, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    assert [len(f) for f in fed] == [4, 4, 1]
    fed.clear()
    split = invoke("tokenize", *args, "--out", tmp_path / "split", "--batch-pixels", budget)
    assert split.exit_code == 0, split.output
    assert [len(f) for f in fed] == [2, 2, 2, 2] and all(sum(f) <= budget for f in fed)
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert [(r["key"], r["reason"]) for r in summary["reject_list"]] == [
        ("k06", "210x140 is 29,400 pixels, more than one batch may decode (20,000); raise it with --batch-pixels")]
    want, got = (pq.read_table(tmp_path / name / "p-000000.parquet") for name in ("whole", "split"))
    assert got.equals(want.filter(pc.not_equal(want.column("key"), "k06")))



"""Shards, tokens and runs on object storage, against real servers on loopback.

The S3 server is moto in server mode behind a proxy that injects faults (``tests/object_store``);
s3fs and botocore reach it through ``AWS_ENDPOINT_URL``, as they would reach MinIO or R2.
HTTP shards come from a loopback ``http.server`` that honours Range, ``pipe:`` shards from
``cat``. Every result is compared, row for row, with the same run on the local copies.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import run_cli
from helpers.object_store import S3Server, serve_folder

from beit_common import BeitDataError, Location, cache, storage, write_text_atomic
from beit_common.files import upload
from beit_data.shard_index import read_index, scan_index
from beit_data.shards import expand_shards
from beit_data.tokens import read_meta

BUCKET = "beit-test"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Every connection these tests open goes to loopback: nothing reaches a real cloud."""
    import ipaddress
    import socket

    connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"a test connected to {address[0]}, not loopback")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="module")
def s3_server():
    server = S3Server()
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.close()


@pytest.fixture()
def s3(s3_server, monkeypatch, tmp_path):
    """The S3 server, with the AWS environment pointing at it and a fresh local cache."""
    import s3fs

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BEIT_DATA_CACHE", str(tmp_path / "cache"))
    s3fs.S3FileSystem.clear_instance_cache()
    s3_server.proxy.queue.clear()
    s3_server.proxy.denied.clear()
    s3_server.proxy.injected.clear()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


def upload_folder(server: S3Server, folder: Path, prefix: str, suffixes=(".tar", ".idx", ".parquet")) -> str:
    client = server.client()
    for path in sorted(folder.iterdir()):
        if path.suffix in suffixes:
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return f"s3://{BUCKET}/{prefix}/"


def tables(folder) -> dict[str, tuple]:
    """Each token file's rows and metadata, by name."""
    from beit_data.tokens import read_table, token_files

    return {Location(p).name: (read_table(p).replace_schema_metadata(None), read_meta(p))
            for p in token_files(folder)}


def tokenize(shards: str, out: str, tokenizer: Path, **kw) -> dict:
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    return run_tokenize(TokenizeConfig(shards=shards, tokenizer=str(tokenizer), out=out, views=4, batch_size=8,
                                       device="cpu", progress=False, **kw))


def test_tokenize_from_s3_to_s3_gives_the_local_rows_through_faults(s3, sample_shards, sample_tokens,
                                                                     tiny_tokenizer):
    shards = upload_folder(s3, sample_shards, "sample")
    # Transient faults on the way: S3's SlowDown and 500, and a dropped connection, on reads and writes.
    s3.proxy.inject("slowdown", 2, "GET")
    s3.proxy.inject("drop", 1, "GET")
    s3.proxy.inject("internal", 1, "PUT")
    s3.proxy.inject("slowdown", 1, "PUT")
    summary = tokenize(shards, f"s3://{BUCKET}/tokens", tiny_tokenizer)
    assert s3.proxy.queue == [] and sum(s3.proxy.injected.values()) == 5  # each fault was met, and retried
    assert summary.shards == 2 and summary.skipped == 0 and summary.images == 14
    remote, local = tables(f"s3://{BUCKET}/tokens"), tables(sample_tokens)
    assert remote.keys() == local.keys() == {"sample-000000.parquet", "sample-000001.parquet"}
    for name in local:
        assert remote[name][0].equals(local[name][0])  # row for row
        assert remote[name][1] == local[name][1]  # the same metadata: recipe, source, shard fingerprint
    assert json.loads(storage.read_bytes(f"s3://{BUCKET}/tokens/summary.json"))["images"] == 14
    # A re-run skips the finished files, as on disk.
    again = tokenize(shards, f"s3://{BUCKET}/tokens", tiny_tokenizer)
    assert again.skipped == 2 and again.images == 0
    with pytest.raises(BeitDataError, match="is the folder of the shards"):  # img2dataset's NNNNN.parquet live there
        tokenize(shards, shards, tiny_tokenizer)


def test_inspect_and_plan_read_a_remote_prefix_like_a_folder(s3, sample_shards, sample_tokens):
    from beit_data.summary import summarise
    from pipelines.plan import PlanConfig, run_plan

    shards, tokens = upload_folder(s3, sample_shards, "p/shards"), upload_folder(s3, sample_tokens, "p/tokens")
    remote, local = summarise(Location(tokens), shards), summarise(Location(sample_tokens), str(sample_shards))
    assert remote.pop("folder") == tokens and local.pop("folder") == str(sample_tokens)
    assert remote == local and remote["coverage"]["keys_missing_from_parquet"] == 0 and not remote["errors"]
    plan = {name: [b.as_dict() for b, _ in zip(run_plan(PlanConfig.from_flat(shards=s, tokens=t, batch_size=3,
                                                                             epochs=2)),
                                                 range(8))]
            for name, (s, t) in {"remote": (shards, tokens), "local": (str(sample_shards), str(sample_tokens))}.items()}
    assert plan["remote"] == plan["local"] and len(plan["local"]) == 8
    done = run_cli("inspect", tokens, "--shards", shards, "--json", env=dict(s3.env, BEIT_DATA_CACHE="/tmp"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images"] == 14


def test_pretrain_from_s3_to_s3_resumes_exactly_like_a_local_run(s3, sample_shards, sample_tokens, tmp_path):
    from helpers import TINY

    from pipelines.pretrain import PretrainConfig, run_pretrain

    shards, tokens = upload_folder(s3, sample_shards, "r/shards"), upload_folder(s3, sample_tokens, "r/tokens")
    run = f"s3://{BUCKET}/r/run"
    common = dict(steps=6, checkpoint_every=100, **TINY)
    straight = run_pretrain(PretrainConfig.from_flat(shards=str(sample_shards), tokens=str(sample_tokens),
                                           out=str(tmp_path / "local"), **common))
    first = run_pretrain(PretrainConfig.from_flat(shards=shards, tokens=tokens, out=run, stop_after=3, **common))
    assert first.steps == 3 and first.checkpoint == f"{run}/checkpoint.pt"
    assert storage.exists(f"{run}/checkpoint.pt") and storage.exists(f"{run}/log.jsonl")
    with pytest.raises(BeitDataError, match="`resume`"):
        run_pretrain(PretrainConfig.from_flat(shards=shards, tokens=tokens, out=run, **common))
    shutil.rmtree(tmp_path / "cache")  # a fresh node: the run folder comes back from the bucket
    s3.proxy.inject("slowdown", 2, "GET")  # on the way back: listings, token files, image ranges
    s3.proxy.inject("drop", 1, "GET")
    second = run_pretrain(PretrainConfig.from_flat(shards=shards, tokens=tokens, out=run, resume=True, **common))
    assert s3.proxy.queue == [] and sum(s3.proxy.injected.values()) == 3
    assert second.steps == straight.steps == 6
    log = [json.loads(line) for line in storage.read_bytes(f"{run}/log.jsonl").decode().splitlines()]
    local = [json.loads(line) for line in (tmp_path / "local" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log if "loss" in r] == [r["loss"] for r in local if "loss" in r]  # bitwise


def test_a_run_on_s3_keeps_and_prunes_its_checkpoints_there_and_never_downloads_them(s3, sample_shards,
                                                                                      sample_tokens, tmp_path):
    """The kept checkpoints are server-side copies of the uploaded latest, pruned on the prefix;
    a resumed run on a fresh node downloads the latest alone, and export takes a kept one."""
    from helpers import TINY, invoke

    from pipelines.checkpoint_history import kept_checkpoints
    from pipelines.pretrain import PretrainConfig, run_pretrain

    run = f"s3://{BUCKET}/kept/run"
    common = dict(shards=str(sample_shards), tokens=str(sample_tokens), out=run, steps=6, checkpoint_every=2,
                  keep_checkpoints=1, checkpoint_every_epochs=2, **TINY)  # 3 steps an epoch
    run_pretrain(PretrainConfig.from_flat(stop_after=4, **common))
    assert [k.location for k in kept_checkpoints(Location(run))] == [f"{run}/checkpoints/step-00000004.pt"]  # 2 pruned
    shutil.rmtree(tmp_path / "cache")  # a fresh node
    run_pretrain(PretrainConfig.from_flat(resume=True, **common))
    assert [k.location.name for k in kept_checkpoints(Location(run))] == ["step-00000006-epoch-0002.pt"]
    mirror = cache.cache_dir("runs", cache.cache_key(run), "rank0")
    assert not (mirror / "checkpoints").exists() and (mirror / "checkpoint.pt").is_file()
    assert storage.read_bytes(f"{run}/checkpoints/step-00000006-epoch-0002.pt") == \
        (mirror / "checkpoint.pt").read_bytes()
    done = invoke("export", run, "--step", "6", "--out", tmp_path / "enc.pth")
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "enc.json").read_text())["step"] == 6
    refused = invoke("export", run, "--step", "4", "--out", tmp_path / "four.pth")
    assert refused.exit_code == 1 and refused.stderr.strip() == (
        f"Error: {run} keeps no checkpoint of step 4: it keeps steps 6; without --step, the latest (checkpoint.pt)")


def test_a_second_run_into_a_busy_prefix_leaves_the_first_ones_folder_alone(s3, sample_shards, sample_tokens):
    from helpers import TINY

    from beit_common import folder_lock
    from pipelines.pretrain import PretrainConfig, run_pretrain

    run = f"s3://{BUCKET}/busy/run"
    mirror = cache.cache_dir("runs", cache.cache_key(run), "rank0")
    (mirror / "log.jsonl").write_text("{}\n")  # what the run that holds the prefix has written so far
    with folder_lock(run, "beit-data pretrain"), pytest.raises(BeitDataError, match="in use by another"):
        run_pretrain(PretrainConfig.from_flat(shards=str(sample_shards), tokens=str(sample_tokens), out=run, steps=2,
                                              **TINY))
    assert (mirror / "log.jsonl").read_text() == "{}\n"


def test_http_and_pipe_shards_tokenize_to_the_local_rows(sample_shards, sample_tokens, tiny_tokenizer, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("BEIT_DATA_CACHE", str(tmp_path / "cache"))
    server = serve_folder(sample_shards)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/sample-{{000000..000001}}.tar"
        assert [Location(s).name for s in expand_shards(url)] == ["sample-000000.tar", "sample-000001.tar"]
        tokenize(url, str(tmp_path / "http"), tiny_tokenizer)
        assert read_index(expand_shards(url)[1]) == read_index(Location(sample_shards / "sample-000001.tar"))
    finally:
        server.shutdown()
    pipe = f"pipe:cat {sample_shards}/sample-{{000000..000001}}.tar"
    tokenize(pipe, str(tmp_path / "pipe"), tiny_tokenizer)
    local = tables(sample_tokens)
    for name in ("http", "pipe"):
        got = tables(tmp_path / name)
        assert got.keys() == local.keys()
        for file in local:
            assert got[file][0].equals(local[file][0])
            meta, want = got[file][1], local[file][1]
            assert meta.shard["members"] == want.shard["members"]
            assert replace(meta, shard=None) == replace(want, shard=None)


def test_pipe_shards_train_reading_each_shard_from_its_start(sample_shards, sample_tokens, tmp_path):
    from helpers import TINY

    from beit_data.replay import ReplaySource, StreamConfig
    from pipelines.pretrain import PretrainConfig, run_pretrain

    pipe = f"pipe:cat {sample_shards}/sample-{{000000..000001}}.tar"
    # One partition: its pieces are whole shards, each read in its own order.
    source = ReplaySource.open(StreamConfig(shards=pipe, tokens=str(sample_tokens), batch_size=2, partitions=1))
    assert source.sequential
    keys = [k for batch in zip(source.plan(), range(7)) for k in batch[0].keys]
    order = {k: i for i, k in enumerate(pq.read_table(sample_tokens / "sample-000000.parquet").column("key")
                                        .to_pylist()[::4])}
    first = [k for k in keys if k in order][:8]
    assert [order[k] for k in first] == sorted(order[k] for k in first)  # in the shard's own order
    summary = run_pretrain(PretrainConfig.from_flat(shards=pipe, tokens=str(sample_tokens),
                                                    out=str(tmp_path / "run"), steps=3,
                                          stop_after=2, **TINY))
    resumed = run_pretrain(PretrainConfig.from_flat(shards=pipe, tokens=str(sample_tokens),
                                                    out=str(tmp_path / "run"), steps=3,
                                          resume=True, **TINY))
    assert summary.steps == 2 and resumed.steps == 3


def test_a_pipe_closed_early_is_quiet_and_a_failing_command_is_one_line(sample_shards, sample_tokens, tiny_tokenizer,
                                                                        tmp_path):
    from beit_data.replay import ReplaySource, StreamConfig

    assert (sample_shards / "sample-000000.tar").stat().st_size > 2**17  # more than a pipe's buffer: cat still writes
    pipe = f"pipe:cat {sample_shards}/sample-{{000000..000001}}.tar"
    batches = iter(ReplaySource.open(StreamConfig(shards=pipe, tokens=str(sample_tokens), batch_size=2)))
    next(batches)
    batches.close()  # the command is stopped; its exit status (a broken pipe) is no error
    with pytest.raises(BeitDataError, match="pipe:cat /no/such/dir/sample-000000.tar"):
        tokenize("pipe:cat /no/such/dir/sample-000000.tar", str(tmp_path / "t"), tiny_tokenizer)


def test_a_shard_without_index_is_scanned_once_and_cached(s3, sample_shards):
    shards = upload_folder(s3, sample_shards, "noidx", suffixes=(".tar",))
    shard = expand_shards(shards)[0]
    before = s3.proxy.requests["GET"]
    assert scan_index(shard) == scan_index(Location(sample_shards / "sample-000000.tar"))
    scanned = s3.proxy.requests["GET"] - before
    assert 0 < scanned <= 3  # large read-ahead requests, not one per header
    before = s3.proxy.requests["GET"]
    assert read_index(shard) == read_index(Location(sample_shards / "sample-000000.tar"))  # from the cache now
    assert s3.proxy.requests["GET"] - before <= 1  # at most the listing that finds no .idx, no scan
    assert len(list((cache.cache_dir("tar-index")).glob("*.idx"))) == 1


def test_index_writes_the_missing_idx_objects(s3, sample_shards):
    from pipelines.config import IndexConfig
    from pipelines.index import run_index

    shards = upload_folder(s3, sample_shards, "ix", suffixes=(".tar",))
    result = run_index(IndexConfig(shards=shards, progress=False))
    assert result["written"] == [f"{shards}sample-000000.idx", f"{shards}sample-000001.idx"]
    for name in ("sample-000000.idx", "sample-000001.idx"):
        assert storage.read_bytes(shards + name) == (sample_shards / name).read_bytes()  # DALI's format, byte for byte
    assert run_index(IndexConfig(shards=shards, progress=False)) == {"shards": 2, "written": [], "skipped": 2}


def test_a_shard_changed_or_gone_during_a_run_is_refused(s3, sample_shards, sample_tokens):
    from beit_data.replay import ReplaySource, StreamConfig

    shards, tokens = upload_folder(s3, sample_shards, "c/shards"), upload_folder(s3, sample_tokens, "c/tokens")
    source = ReplaySource.open(StreamConfig(shards=shards, tokens=tokens, batch_size=2, mix_shards=1))
    batches = iter(source)
    next(batches)
    data = (sample_shards / "sample-000001.tar").read_bytes()
    s3.client().put_object(Bucket=BUCKET, Key="c/shards/sample-000001.tar", Body=data[:-1] + b"x")  # a new ETag
    with pytest.raises(BeitDataError, match="sample-000001.tar changed during the run"):
        for _ in range(30):  # the next epoch loads each shard again, at the latest
            next(batches)
    s3.client().put_object(Bucket=BUCKET, Key="c/shards/sample-000001.tar", Body=data)
    # Replaced by a larger object inside a window: the very next read is refused (its requests are
    # pinned to the ETag), not decoded from offsets that belonged to the old object.
    batches = iter(ReplaySource.open(StreamConfig(shards=shards, tokens=tokens, batch_size=2, mix_shards=1,
                                                  partitions=1)))
    next(batches)
    for name in ("sample-000000.tar", "sample-000001.tar"):
        body = (sample_shards / name).read_bytes() + b"\0" * 10240
        s3.client().put_object(Bucket=BUCKET, Key=f"c/shards/{name}", Body=body)
    with pytest.raises(BeitDataError, match=r"sample-00000..tar changed during the run \(its ETag is no longer "):
        next(batches)
    for name in ("sample-000000.tar", "sample-000001.tar"):
        s3.client().put_object(Bucket=BUCKET, Key=f"c/shards/{name}", Body=(sample_shards / name).read_bytes())
    batches = iter(ReplaySource.open(StreamConfig(shards=shards, tokens=tokens, batch_size=2, mix_shards=1)))
    next(batches)
    s3.client().delete_object(Bucket=BUCKET, Key="c/shards/sample-000000.tar")
    with pytest.raises(BeitDataError, match="sample-000000.tar: not found"):
        for _ in range(30):
            next(batches)


def test_a_failed_upload_leaves_no_object(s3, tmp_path):
    s3.proxy.inject("denied", 1, "PUT")  # not retried: the upload fails at once
    with pytest.raises(BeitDataError, match=f"s3://{BUCKET}/atomic/a.txt"):
        write_text_atomic(f"s3://{BUCKET}/atomic/a.txt", "x" * 1000)
    assert not storage.exists(f"s3://{BUCKET}/atomic/a.txt")
    assert list((tmp_path / "cache" / "uploads").iterdir()) == []  # the local part is gone too
    # A multipart upload is completed only after its last part: a part that fails after the
    # first one went through leaves nothing under the name.
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (11 * 2**20))
    s3.proxy.inject("pass", 1, "PUT")
    s3.proxy.inject("denied", 1, "PUT")
    with pytest.raises(BeitDataError, match="big.bin"):
        upload(big, f"s3://{BUCKET}/atomic/big.bin", chunk_size=5 * 2**20)
    assert s3.proxy.queue == [] and not storage.exists(f"s3://{BUCKET}/atomic/big.bin")
    upload(big, f"s3://{BUCKET}/atomic/big.bin", chunk_size=5 * 2**20)
    assert storage.stat(f"s3://{BUCKET}/atomic/big.bin")["size"] == 11 * 2**20


@pytest.mark.parametrize("case", ["no bucket", "no credentials", "denied"])
def test_storage_errors_are_one_line_naming_the_url(s3, monkeypatch, case):
    url = f"s3://{BUCKET}/sample/"
    if case == "no bucket":
        url = "s3://no-such-bucket/sample/"
    elif case == "no credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    else:
        s3.proxy.denied.add(BUCKET)
    with pytest.raises(BeitDataError) as err:
        expand_shards(url + "*.tar")
    message = str(err.value)
    assert url in message and "\n" not in message
    assert {"no bucket": "not found", "no credentials": "no credentials", "denied": "access denied"}[case] in message


def test_the_cli_says_one_line_for_a_missing_bucket(s3):
    env = {k: v for k, v in s3.env.items()}
    done = run_cli("plan", "--shards", "s3://no-such-bucket/x/", "--tokens", "s3://no-such-bucket/t/",
                   "--batch-size", "2", env=env)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "s3://no-such-bucket/" in done.stderr


def test_every_out_writes_where_it_names_or_refuses(s3, sample_shards, sample_tokens, tmp_path, monkeypatch):
    """tokenize and pretrain --out on S3 are tested above; export and inspect write there too, and
    the commands that write local files only refuse a URL in one line, leaving nothing behind."""
    from helpers import TINY, invoke

    from pipelines.pretrain import PretrainConfig, run_pretrain

    monkeypatch.chdir(tmp_path)  # a URL taken for a path would land here, as ./s3:/...
    run_pretrain(PretrainConfig.from_flat(shards=str(sample_shards), tokens=str(sample_tokens),
                                          out=str(tmp_path / "run"),
                                steps=1, **TINY))
    encoder = f"s3://{BUCKET}/out/encoder.safetensors"
    assert invoke("export", tmp_path / "run", "--out", encoder).exit_code == 0
    assert storage.exists(encoder) and json.loads(storage.read_bytes(f"s3://{BUCKET}/out/encoder.json"))["step"] == 1
    refused = invoke("export", tmp_path / "run", "--out", encoder)
    assert refused.exit_code == 1 and "encoder.safetensors exists; pass --overwrite" in refused.stderr
    picture = f"s3://{BUCKET}/out/histogram.png"
    assert invoke("inspect", sample_tokens, "--histogram", picture).exit_code == 0
    assert storage.read_bytes(picture)[:4] == b"\x89PNG"
    dvae = invoke("train-dvae", "--shards", sample_shards, "--out", f"s3://{BUCKET}/out/dvae.pt", "--steps", "1")
    assert dvae.exit_code == 1 and dvae.stderr.strip() == (f"Error: --out s3://{BUCKET}/out/dvae.pt: the dVAE "
                                                           "checkpoint is written to a local path only; write it here "
                                                           "and copy it to object storage")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]


@pytest.mark.parametrize("name", ["../../../../escaped.txt", "a/../../escaped.txt", "/abs.txt"])
def test_no_object_name_leaves_the_mirror_folder(s3, tmp_path, name):
    from pipelines.run_folder import Mirror

    client = s3.client()
    client.put_object(Bucket=BUCKET, Key="runs/r5/checkpoint.pt", Body=b"ok")
    client.put_object(Bucket=BUCKET, Key=f"runs/r5/{name}", Body=b"hostile")
    mirror = Mirror(Location(f"s3://{BUCKET}/runs/r5"), tmp_path / "deep" / "er" / "mirror")
    try:
        with pytest.raises(BeitDataError, match=r"s3://beit-test/runs/r5: the name .* would be written outside .*"
                                                r"mirror; refused"):
            mirror.pull()
        assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # not even the good file
    finally:
        for key in [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/")["Contents"]]:
            client.delete_object(Bucket=BUCKET, Key=key)


def test_credentials_in_urls_are_never_printed_or_stored(sample_shards, sample_tokens, tmp_path):
    import torch
    from helpers import invoke

    server = serve_folder(sample_shards)
    base = f"http://alice:s3cret@127.0.0.1:{server.server_address[1]}"
    signed = "X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=d34db33f"
    try:
        missing = invoke("plan", "--shards", f"{base}/nothing-000000.tar?{signed}", "--tokens", sample_tokens)
        assert missing.exit_code == 1 and "shard not found: http://REDACTED@127.0.0.1" in missing.stderr
        run = tmp_path / "run"
        done = invoke("pretrain", "--shards", f"{base}/sample-{{000000..000001}}.tar", "--tokens", sample_tokens,
                      "--out", run, "--model", "beit_mim_tiny_patch16_224", "--steps", "1", "--batch-size", "2",
                      "--device", "cpu", "--num-threads", "1", "--quiet")
        assert done.exit_code == 0, done.output
        again = invoke("pretrain", "--shards", f"{base}/sample-{{000000..000001}}.tar", "--tokens", sample_tokens,
                       "--out", run, "--model", "beit_mim_tiny_patch16_224", "--steps", "1", "--batch-size", "2")
        assert again.exit_code == 1 and "already holds a run" in again.stderr
    finally:
        server.shutdown()
    stored = [(run / "config.json").read_text(), str(torch.load(run / "checkpoint.pt", weights_only=True)["config"])]
    for text in [missing.output, done.output, again.output, *stored]:
        assert "s3cret" not in text and "d34db33f" not in text and "AKIAEXAMPLE" not in text
    assert "http://REDACTED@127.0.0.1" in stored[0] and "http://REDACTED@127.0.0.1" in stored[1]


def test_every_http_request_is_retried(sample_shards, sample_tokens, tmp_path):
    """Every first try fails (503 or a dropped connection): listings, sizes, indexes, a tar read
    through and a batch's range reads all succeed on the next, as the HTTP client retries them."""
    from helpers.object_store import FlakyHandler

    from beit_data.replay import ReplaySource, StreamConfig
    from beit_data.shard_index import read_index
    from beit_data.shards import iter_samples

    server = serve_folder(sample_shards, FlakyHandler)
    FlakyHandler.seen.clear()
    FlakyHandler.failed.clear()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        shard = Location(f"{base}/sample-000000.tar")
        assert storage.stat(shard)["size"] == (sample_shards / "sample-000000.tar").stat().st_size
        assert read_index(shard) == read_index(Location(sample_shards / "sample-000000.tar"))
        here = Location(sample_shards / "sample-000000.tar")
        assert [s.key for s in iter_samples(shard)] == [s.key for s in iter_samples(here)]
        source = ReplaySource.open(StreamConfig(shards=f"{base}/sample-{{000000..000001}}.tar",
                                                tokens=str(sample_tokens), batch_size=4))
        local = ReplaySource.open(StreamConfig(shards=str(sample_shards), tokens=str(sample_tokens), batch_size=4))
        assert [k.tobytes() for k in next(iter(source))[6]] == [k.tobytes() for k in next(iter(local))[6]]
    finally:
        server.shutdown()
    assert len(FlakyHandler.failed) >= 10 and {m for m, _, _ in FlakyHandler.failed} == {"GET", "HEAD"}


def test_held_out_shards_render_and_probe_read_objects_and_commands(s3, sample_shards, sample_tokens, labeled_shards,
                                                                    labeled_val_tokens, tmp_path):
    import timm
    import torch
    from helpers import TINY, evaluate_untrained, invoke

    from beit_model.beit_mim import encoder_state_dict
    from pipelines.export import timm_args
    from pipelines.pretrain import PretrainConfig, run_pretrain
    from pipelines.probe import ProbeConfig, run_probe

    val = {"s3": upload_folder(s3, labeled_shards / "val", "held"),
           "pipe": f"pipe:cat {labeled_shards}/val/val-000000.tar"}
    expected = evaluate_untrained(sample_tokens, labeled_shards / "val", labeled_val_tokens, count=5)
    for kind, shards in val.items():
        run_pretrain(PretrainConfig.from_flat(shards=str(sample_shards), tokens=str(sample_tokens),
                                              out=str(tmp_path / kind),
                                    steps=1, val_shards=shards, val_tokens=str(labeled_val_tokens), val_images=5,
                                    **TINY))
        first = json.loads((tmp_path / kind / "log.jsonl").read_text().splitlines()[0])
        assert first["event"] == "val" and first["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6), kind
        key = "000000003"
        picture = tmp_path / f"{kind}.png"
        done = invoke("inspect", labeled_val_tokens, "--shards", shards, "--render", key, "--out", picture)
        assert done.exit_code == 0, done.output
        assert picture.read_bytes()[:4] == b"\x89PNG"
    torch.manual_seed(0)
    model = timm.create_model("beit_mim_tiny_patch16_224", vocab_size=64).eval()
    torch.save(encoder_state_dict(model), tmp_path / "enc.pth")
    (tmp_path / "enc.json").write_text(json.dumps({"timm_model": "beit_base_patch16_224", "timm_kwargs": {
        **timm_args({"embed_dim": 96, "depth": 4, "num_heads": 3}), "num_classes": 0}}))
    upload(tmp_path / "enc.pth", f"s3://{BUCKET}/enc/enc.pth")
    upload(tmp_path / "enc.json", f"s3://{BUCKET}/enc/enc.json")
    results = [run_probe(ProbeConfig(model=model_at, train_shards=train, val_shards=held, k=3, device="cpu",
                                     progress=False))["knn"]
               for model_at, train, held in ((str(tmp_path / "enc.pth"), str(labeled_shards / "train"),
                                              str(labeled_shards / "val")),
                                             (f"s3://{BUCKET}/enc/enc.pth", upload_folder(s3, labeled_shards / "train",
                                                                                           "train"), val["pipe"]))]
    assert results[0] == results[1]


def test_shards_from_parquet_on_s3_read_row_groups_by_range(s3, tmp_path):
    """A Parquet image dataset under an S3 prefix is read as a local one is, a row group at a time."""
    from helpers import hf_parquet

    from beit_data.shards import expand_shards, iter_samples
    from pipelines.shards import ShardsConfig, run_shards

    (tmp_path / "hf").mkdir()
    data = hf_parquet(tmp_path / "hf" / "train-00000.parquet", rows=7)
    prefix = upload_folder(s3, tmp_path / "hf", "hf")
    result = run_shards(ShardsConfig(min_size=0, sources=[prefix], out=tmp_path / "out", shuffle=False, progress=False))
    written = [s for shard in expand_shards(str(tmp_path / "out")) for s in iter_samples(shard)]
    assert result.images == 7 and [s.image for s in written] == [b for b, _ in data]
    assert [int(s.members["cls"]) for s in written] == [label for _, label in data]


def test_probe_reads_an_export_folder_on_s3_as_the_local_one(s3, tmp_path):
    """The folder ``export`` writes, under an S3 prefix: the same encoder as the local folder."""
    import timm
    import torch

    from beit_model.beit_mim import MIM_VARIANTS, encoder_state_dict
    from pipelines.export import _write_folder, input_config, timm_architecture, timm_args
    from pipelines.probe import load_encoder

    name = "beit_mim_tiny_patch16_224"
    torch.manual_seed(0)
    mim = timm.create_model(name, vocab_size=64)
    (tmp_path / "enc").mkdir()
    _write_folder(Location(tmp_path / "enc"), timm_architecture(name), timm_args(MIM_VARIANTS[name]), input_config(224),
                  encoder_state_dict(mim), name)
    for file in ("config.json", "model.safetensors"):
        upload(tmp_path / "enc" / file, f"s3://{BUCKET}/encdir/{file}")
    (here, kind), (there, remote_kind) = load_encoder(Location(tmp_path / "enc")), load_encoder(Location(f"s3://{BUCKET}/encdir"))
    assert kind == remote_kind == "encoder" and len(there.blocks) == 4
    assert all(torch.equal(a, b) for a, b in zip(here.state_dict().values(), there.state_dict().values()))
    assert torch.equal(there.patch_embed.proj.weight, mim.patch_embed.proj.weight)

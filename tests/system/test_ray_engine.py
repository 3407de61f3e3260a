"""``tokenize --engine ray`` (issue 37) on a Ray of 2 CPUs, on loopback only.

The runs in this process join one Ray head for the whole module (``ray start --head`` on
127.0.0.1, token authentication, its folder made here, the crash hook of
``pipelines.tokenize_shards`` in its environment); the tests of the private Ray a command starts
for itself run the command in a process of its own and watch its processes from outside. The
rows are compared with the plain engine's, which ``sample_tokens`` (4 views) and ``plain_v2``
(2 views) hold. One xdist group: they share the head, and the machine's cores.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO, cached, descendants, free_port, run_cli

from beit_common import Location
from beit_data.tokens import read_meta, read_table, token_files

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'beit-data[ray]')")

pytestmark = pytest.mark.xdist_group("ray")

RAY = Path(sys.executable).parent / "ray"
COMMON = ("--views", "2", "--batch-size", "8", "--device", "cpu", "--engine", "ray")


def tables(folder) -> dict[str, tuple]:
    """Each token file's rows and metadata, by name."""
    return {Location(p).name: (read_table(p).replace_schema_metadata(None), read_meta(p))
            for p in token_files(Location(folder))}


def temporaries(*folders: Path) -> list[str]:
    return sorted(p.name for folder in folders if folder.is_dir() for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.fixture(scope="module")
def plain_v2(sample_shards, tiny_tokenizer) -> Path:
    """The sample shards through the plain engine, 2 views per image."""
    from pipelines.tokenize_shards import TokenizeConfig, run_tokenize

    def build(folder: Path) -> None:
        run_tokenize(TokenizeConfig(shards=str(sample_shards), tokenizer=str(tiny_tokenizer), out=str(folder / "t"),
                                    views=2, batch_size=8, device="cpu", progress=False))

    return cached("sample_tokens_v2", build, sample_shards, tiny_tokenizer) / "t"


@dataclass
class Head:
    address: str
    token: str
    crash: Path  # the crash hook's file, as the head's workers see it
    cache: Path  # the workers' BEIT_DATA_CACHE
    folder: Path  # Ray's folder: its logs and sockets


@pytest.fixture(scope="module")
def head():
    """A Ray head for the module on 127.0.0.1 (Ray listens there only when its node address is
    loopback, which ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps it at), with token
    authentication (the token in its environment, none in a file) and a home folder of its own.
    Its folder is under the system's temporary folder, not pytest's: Ray's socket paths must stay
    under 107 bytes. Stopped by SIGTERM to ``ray start --block``, which stops what it started."""
    root = Path(tempfile.mkdtemp(prefix="ray-"))
    token, port = secrets.token_hex(16), free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "HOME": str(root / "home"), "PYTHONPATH": str(REPO), "BEIT_DATA_TEST_CRASH": str(root / "crash"),
           "BEIT_DATA_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    (root / "home").mkdir()
    with open(root / "head.log", "w") as log:
        proc = subprocess.Popen([str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                                 "--ray-client-server-port", str(free_port()), "--num-cpus", "2", "--num-gpus", "0",
                                 "--temp-dir", str(root / "r"), "--include-dashboard", "false",
                                 "--disable-usage-stats", "--block"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (root / "r" / "ray_current_cluster").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (root / "head.log").read_text()[-3000:]
            time.sleep(0.2)
        yield Head(f"127.0.0.1:{port}", token, root / "crash", root / "cache", root / "r")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def joined(head, monkeypatch, tmp_path):
    """This process as a driver of the head: its token, and a cache of its own."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    monkeypatch.setenv("BEIT_DATA_CACHE", str(tmp_path / "driver-cache"))
    head.crash.unlink(missing_ok=True)
    yield head
    head.crash.unlink(missing_ok=True)


def test_ray_grows_views_to_the_plain_engines_rows_and_skips_finished_shards(joined, sample_shards, tiny_tokenizer,
                                                                            sample_tokens, plain_v2, tmp_path):
    out = tmp_path / "tokens"
    shutil.copytree(plain_v2, out)  # 2 views a file, from the plain engine
    args = ("tokenize", "--shards", sample_shards, "--tokenizer", tiny_tokenizer, "--out", out, *COMMON,
            "--views", "4", "--ray-address", joined.address, "--workers", "2", "--quiet")
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "tokenize: ray: 2 shards done, 0 retried, 0 failed" in done.stdout
    mine, plain = tables(out), tables(sample_tokens)  # views 2 and 3 added: a fresh 4-view run's rows
    assert mine.keys() == plain.keys() == {"sample-000000.parquet", "sample-000001.parquet"}
    for name, (rows, meta) in plain.items():
        assert mine[name][0].equals(rows), name
        assert mine[name][1] == meta, name
    assert (out / "config.yaml").read_text() == (sample_tokens / "config.yaml").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["shards"], summary["skipped"], summary["images"], summary["views"]) == (2, 0, 14, 28)
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = run_cli(*args)  # every shard is done: nothing to run, and no Ray to start
    assert again.returncode == 0, again.stderr
    assert "skipped 2" in again.stdout and "tokenize: ray: 0 shards done, 0 retried, 0 failed" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == written
    assert json.loads((out / "summary.json").read_text()) == summary


def test_a_dead_workers_shard_is_redone_and_one_that_kills_every_worker_fails_alone(joined, sample_shards,
                                                                                   tiny_tokenizer, plain_v2,
                                                                                   tmp_path, monkeypatch):
    """Shard 0 kills its first worker (os._exit in the middle of the shard, from the crash hook):
    it is started again and written. Shard 1 kills every worker: after --max-retries 1 it is named
    as failed and the command exits 1; the rerun, with the cause gone, finishes it, and the folder
    is a clean run's. The shards are read over HTTP with a password in their URL, which appears in
    no output, no file the run or Ray writes, and nothing Ray records of the job or its actors."""
    from helpers.object_store import serve_folder

    from beit_common import redact

    server = serve_folder(sample_shards)
    shards = f"http://alice:s3cret@127.0.0.1:{server.server_address[1]}/sample-{{000000..000001}}.tar"
    out = tmp_path / "tokens"
    out.mkdir()
    gone = int(subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout)
    host = socket.gethostname()
    stale = [out / f".sample-000001.parquet.tmp-{host}-{gone}",  # a killed writer's, as the plan finds it
             joined.cache / "uploads" / f".x.parquet.tmp-{host}-{gone}-abc123.part"]  # one only a worker sweeps
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    joined.crash.write_text("sample-000000.tar once\nsample-000001.tar always\n")
    args = ("tokenize", "--shards", shards, "--tokenizer", tiny_tokenizer, "--out", out, *COMMON,
            "--ray-address", joined.address, "--workers", "2", "--max-retries", "1", "--quiet")
    monkeypatch.setattr(sys, "argv", ["beit-data", *map(str, args)])  # the command line Ray would record
    try:
        first = run_cli(*args)
        assert first.returncode == 1, first.stderr
        assert "failed sample-000001.tar: its worker died 2 times (" in first.stderr
        assert "tokenize: ray: 1 shards done, 2 retried, 1 failed" in first.stdout
        assert "Error: 1 shard failed (a worker died on each start); run the same command again to finish" in \
            first.stderr.splitlines()
        assert sorted(p.name for p in out.glob("*.parquet")) == ["sample-000000.parquet"]
        assert not (out / "summary.json").exists()  # written by the run that finishes
        assert not any(path.exists() for path in stale) and temporaries(out, joined.cache / "uploads") == []
        assert joined.crash.read_text() == "sample-000001.tar always\n"  # the once line fired
        joined.crash.unlink()
        second = run_cli(*args)
        assert second.returncode == 0, second.stderr
        assert "tokenize: ray: 1 shards done, 0 retried, 0 failed" in second.stdout
        recorded = _recorded(joined.address)
    finally:
        server.shutdown()
    mine, plain = tables(out), tables(plain_v2)
    assert mine.keys() == plain.keys()
    for name, (rows, meta) in plain.items():
        assert mine[name][0].equals(rows) and mine[name][1] == meta, name
    assert temporaries(out, joined.cache / "uploads") == []
    # What Ray keeps: the job's entrypoint is the command line, redacted; no credential anywhere.
    assert redact(shlex.join(sys.argv)) in recorded["entrypoints"]
    texts = [first.stdout, first.stderr, second.stdout, second.stderr, (out / "summary.json").read_text(),
             (out / "config.yaml").read_text(), *recorded["entrypoints"]]
    assert all("s3cret" not in text for text in texts)
    assert all(b"s3cret" not in raw for raw in recorded["raw"])
    assert [p for p in joined.folder.rglob("*") if p.is_file() and b"s3cret" in p.read_bytes()] == []


def _recorded(address: str) -> dict:
    """What the cluster's GCS holds of its jobs and actors: each job's entrypoint, and the raw
    records of both tables (the jobs' config and runtime env, the actors' creation)."""
    from ray._private import state

    from pipelines.ray_engine import ray_cluster

    with ray_cluster(address):
        accessor = state.state._connect_and_get_accessor()
        raw = [*accessor.get_job_table(skip_submission_job_info_field=False, skip_is_running_tasks_field=True),
               *accessor.get_actor_table(None, None)]
        return {"entrypoints": [job["Entrypoint"] for job in state.jobs()], "raw": raw}


# ---- the private Ray a command starts for itself ----


def listening(pids: set[int]) -> set[tuple[str, int]]:
    """The (address, port) each of ``pids`` listens on over TCP, from /proc."""
    sockets = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                sockets[fields[9]] = (_ip(address), int(port, 16))
    found = set()
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue  # gone meanwhile
        found |= {sockets[link[8:-1]] for link in links if link.startswith("socket:[") and link[8:-1] in sockets}
    return found


def _ip(hex_address: str) -> str:
    """An address of /proc/net/tcp{,6}: little-endian 32-bit words."""
    import ipaddress

    data = bytes.fromhex(hex_address)
    packed = b"".join(data[i:i + 4][::-1] for i in range(0, len(data), 4))
    return str(ipaddress.ip_address(packed))


def _loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or getattr(ip, "ipv4_mapped", None) is not None and ip.ipv4_mapped.is_loopback


@dataclass
class Watched:
    proc: subprocess.Popen
    home: Path
    temp: Path
    seen: set  # every process below the command, while it ran
    addresses: set  # what they listened on


def start_watched(args: list, tmp_path: Path, **env: str) -> Watched:
    """``beit-data ARGS`` in a process of its own, with a home and a temporary folder of its own
    (short: Ray's sockets go under it), the workers' output in its log."""
    home, temp = tmp_path / "home", Path(tempfile.mkdtemp(prefix="t-"))
    home.mkdir()
    full = {**os.environ, "HOME": str(home), "TMPDIR": str(temp), "PYTHONPATH": str(REPO), **env}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        full.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return Watched(proc, home, temp, set(), set())


def watch(run: Watched, until=lambda run: False, timeout: float = 300) -> None:
    """Follow the command's processes and what they listen on until it ends or ``until(run)``."""
    deadline = time.monotonic() + timeout
    while run.proc.poll() is None and not until(run):
        assert time.monotonic() < deadline, "the command did not end"
        below = descendants(run.proc.pid)
        run.seen |= below
        run.addresses |= listening(below | {run.proc.pid})
        time.sleep(0.1)


def assert_nothing_left(run: Watched) -> None:
    """No process it started is alive, nothing is in its home folder, and nothing of Ray's is in
    its temporary folder (wandb, which timm imports, leaves two empty folders there in any process)."""
    deadline = time.monotonic() + 30
    while (alive := [pid for pid in run.seen if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive == []
    assert sorted(run.home.rglob("*")) == []
    assert [p for p in run.temp.rglob("*") if "ray" in p.name or p.name.startswith("session_")] == []
    shutil.rmtree(run.temp)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_private_ray_tokenizes_s3_on_loopback_only_and_leaves_nothing(sample_shards, sample_tokens,
                                                                        tiny_tokenizer, tmp_path, monkeypatch):
    """Shards and --out on S3 (the loopback S3 server): the rows of the plain engine on local files.
    Every process of the private Ray listens on 127.0.0.1 only, and when the command ends none is
    left, nor its folder, nor any file in the home folder. The workers find the S3 credentials in
    their own environment, which they have from the command's."""
    import s3fs
    from helpers.object_store import S3Server

    server = S3Server()
    for name, value in server.env.items():  # for reading the results here
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BEIT_DATA_CACHE", str(tmp_path / "reader-cache"))
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        client = server.client()
        client.create_bucket(Bucket="ray")
        for path in sorted(sample_shards.iterdir()):
            if path.suffix in (".tar", ".idx"):
                client.put_object(Bucket="ray", Key=f"shards/{path.name}", Body=path.read_bytes())
        run = start_watched(["tokenize", "--shards", "s3://ray/shards/", "--tokenizer", tiny_tokenizer,
                             "--out", "s3://ray/tokens", *COMMON, "--views", "4", "--quiet"], tmp_path,
                            BEIT_DATA_CACHE=str(tmp_path / "cache"), **server.env)
        watch(run)
        stdout, stderr = run.proc.communicate()
        assert run.proc.returncode == 0, stderr[-3000:]
        assert "tokenize: ray: 2 shards done, 0 retried, 0 failed" in stdout
        mine, plain = tables("s3://ray/tokens"), tables(sample_tokens)
    finally:
        server.close()
    assert mine.keys() == plain.keys()
    for name, (rows, meta) in plain.items():
        assert mine[name][0].equals(rows) and mine[name][1] == meta, name
    assert run.addresses and all(_loopback(address) for address, _ in run.addresses), run.addresses
    assert_nothing_left(run)


def test_sigterm_stops_the_private_ray_and_its_workers(sample_shards, tiny_tokenizer, tmp_path):
    """SIGTERM once a worker runs (every start of shard 0 kills its worker, so the run cannot end
    first): the command exits 143 and leaves no process, folder or file behind."""
    crash = tmp_path / "crash"
    crash.write_text("sample-000000.tar always\n")
    run = start_watched(["tokenize", "--shards", sample_shards, "--tokenizer", tiny_tokenizer, "--out",
                         tmp_path / "tokens", *COMMON, "--workers", "1", "--max-retries", "1000", "--quiet"],
                        tmp_path, BEIT_DATA_TEST_CRASH=str(crash), BEIT_DATA_CACHE=str(tmp_path / "cache"))

    def a_worker_runs(run: Watched) -> bool:
        return any(b"_Worker" in _cmdline(pid) for pid in run.seen)

    watch(run, until=a_worker_runs)
    assert run.proc.poll() is None, run.proc.communicate()[1][-3000:]
    run.proc.send_signal(signal.SIGTERM)
    _, stderr = run.proc.communicate(timeout=120)
    assert run.proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    assert run.addresses and all(_loopback(address) for address, _ in run.addresses), run.addresses
    assert temporaries(tmp_path / "tokens") == [] and not list((tmp_path / "tokens").glob("*.parquet"))
    assert_nothing_left(run)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""

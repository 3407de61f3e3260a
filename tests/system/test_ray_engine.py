"""``tokenize --engine ray`` (issue 37) on a Ray of 2 CPUs, on loopback only.

The runs in this process join one Ray head for the module (``ray start --head`` on 127.0.0.1,
token authentication, its folder made here, the crash hook of ``pipelines.tokenize_shards`` in
its environment): worker deaths, retries, a shard given up on, a rerun that grows the views, and
what Ray keeps. The private Ray a command starts for itself is tested with the command in a
process of its own, watched from outside: S3 in and out, loopback only, nothing left, SIGTERM.
Last, the Slurm script of examples/ray as a job runs it. The rows are compared with the plain
engine's (``sample_tokens``: 4 views; ``plain_v2``: 2). One xdist group: they share the head,
and the machine's cores.
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
import torch
import yaml
from helpers import REPO, cached_tokens, descendants, free_port, run_cli

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
    return cached_tokens("sample_tokens_v2", sample_shards, tiny_tokenizer, views=2)


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


def test_worker_deaths_cost_a_shard_a_start_and_a_rerun_finishes_with_more_views(joined, sample_shards, sample_tokens,
                                                                               tiny_tokenizer, plain_v2, tmp_path,
                                                                               monkeypatch):
    """Shard 0 kills its first worker (os._exit in the middle of the shard, from the crash hook):
    a new worker starts it again and writes it, as the plain engine does. Shard 1 kills every
    worker: after --max-retries 1 it is named as failed and the command exits 1. The rerun, with
    the cause gone and --views 4, adds views 2 and 3 to shard 0 and writes shard 1: the folder is a
    fresh 4-view plain run's, and the run after it has nothing to do (and starts no Ray). No
    temporary file is left on the node, also those a killed writer left before (one of them only a
    worker can see). The shards are read over HTTP with a password in their URL, which appears in
    no output, no file the runs or Ray write, and nothing Ray keeps of its jobs and actors."""
    from helpers.object_store import serve_folder

    from beit_common import redact

    server = serve_folder(sample_shards)
    shards = f"http://alice:s3cret@127.0.0.1:{server.server_address[1]}/sample-{{000000..000001}}.tar"
    out = tmp_path / "tokens"
    out.mkdir()
    gone = int(subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout)
    host = socket.gethostname()
    stale = [out / f".sample-000001.parquet.tmp-{host}-{gone}",  # a killed writer's, as the plan finds it
             joined.cache / "uploads" / f".x.parquet.tmp-{host}-{gone}-abc123.part"]  # only the workers' cache
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    joined.crash.write_text("sample-000000.tar once\nsample-000001.tar always\n")
    args = ["tokenize", "--shards", shards, "--tokenizer", tiny_tokenizer, "--out", out, *COMMON,
            "--ray-address", joined.address, "--workers", "2", "--max-retries", "1", "--quiet"]
    monkeypatch.setattr(sys, "argv", ["beit-data", *map(str, args)])  # the command line Ray would record
    try:
        first = run_cli(*args)
        assert first.returncode == 1, first.stderr
        assert "failed sample-000001.tar: its worker died 2 times (" in first.stderr
        assert "tokenize: ray: 1 shards done, 2 retried, 1 failed" in first.stdout
        assert "Error: 1 shard failed (a worker died on each start); run the same command again to finish" in \
            first.stderr.splitlines()
        assert tables(out) == {"sample-000000.parquet": tables(plain_v2)["sample-000000.parquet"]}
        assert not (out / "summary.json").exists()  # written by the run that finishes
        assert not any(path.exists() for path in stale) and temporaries(out, joined.cache / "uploads") == []
        assert joined.crash.read_text() == "sample-000001.tar always\n"  # the once line fired
        joined.crash.unlink()
        second = run_cli(*args, "--views", "4")
        assert second.returncode == 0, second.stderr
        assert "tokenize: ray: 2 shards done, 0 retried, 0 failed" in second.stdout
        recorded = _recorded(joined.address)
        written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
        third = run_cli(*args, "--views", "4")
    finally:
        server.shutdown()
    mine, plain = tables(out), tables(sample_tokens)
    assert mine.keys() == plain.keys() == {"sample-000000.parquet", "sample-000001.parquet"}
    for name, (rows, meta) in plain.items():
        assert mine[name][0].equals(rows) and mine[name][1] == meta, name
    assert json.loads((out / "summary.json").read_text())["images"] == 14
    settings, plain_settings = (yaml.safe_load((folder / "config.yaml").read_text()) for folder in (out, sample_tokens))
    assert settings == {**plain_settings, "shards": redact(shards)}  # the engine and its workers are not settings
    assert third.returncode == 0 and "skipped 2" in third.stdout and "ray: 0 shards done" in third.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == written
    assert temporaries(out, joined.cache / "uploads") == []
    # What Ray keeps: the job's entrypoint is the command line, redacted; no credential anywhere.
    assert redact(shlex.join(sys.argv)) in recorded["entrypoints"]
    texts = [run.stdout + run.stderr for run in (first, second, third)]
    texts += [(out / "summary.json").read_text(), (out / "config.yaml").read_text(), *recorded["entrypoints"]]
    assert all("s3cret" not in text for text in texts)
    assert all(b"s3cret" not in raw for raw in recorded["raw"])
    assert [p for p in joined.folder.rglob("*") if p.is_file() and b"s3cret" in p.read_bytes()] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_worker_that_cannot_start_is_one_line_and_no_retry(joined, sample_shards, tiny_tokenizer, tmp_path):
    """--device cuda where there is none: the workers' start fails with the user's error, once, and
    the command says so in one line; no shard is written."""
    done = run_cli("tokenize", "--shards", sample_shards, "--tokenizer", tiny_tokenizer, "--out", tmp_path / "t",
                   *COMMON, "--device", "cuda", "--ray-address", joined.address, "--quiet")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == \
        "Error: a Ray worker could not start: --device is cuda, but CUDA is not available"
    assert not list((tmp_path / "t").glob("*.parquet"))


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


@pytest.fixture
def short_temp():
    """A temporary folder with a short path (Ray's socket paths under it must stay under 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="t-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def launch(tmp_path, short_temp):
    """Start ``beit-data ARGS`` in a process of its own, with a home and a (short) temporary folder of
    its own; whatever a failed test left of it is killed at the end."""
    started: list[Watched] = []

    def start(args: list, **env: str) -> Watched:
        home = tmp_path / "home"
        home.mkdir()
        full = {**os.environ, "HOME": str(home), "TMPDIR": str(short_temp), "PYTHONPATH": str(REPO), **env}
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
            full.pop(name, None)
        proc = subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO, env=full, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(Watched(proc, home, short_temp, set(), set()))
        return started[-1]

    yield start
    for run in started:
        for pid in [run.proc.pid, *run.seen] if run.proc.poll() is None else run.seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


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


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_private_ray_tokenizes_s3_on_loopback_only_and_leaves_nothing(sample_shards, sample_tokens,
                                                                        tiny_tokenizer, tmp_path, launch,
                                                                        monkeypatch):
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
        run = launch(["tokenize", "--shards", "s3://ray/shards/", "--tokenizer", tiny_tokenizer, "--out",
                      "s3://ray/tokens", *COMMON, "--views", "4", "--quiet"], BEIT_DATA_CACHE=str(tmp_path / "cache"),
                     **server.env)
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


def test_sigterm_stops_the_private_ray_and_its_workers(sample_shards, tiny_tokenizer, tmp_path, launch):
    """SIGTERM once a worker runs (every start of shard 0 kills its worker, so the run cannot end
    first): the command exits 143 and leaves no process, folder or file behind."""
    crash = tmp_path / "crash"
    crash.write_text("sample-000000.tar always\n")
    run = launch(["tokenize", "--shards", sample_shards, "--tokenizer", tiny_tokenizer, "--out", tmp_path / "tokens",
                  *COMMON, "--workers", "1", "--max-retries", "1000", "--quiet"], BEIT_DATA_TEST_CRASH=str(crash),
                 BEIT_DATA_CACHE=str(tmp_path / "cache"))

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


# ---- examples/ray/tokenize.sbatch ----


def test_the_slurm_script_makes_a_ray_of_the_jobs_nodes_and_tokenizes_on_it(sample_shards, tiny_tokenizer, plain_v2,
                                                                              tmp_path, short_temp):
    """The batch script as a one-node job runs it, with the stand-in srun and scontrol of
    tests/fake_slurm: a head on the node (on loopback, HEAD_IP), the command joined to it, and the
    head stopped with the job. Its rows are the plain engine's."""
    fake = REPO / "tests" / "fake_slurm"
    ray_tmp = short_temp
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS",
                                                             "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env.update(PATH=f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(REPO),
               HOME=str(tmp_path / "home"), SLURM_JOB_ID="4242", SLURM_NTASKS="1", SLURM_NNODES="1",
               SLURM_CPUS_PER_TASK="2", SLURM_JOB_NODELIST="localhost", HEAD_IP="127.0.0.1",
               RAY_PORT=str(free_port()), RAY_TMPDIR=str(ray_tmp),
               # This machine is the whole cluster: Ray keeps 127.0.0.1 rather than take its outward address.
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", BEIT_DATA_CACHE=str(tmp_path / "cache"),
               SHARDS=str(sample_shards), TOKENIZER=str(tiny_tokenizer), TOKENS=str(tmp_path / "tokens"), VIEWS="2",
               EXTRA_ARGS="--batch-size 8 --device cpu --quiet")
    (tmp_path / "home").mkdir()
    job = subprocess.Popen(["bash", str(REPO / "examples" / "ray" / "tokenize.sbatch")], cwd=tmp_path, env=env,
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    marker = f"RAY_TMPDIR={ray_tmp}".encode()  # in the environment of every process the job started
    try:
        stdout, stderr = job.communicate(timeout=400)
        deadline = time.monotonic() + 30
        while (left := _with_environment(marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for pid in _with_environment(marker):  # nothing, when the job ends as it should
            os.kill(pid, signal.SIGKILL)
    assert job.returncode == 0, stderr[-3000:]
    assert "tokenize: ray: 2 shards done, 0 retried, 0 failed" in stdout
    mine, plain = tables(tmp_path / "tokens"), tables(plain_v2)
    assert mine.keys() == plain.keys()
    for name, (rows, meta) in plain.items():
        assert mine[name][0].equals(rows) and mine[name][1] == meta, name
    assert left == []  # the job's Ray ended with it
    assert sorted((tmp_path / "home").rglob("*")) == []


def _with_environment(marker: bytes) -> list[int]:
    """The live processes whose environment holds ``marker`` (``NAME=VALUE``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found

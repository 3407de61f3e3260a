"""``tokenize --engine ray``'s settings, refused where they cannot work before any Ray starts
(issue 37): a Ray setting without the Ray engine, the engine without Ray installed, a local
``--out`` for a cluster of other machines; and the KubeRay manifest of ``examples/ray``, whose
entrypoint the command line takes. What needs a running Ray is in tests/system/test_ray_engine.py."""

from __future__ import annotations

import shlex
import sys

import pytest
import yaml
from helpers import REPO, invoke

import cli
from beit_common import BeitDataError, Location, redact
from beit_common.files import shared_file_system
from pipelines.config import TokenizeConfig
from pipelines.ray_engine import INSTALL, check_out


def tokenize(tmp_path, *extra: str):
    return invoke("tokenize", "--shards", tmp_path / "none-{000..001}.tar", "--tokenizer", tmp_path / "t.pt",
                  "--out", tmp_path / "tokens", *extra)


def one_error(result) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize("flag, value", [("--workers", "2"), ("--ray-address", "auto"), ("--gpus-per-worker", "1")])
def test_a_ray_setting_without_the_ray_engine_is_refused(tmp_path, flag, value):
    said = one_error(tokenize(tmp_path, flag, value))
    assert said == f"Error: {flag} is a setting of the Ray engine; add --engine ray"


def test_the_ray_engine_without_ray_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    said = one_error(tokenize(tmp_path, "--engine", "ray"))
    assert said == f"Error: --engine ray needs Ray, which is not installed: {INSTALL}"
    assert INSTALL == "pip install 'beit-data[ray]'" and not (tmp_path / "tokens").exists()


@pytest.mark.parametrize("address", ["auto", "10.1.2.3:6379", "head-node:6379", "ray://10.1.2.3:10001"])
def test_a_local_out_is_refused_when_joining_a_cluster_of_other_machines(tmp_path, address):
    said = one_error(tokenize(tmp_path, "--engine", "ray", "--ray-address", address))
    assert said == (f"Error: --out {tmp_path / 'tokens'} is on this machine's own disk, which other nodes of the "
                    f"cluster at --ray-address {address} cannot write to: give an s3:// or gs:// prefix, or a folder "
                    "on a file system every node mounts (NFS, Lustre, GPFS...)")
    assert not (tmp_path / "tokens").exists()


def test_a_local_out_is_taken_on_loopback_on_object_storage_and_on_a_shared_file_system(tmp_path):
    local = Location(tmp_path / "tokens")
    for address in (None, "127.0.0.1:6379", "localhost:6379", "[::1]:6379", "ray://127.0.0.1:10001"):
        check_out(local, address)  # this machine alone: its disk is every node's
    check_out(Location("s3://bucket/tokens"), "10.1.2.3:6379")
    with pytest.raises(BeitDataError, match="own disk"):
        check_out(local, "10.1.2.3:6379")
    mounts = "/dev/sda1 / ext4 rw 0 0\nsrv:/export /shared nfs4 rw 0 0\ntmpfs /shared/scratch tmpfs rw 0 0\n" \
             "fs@o2ib:/lus /lus\\040two lustre rw 0 0\n"
    assert shared_file_system("/shared/run/tokens", mounts) == "nfs4"  # need not exist yet
    assert shared_file_system("/shared/scratch/tokens", mounts) is None  # the deepest mount decides
    assert shared_file_system("/lus two/x", mounts) == "lustre"  # a space in a mount point is \040
    assert shared_file_system("/sharedx/tokens", mounts) is None and shared_file_system("/home/x", mounts) is None


def test_engine_settings_are_checked_and_recorded_nowhere():
    with pytest.raises(BeitDataError, match="`engine` must be one of plain, ray, got 'spark'"):
        TokenizeConfig(shards="s", tokenizer="t", out="o", engine="spark")
    with pytest.raises(BeitDataError, match="`workers` must be at least 1"):
        TokenizeConfig(shards="s", tokenizer="t", out="o", engine="ray", workers=0)
    from dataclasses import asdict

    from pipelines.config import settings_yaml

    ray = TokenizeConfig(shards="s", tokenizer="t", out="o", engine="ray", ray_address="auto", workers=3,
                         gpus_per_worker=0.5, cpus_per_worker=4, max_retries=1)
    plain = TokenizeConfig(shards="s", tokenizer="t", out="o")
    assert settings_yaml(asdict(ray)) == settings_yaml(asdict(plain))  # how it ran changes no row


def test_the_rayjob_manifest_runs_a_command_the_cli_takes():
    manifest = yaml.safe_load((REPO / "examples" / "ray" / "tokenize-rayjob.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    entrypoint = manifest["spec"]["entrypoint"]
    assert redact(entrypoint) == entrypoint  # Ray keeps it: no credential in it
    args = shlex.split(entrypoint)
    assert args[:2] == ["beit-data", "tokenize"]
    with cli.tokenize.make_context("tokenize", args[2:]) as ctx:  # parsed as the command line would, not run
        cfg = cli.config_of(TokenizeConfig, ctx.params)
    assert (cfg.engine, cfg.ray_address, cfg.workers) == ("ray", "auto", 16)
    assert cfg.out == "s3://my-bucket/tokens/" and cfg.shards.startswith("s3://")
    check_out(cfg.out, cfg.ray_address)  # what a cluster of several pods can write
    spec = manifest["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for pod in pods:  # every pod has the credentials in its environment, from a secret
        for container in pod["template"]["spec"]["containers"]:
            assert {"secretRef": {"name": "beit-data-s3"}} in container["envFrom"]
    assert spec["rayVersion"].startswith("2.60.")


def test_only_the_ray_engine_imports_ray_and_only_when_it_runs():
    """Ray is an extra: the plain engine, the command line and every other module run without it."""
    import ast

    from benchmarks.layers import modules

    found = {}
    for name, path in modules(REPO, ("cli", "pipelines", "beit_data", "beit_model", "beit_common")).items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "ray" or n.startswith("ray.") for n in names):
                found.setdefault(name, []).append("module level" if id(node) in top else "in a function")
    assert set(found) == {"pipelines.ray_engine"} and "module level" not in found["pipelines.ray_engine"]

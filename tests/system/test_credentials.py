"""No credential inside a ``pipe:`` command is printed or stored (issue 33, item 6): tokenize,
pretrain and plan read shards from an HTTP server that answers only requests carrying one.

A system test because it runs a server; the redaction itself is tested in tests/cli/test_integrity_io.py.
"""

from __future__ import annotations

import base64
import json

import pytest
from helpers import invoke
from helpers.object_store import RangeHandler, serve_folder

PW, TOK, KEY = "hunter2-Pw9", "eyJhbGci.T0k3n-xyz", "Ak-42key-Q7"
SECRETS = (PW, TOK, KEY, base64.b64encode(f"admin:{PW}".encode()).decode())


class AuthHandler(RangeHandler):
    """Serves the shards only to a request that proves it knows a secret: HTTP basic auth as
    admin, a bearer token, or an API-key header; anything else is a 401."""

    def _allowed(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth in (f"Basic {SECRETS[3]}", f"Bearer {TOK}") or self.headers.get("X-Api-Key") == KEY

    def do_GET(self):
        if self._allowed():
            return super().do_GET()
        self.send_error(401, "Unauthorized")

    def do_HEAD(self):
        if self._allowed():
            return super().do_HEAD()
        self.send_error(401, "Unauthorized")



@pytest.fixture(scope="module")
def secret_runs(sample_shards, tiny_tokenizer, tmp_path_factory):
    """tokenize, pretrain (with held-out shards) and plan, through the CLI, from shards that an
    HTTP server hands out only to commands that carry a credential; and one command whose
    credential is wrong. Returns the folders the runs wrote into and the results."""
    root = tmp_path_factory.mktemp("secrets")
    server = serve_folder(sample_shards, AuthHandler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    shards = f"{base}/sample-{{000000..000001}}.tar"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BEIT_DATA_CACHE", str(root / "cache"))
        mp.chdir(root)
        try:
            results = {
                "tokenize": invoke("tokenize", "--shards", f"pipe:curl -sSf -u admin:{PW} {shards}", "--tokenizer",
                                   tiny_tokenizer, "--out", root / "tokens", "--views", "2", "--device", "cpu",
                                   "--quiet"),
                "wrong": invoke("tokenize", "--shards", f"pipe:curl -sSf -u admin:{PW}x {shards}", "--tokenizer",
                                tiny_tokenizer, "--out", root / "wrong", "--views", "2", "--device", "cpu", "--quiet"),
            }
            bearer = f"pipe:curl -sSf -H 'Authorization: Bearer {TOK}' {base}/sample-000000.tar"
            # A secret handed over in the environment, as a wrapper script would.
            val = f"pipe:env API_KEY={KEY} sh -c 'curl -sSf -H \"X-Api-Key: $API_KEY\" \"$0\"' {base}/sample-000001.tar"
            results["pretrain"] = invoke(
                "pretrain", "--shards", bearer, "--tokens", root / "tokens", "--out", root / "run", "--val-shards",
                val, "--val-tokens", root / "tokens", "--val-images", "4", "--model", "beit_mim_tiny_patch16_224",
                "--batch-size", "4", "--steps", "2", "--warmup-steps", "1", "--device", "cpu", "--num-threads", "1",
                "--quiet")
            results["plan"] = invoke("plan", "--shards", bearer, "--tokens", root / "tokens", "--batch-size", "4",
                                     "--steps", "2")
        finally:
            server.shutdown()
    return root, results


def test_no_credential_of_a_pipe_command_is_printed_or_written_anywhere(secret_runs):
    root, results = secret_runs
    for name in ("tokenize", "pretrain", "plan"):
        assert results[name].exit_code == 0, (name, results[name].output)
    # The credentials did their work: the shards were read, and a wrong one is refused.
    assert json.loads((root / "tokens" / "summary.json").read_text())["images"] == 14
    assert (root / "run" / "checkpoint.pt").is_file()
    wrong = results["wrong"]
    assert wrong.exit_code == 1 and len(wrong.stderr.strip().splitlines()) == 1
    assert "pipe:curl -sSf -u REDACTED http://127.0.0.1:" in wrong.stderr and "exit 22" in wrong.stderr
    written = [p for p in root.rglob("*") if p.is_file()]
    assert {"config.json", "log.jsonl", "checkpoint.pt", "summary.json", "sample-000000.parquet"} <= {
        p.name for p in written}
    for path in written:
        data = path.read_bytes()
        leaked = [s for s in SECRETS + (f"{PW}x",) if s.encode() in data]
        assert not leaked, f"{path} holds {leaked}"
    for name, result in results.items():
        leaked = [s for s in SECRETS + (f"{PW}x",) if s in result.stdout + result.stderr]
        assert not leaked, f"{name} printed {leaked}"
    config = json.loads((root / "run" / "config.json").read_text())
    assert config["shards"] == f"pipe:curl -sSf -H 'Authorization: REDACTED' {config['shards'].split()[-1]}"
    assert config["val_shards"].startswith("pipe:env API_KEY=REDACTED sh -c")

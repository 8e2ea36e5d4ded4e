"""Joining a cluster started the usual way: `ray start --head --port=P`, a real subprocess.

Each cluster runs with its own HOME (so its `~/.ray/auth_token` is the test's, as on a head
node), temp dir and ports, in a process group of its own that the fixture kills afterwards
(never `ray stop`, which would stop other clusters on this machine). Ray 2.60 turns token
authentication on for `ray start` when a token exists; the joining side must send it, or
must not when the cluster has authentication off (`pipeline/ray_setup.py`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.shard_fixtures import make_shards

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")
HOSTILE_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

JOIN = r"""
import json, os, sys, time, ray
from pipeline.ray_setup import RayJoinError, ensure_ray
t = time.monotonic()
try:
    ensure_ray(sys.argv[1])
except RayJoinError as e:
    print("RESULT " + json.dumps({"error": str(e), "seconds": time.monotonic() - t}))
    sys.exit(0)
print("RESULT " + json.dumps({"mode": os.environ.get("RAY_AUTH_MODE"),
                              "gcs": ray.get_runtime_context().gcs_address,
                              "nodes": len(ray.nodes())}))
"""

STREAM = r"""
import json, os, sys, ray
from pipeline.stream import ShardStream
with ShardStream(sys.argv[1], "train", batch_size=4, size=16, num_actors=2,
                 address=sys.argv[2]) as stream:
    keys = [k for batch in stream for k in batch.keys]
    nodes = stream.actor_nodes()
print("RESULT " + json.dumps({"keys": keys, "mode": os.environ.get("RAY_AUTH_MODE"),
                              "gcs": ray.get_runtime_context().gcs_address,
                              "actor_nodes": nodes,
                              "cluster_nodes": [n["NodeID"] for n in ray.nodes()]}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayStartCluster:
    """`ray start --head --block` in its own process group, HOME, temp dir and ports."""

    def __init__(self, work: Path, auth: bool):
        self.home = work / "home"
        self.home.mkdir(parents=True)
        self.port = free_port()
        # a short temp dir: Ray's unix socket paths must stay under 108 characters
        self.temp = Path(tempfile.mkdtemp(prefix="tench-ray-", dir="/tmp"))
        self.env = {k: v for k, v in os.environ.items() if k not in HOSTILE_ENV}
        self.env.update(HOME=str(self.home), PYTHONPATH=str(ROOT))
        if auth:  # the usual case: any earlier `ray.init` on the head left this file
            self.token = secrets.token_hex(32)
            (self.home / ".ray").mkdir()
            (self.home / ".ray" / "auth_token").write_text(self.token)
        else:
            self.env["RAY_AUTH_MODE"] = "disabled"
        self.log = work / "ray_start.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [str(RAY), "start", "--head", f"--port={self.port}", f"--temp-dir={self.temp}",
                 "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                 f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", "--block"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start failed:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client_env(self, home: Path | None = None, **extra: str) -> dict:
        """The joining side's environment: this cluster's HOME unless told otherwise."""
        env = {k: v for k, v in os.environ.items() if k not in HOSTILE_ENV}
        env.update(HOME=str(home or self.home), PYTHONPATH=str(ROOT), **extra)
        return env

    def stop(self) -> None:
        """SIGTERM the whole group (ray start shuts its processes down), then SIGKILL."""
        try:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                if not self._signal_and_wait(sig, wait):
                    return
        finally:
            shutil.rmtree(self.temp, ignore_errors=True)

    def _signal_and_wait(self, sig: int, wait: float) -> bool:
        """Send `sig` to the group; True if some of it is still alive after `wait` s."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self.proc.poll()  # reap ray start itself
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return False
            time.sleep(0.5)
        return True


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    cluster = RayStartCluster(tmp_path_factory.mktemp("ray_start_token"), auth=True)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), {"train": 20, "valid": 4}).folder


def run_probe(script: str, args: list[str], env: dict, timeout: int = 180) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_a_shard_stream_joins_a_ray_start_cluster_with_its_token(token_cluster, shards):
    result = run_probe(STREAM, [str(shards), token_cluster.address], token_cluster.client_env())
    assert sorted(result["keys"]) == sorted(set(result["keys"])) and len(result["keys"]) == 20
    assert result["mode"] == "token"  # chosen because the cluster refused a request without
    assert result["gcs"].endswith(f":{token_cluster.port}")
    assert set(result["actor_nodes"]) <= set(result["cluster_nodes"])


def test_the_token_can_come_from_ray_auth_token(token_cluster, tmp_path):
    env = token_cluster.client_env(home=tmp_path, RAY_AUTH_TOKEN=token_cluster.token)
    result = run_probe(JOIN, [token_cluster.address], env)
    assert result == {"mode": "token", "gcs": result["gcs"], "nodes": 1}


def test_without_the_token_joining_fails_at_once_saying_what_to_set(token_cluster, tmp_path):
    result = run_probe(JOIN, [token_cluster.address], token_cluster.client_env(home=tmp_path))
    assert "uses token authentication" in result["error"]
    assert "RAY_AUTH_TOKEN" in result["error"] and "ray get-auth-token" in result["error"]
    assert result["seconds"] < 5  # not Ray's 20-30 s of retries
    wrong = token_cluster.client_env(home=tmp_path, RAY_AUTH_TOKEN=secrets.token_hex(32))
    assert "refuses this machine's auth token" in run_probe(
        JOIN, [token_cluster.address], wrong)["error"]


def test_nothing_listening_fails_at_once(tmp_path):
    result = run_probe(JOIN, [f"127.0.0.1:{free_port()}"], {**os.environ,
                                                           "PYTHONPATH": str(ROOT)})
    assert result["error"].startswith("no Ray cluster answers at 127.0.0.1:")
    assert "ray start --head --port=" in result["error"]
    assert result["seconds"] < 10


def test_tench_fit_joins_a_ray_start_cluster(token_cluster, shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "fit", str(shards), "--out", str(out),
         "--address", token_cluster.address, "--epochs", "1", "--arch", "cnn", "--bs", "8",
         "--size", "16", "--actors", "1", "--device", "cpu"],
        cwd=ROOT, env=token_cluster.client_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.pt").is_file()
    assert "done: 1 epochs" in proc.stdout


def test_tench_fit_without_the_token_prints_one_sentence(token_cluster, shards, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "fit", str(shards), "--out",
         str(tmp_path / "run"), "--address", token_cluster.address, "--epochs", "1"],
        cwd=ROOT, env=token_cluster.client_env(home=tmp_path), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("tench fit:")]
    assert len(lines) == 1 and "set RAY_AUTH_TOKEN" in lines[0], proc.stderr[-2000:]


def test_a_cluster_without_authentication_is_joined_without_a_token(shards, tmp_path):
    """The joining side must not switch token mode on for it: its actors would be cancelled
    (the driver would then demand tokens the cluster never sends)."""
    cluster = RayStartCluster(tmp_path / "cluster", auth=False)
    try:
        home = tmp_path / "client"  # this machine has a token: it must not be used
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
        result = run_probe(STREAM, [str(shards), cluster.address], cluster.client_env(home))
    finally:
        cluster.stop()
    assert len(result["keys"]) == 20
    assert result["mode"] == "disabled"

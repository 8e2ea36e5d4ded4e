"""Starting Ray for a local run, or joining a cluster: where Ray listens, how it authenticates.

A local run (no address) starts Ray in this process with every server on 127.0.0.1. Ray 2.60
picks the node's address itself and rewrites `_node_ip_address="127.0.0.1"` (and
`ray start --node-ip-address=127.0.0.1`) to the machine's reachable IP; only its
single-machine mode (`ray_constants.ENABLE_RAY_CLUSTER` off, what macOS and Windows get, set
by `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` before Ray is imported) uses 127.0.0.1. Given that
node address, the GCS, raylet, object manager, core workers and both agents bind loopback
(measured: `tests/test_listen.py`); otherwise they bind all interfaces.

Joining (`address`): Ray 2.60 has token authentication on by default. `ray start --head` turns
it on when a token exists (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`,
which every local `ray.init` creates), but `ray.init(address="HOST:PORT")` never sends one
unless `RAY_AUTH_MODE=token` is set: joining a usual `ray start` cluster failed after 20-30 s
of retries with a traceback. `join_cluster` asks the cluster's GCS once without a token and,
if it is refused, once with this machine's token, sets `RAY_AUTH_MODE` to what the cluster
wants, or fails at once with one sentence saying what to set. The order matters: a driver
that ever used token mode requires tokens on its own server, which a cluster without
authentication never sends (its actors are then cancelled), and that cannot be undone.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import ray
import ray._private.ray_constants as ray_constants
from ray._private.services import canonicalize_bootstrap_address_or_die
from ray._raylet import AuthenticationTokenLoader, Config, GcsClient, parse_address
from ray.exceptions import AuthenticationError, RpcError

# Imported by every Ray worker process as it starts, before it takes work, when tench starts
# Ray: the pool Ray prestarts at `ray.init` then already holds torch + torchvision (2-3 s
# of imports on a small machine), and a stream's actors start on those warm processes.
# Measured here: first batch 0.5 s after Ray is up instead of 2.9 s.
PRELOAD_MODULES = ("pipeline.actors",)
# Ray's raylet deletes the objects their owners have let go of in batches, every
# `free_objects_period_milliseconds` (default 1000) or 100 objects; until then a batch the
# stream has released still fills the object store and keeps its pages resident: about a
# second of throughput (13-58 MB in tests/test_stream_memory.py, against the 10 MB prefetch
# window). 0 deletes each object as soon as it is released (2-3 MB there). The batching
# saves a free request to every other node per object, and a local Ray has no other node.
# Period 0 also drops the raylet's periodic spill check; it still spills on seal or a full store.
FREE_AT_ONCE = {"free_objects_period_milliseconds": 0}
AUTH_MODE = "RAY_AUTH_MODE"
CONNECT_TIMEOUT_S = 5.0  # a GCS that does not accept a TCP connection in this time is not there
TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` prints it on "
              "the head node) or copy the head node's ~/.ray/auth_token here")


class RayJoinError(ConnectionError):
    """This process cannot join the Ray cluster; the message says what to set."""


def ensure_ray(address: str | None = None) -> bool:
    """Start Ray in this process, or join the cluster at `address`; True if we started it.

    An already running Ray (a test fixture, Ray Train, the user) is used as it is.
    """
    if ray.is_initialized():
        return False
    if address is None:
        start_local_ray()
    else:
        join_cluster(address)
    return True


def start_local_ray() -> None:
    """A new Ray for this machine alone: every server on 127.0.0.1, no dashboard, this
    process's CPUs, workers that import `PRELOAD_MODULES` as they start, and objects deleted
    as soon as they are released (`FREE_AT_ONCE`)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with single_machine_ray():
        # address="local": a new Ray here, even when a `ray start` cluster runs on this
        # machine (address=None would join that one and then refuse num_cpus).
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 configure_logging=False,
                 _system_config={**FREE_AT_ONCE,
                                 "preload_python_modules": list(PRELOAD_MODULES)})


@contextmanager
def single_machine_ray():
    """Ray's single-machine mode while Ray starts: its node address is then 127.0.0.1.

    What `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` does, but that variable is read once, when Ray
    is imported. Restored afterwards: the node address is fixed by then, and a later join
    from this process must see the real setting.
    """
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def join_cluster(address: str) -> None:
    """Join the running cluster at `address` ("auto", a GCS "HOST:PORT" or "ray://...").

    Raises `RayJoinError` at once, with one sentence saying what to set, when nothing answers
    there or the cluster refuses this process's authentication.
    """
    if address.startswith("ray://"):  # Ray Client: its server checks tokens itself
        ray.init(address=address, configure_logging=False)
        return
    gcs = gcs_address(address)
    chosen = os.environ.get(AUTH_MODE)
    if chosen is None:
        choose_auth_mode(gcs)
    elif not gcs_accepts(gcs):
        raise RayJoinError(f"the Ray cluster at {gcs} refuses this process with "
                           f"{AUTH_MODE}={chosen}: unset {AUTH_MODE} (or set it to token) "
                           f"and {TOKEN_HELP}")
    try:
        ray.init(address=gcs, configure_logging=False)
    except ConnectionError as e:
        raise RayJoinError(f"could not join the Ray cluster at {gcs}: {e}") from e


def gcs_address(address: str) -> str:
    """The GCS "HOST:PORT" to join, checked to accept connections (in seconds, not after
    Ray's 40 s of retries); "auto" finds the cluster that `ray start` runs on this machine."""
    if address == "auto":
        try:
            address = canonicalize_bootstrap_address_or_die(address)
        except ConnectionError as e:
            raise RayJoinError(f"--address auto found no single Ray cluster: {e}") from e
    parsed = parse_address(address)
    if parsed is None or not parsed[1].isdigit():
        raise RayJoinError(f"--address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    host, port = parsed
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise RayJoinError(f"no Ray cluster answers at {address} ({e.strerror or e}): start "
                           f"one with `ray start --head --port={port}` or pass the address "
                           "it printed") from e
    return address


def choose_auth_mode(gcs: str) -> None:
    """Set `RAY_AUTH_MODE` to what the cluster at `gcs` wants (first without a token)."""
    if gcs_accepts(gcs):
        set_auth_mode("disabled")
        return
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        raise RayJoinError(f"the Ray cluster at {gcs} uses token authentication and this "
                           f"machine has no token: {TOKEN_HELP}")
    set_auth_mode("token")
    if not gcs_accepts(gcs):
        raise RayJoinError(f"the Ray cluster at {gcs} refuses this machine's auth token "
                           f"(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): "
                           f"{TOKEN_HELP}")


def set_auth_mode(mode: str) -> None:
    """Ray's authentication mode for this process and the processes it starts."""
    os.environ[AUTH_MODE] = mode
    Config.initialize("")  # Ray reads the mode from its config, not from the environment


def gcs_accepts(gcs: str) -> bool:
    """Whether the GCS at `gcs` answers one request made with the current auth mode."""
    try:
        GcsClient(address=gcs)  # asks the GCS for the cluster id
    except AuthenticationError:
        return False
    except RpcError as e:
        raise RayJoinError(f"the Ray cluster at {gcs} does not answer: {e}") from e
    return True

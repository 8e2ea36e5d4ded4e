"""Shared fixtures. Ray tests share one small in-process cluster for the whole session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray (2 CPUs, no dashboard) for every test that needs it; it frees
    released objects at once, like the Ray tench starts (`pipeline.ray_setup.FREE_AT_ONCE`)."""
    import ray

    from pipeline.ray_setup import FREE_AT_ONCE

    if not ray.is_initialized():
        ray.init(
            address="local",  # never join a `ray start` cluster another test left running
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=200 * 1024 * 1024,
            _system_config=FREE_AT_ONCE,
        )
    yield ray


@pytest.fixture()
def server(shard_set):
    """`tests.http_faults.serve_faulty` over the test module's own `shard_set` folder."""
    from tests.http_faults import serve_faulty

    with serve_faulty(shard_set.folder) as srv:
        yield srv


@pytest.fixture()
def fresh_cache():
    """The test starts like a new process: no `ShardCache` that has verified files yet."""
    from pipeline.cache import cache_for

    cache_for.cache_clear()
    yield
    cache_for.cache_clear()

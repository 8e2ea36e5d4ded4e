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

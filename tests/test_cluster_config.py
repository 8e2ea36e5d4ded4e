"""The cluster-launcher configs are valid for Ray's own schema and keep Ray's ports private."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["ray_cluster.yaml", "ray_cluster.local.yaml"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_against_rays_schema(name):
    config = yaml.safe_load((ROOT / name).read_text())
    # What `ray up` does before it contacts any cloud: fill defaults, then validate.
    validate_config(prepare_config(config))


def test_schema_check_catches_a_broken_config():
    import jsonschema

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["min_workers"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", CONFIGS)
def test_dashboard_on_loopback_and_same_pins(name):
    config = yaml.safe_load((ROOT / name).read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in (ROOT / name).read_text()
    setup = " ".join(config["setup_commands"])
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pin in ("torch==2.14.1", "torchvision==0.29.1"):
        assert pin in setup and pin in pyproject


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_deletes_released_objects_within_20_ms(name):
    """Without it each raylet keeps about a second of the stream's released batches
    (`pipeline.ray_setup.FREE_AT_ONCE` says why)."""
    config = yaml.safe_load((ROOT / name).read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_free_objects_period_milliseconds=20 ray start" in c
                             for c in start), (key, start)


def test_aws_config_opens_only_ssh():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    perms = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in perms] == [(22, 22)]
    assert all(r["CidrIp"] != "0.0.0.0/0" for p in perms for r in p["IpRanges"])
    types = config["available_node_types"]
    assert types["gpu_worker"]["resources"].get("GPU", 0) >= 1
    assert "GPU" not in types["head"]["resources"]

"""Configs are validated at the edge with errors that name the field."""

import pytest

from swarmloco.config import RunConfig, config_from_dict, dump_toml, load_config
from swarmloco.protocol.manifest import RunManifest, check_against_swarm, ManifestMismatch


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path) -> None:
    cfg = RunConfig()
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("data, field", [
    ({"inner": {"lr": -1.0}}, "inner.lr"),
    ({"model": {"n_embd": 30, "n_head": 4}}, "model.n_embd"),
    ({"outer": {"momentum": 1.5}}, "outer.momentum"),
    ({"swarm": {"initial_peers": ["not-a-maddr"]}}, "swarm.initial_peers"),
    ({"data": {"holdout_fraction": 0.9}}, "data.holdout_fraction"),
    ({"run_id": "has space"}, "run_id"),
])
def test_bad_values_name_the_field(data, field) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_from_dict(data)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict({"inner": {"lrr": 1.0}})


def test_overrides_apply_dotted_paths(tmp_path) -> None:
    cfg = load_config(None, {"swarm.min_peers": 3, "inner.steps": 7})
    assert cfg.swarm.min_peers == 3 and cfg.inner.steps == 7


def test_manifest_hash_covers_shared_fields_only() -> None:
    base = RunConfig()
    local_change = base.replace(swarm=base.swarm.__class__(min_peers=5))
    shared_change = base.replace(inner=base.inner.__class__(lr=5e-4))
    assert RunManifest.from_config(base).hash == RunManifest.from_config(local_change).hash
    assert RunManifest.from_config(base).hash != RunManifest.from_config(shared_change).hash


def test_manifest_mismatch_names_the_fields() -> None:
    base = RunConfig()
    other = base.replace(inner=base.inner.__class__(lr=5e-4))
    with pytest.raises(ManifestMismatch, match=r"inner\.lr"):
        check_against_swarm(RunManifest.from_config(other), [RunManifest.from_config(base)])
    check_against_swarm(RunManifest.from_config(base), [RunManifest.from_config(base)])
    check_against_swarm(RunManifest.from_config(base), [])

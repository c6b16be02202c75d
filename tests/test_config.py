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


def test_the_example_configs_load_and_let_several_peers_share_a_machine() -> None:
    from pathlib import Path

    from swarmloco.maddrs import parse_maddr

    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.toml")):
        cfg = load_config(path)
        assert all(parse_maddr(m).port == 0 for m in cfg.swarm.host_maddrs), path  # no fixed port to collide on
        assert cfg.swarm.request_timeout < cfg.swarm.matchmaking_time, path  # hivemind warns otherwise


def test_the_defaults_trigger_no_warning_of_hivemind() -> None:
    cfg = RunConfig()
    assert cfg.swarm.request_timeout < cfg.swarm.matchmaking_time  # "It is recommended to use request_timeout..."


def test_errors_show_values_as_written_in_toml_not_as_python() -> None:
    with pytest.raises(ValueError) as e:
        config_from_dict({"swarm": {"announce_maddrs": ["x"]}})
    assert 'swarm.announce_maddrs = "x" is invalid' in str(e.value) and "(" not in str(e.value).split("invalid")[0]
    with pytest.raises(ValueError, match=r"outer\.nesterov = 1 is invalid: must be true or false"):
        config_from_dict({"outer": {"nesterov": 1}})


@pytest.mark.parametrize("data, field", [
    ({"model": {"n_layer": True}}, "model.n_layer"),            # a bool is no integer
    ({"inner": {"beta1": "0.9"}}, "inner.beta1"),               # a string is no number
    ({"inner": {"lr": float("nan")}}, "inner.lr"),
    ({"outer": {"clip_factor": float("inf")}}, "outer.clip_factor"),
    ({"codec": {"name": "zstd"}}, "codec.name"),
    ({"codec": {"error_feedback": "yes"}}, "codec.error_feedback"),
    ({"swarm": {"host_maddrs": ["/ip4/1.2.3.4/tcp/99999"]}}, "swarm.host_maddrs"),
    ({"swarm": {"initial_peers": ["/ip4/1.2.3.4/tcp/1"]}}, "swarm.initial_peers"),  # no /p2p/ peer id
    ({"swarm": {"client_mode": "no"}}, "swarm.client_mode"),
    ({"status": {"port": True}}, "status.port"),
])
def test_values_of_the_wrong_type_name_the_field(data, field) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_from_dict(data)


def test_a_codec_tuned_with_its_own_outer_step_brings_it_where_the_config_leaves_it_unset() -> None:
    from swarmloco.config import CodecConfig, OuterConfig

    sparse = config_from_dict({"codec": {"name": "hadtopk"}})
    assert (sparse.outer.lr, sparse.outer.momentum, sparse.outer.nesterov) == (1.6, 0.6, True)
    explicit = config_from_dict({"codec": {"name": "hadtopk"}, "outer": {"lr": 1.6, "momentum": 0.6}})
    assert RunManifest.from_config(sparse).hash == RunManifest.from_config(explicit).hash  # the values, not "unset"
    mine = config_from_dict({"codec": {"name": "hadtopk"}, "outer": {"lr": 1.0, "clip_factor": 0}})
    assert (mine.outer.lr, mine.outer.momentum, mine.outer.clip_factor) == (1.0, 0.6, 0)  # each field set wins
    dense = config_from_dict({"codec": {"name": "int8"}})
    assert (dense.outer.lr, dense.outer.momentum) == (OuterConfig().lr, OuterConfig().momentum)
    # the API's DiLoCo(outer=None, codec=...) takes the same
    assert OuterConfig.for_codec(CodecConfig(name="hadtopk")) == OuterConfig(lr=1.6, momentum=0.6)
    assert OuterConfig.for_codec(CodecConfig(name="hadtopk"), momentum=0.9).momentum == 0.9
    assert OuterConfig.for_codec(CodecConfig(name="rotate")) == OuterConfig()
    with pytest.raises(ValueError, match="outer.lr"):  # still checked
        config_from_dict({"codec": {"name": "hadtopk"}, "outer": {"lr": -1.0}})


def test_the_sections_owned_by_lower_rooms_never_import_the_config_back() -> None:
    """swarmloco.config gathers [outer], [codec] and the local sections from their rooms and re-exports them;
    those rooms (and the shared checks) import nothing of it, not even lazily."""
    import ast
    from pathlib import Path

    import swarmloco
    from swarmloco import checks, compression, config, local_config, outer_optim

    root = Path(swarmloco.__file__).parent
    rooms = [*(root / "compression").glob("*.py"), *(root / "outer_optim").glob("*.py"), root / "checks.py",
             root / "local_config.py"]
    for path in rooms:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "swarmloco.config" or n.startswith("swarmloco.config.") for n in names), path
    assert config.CodecConfig is compression.CodecConfig and config.OuterConfig is outer_optim.OuterConfig
    assert config.SwarmConfig is local_config.SwarmConfig and config.ConfigError is checks.ConfigError

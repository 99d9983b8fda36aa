import pytest

from lmcache.core.config import ConfigError, LMCacheConfig, describe_keys, load_config, parse_set_flags


def test_defaults_without_any_source():
    cfg = load_config(env={})
    assert cfg.chunk_size == 256 and cfg.max_cpu_size_gb == 5.0 and cfg.eviction_policy == "LRU"
    assert cfg.source_of("chunk_size") == "default"


def test_every_key_has_a_default_a_doc_line_and_a_validation_entry():
    for key, typ, default, doc in describe_keys():
        assert doc and doc.endswith("."), key
        assert typ in ("int", "float", "str", "bool"), key
        load_config(env={}, overrides={key: default})  # the default itself validates


def test_precedence_file_then_env_then_cli(tmp_path):
    f = tmp_path / "lmcache.yaml"
    f.write_text("chunk_size: 512\nmax_cpu_size_gb: 2\ncache_salt: tenant-a\n")
    env = {"LMCACHE_CONFIG_FILE": str(f), "LMCACHE_MAX_CPU_SIZE_GB": "3.5", "LMCACHE_CACHE_SALT": "tenant-b"}
    cfg = load_config(env=env, overrides={"cache_salt": "tenant-c"})
    assert (cfg.chunk_size, cfg.max_cpu_size_gb, cfg.cache_salt) == (512, 3.5, "tenant-c")
    assert cfg.source_of("chunk_size") == f"file {f}"
    assert cfg.source_of("max_cpu_size_gb") == "env LMCACHE_MAX_CPU_SIZE_GB"
    assert cfg.source_of("cache_salt") == "command line"


def test_unknown_key_names_it_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("chunk_sise: 256\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'chunk_sise' \(from file .*\): did you mean 'chunk_size'\?"):
        load_config(f, env={})


def test_unknown_env_key_is_an_error_not_silently_ignored():
    # (the peer's keys, such as LMCACHE_LOCAL_CPU, are known: see the peer-key tests below)
    with pytest.raises(ConfigError, match="unknown config key 'cpu_tier_colour' \\(from env LMCACHE_CPU_TIER_COLOUR\\)"):
        load_config(env={"LMCACHE_CPU_TIER_COLOUR": "blue"})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("max_cpu_size_gb", -1, r"config key 'max_cpu_size_gb' = -1 \(from command line\): accepted values are a number > 0"),
        ("chunk_size", "abc", r"config key 'chunk_size' = 'abc' \(from command line\): expected int"),
        ("chunk_size", 2.5, "expected int"),
        ("chunk_size", 0, "an integer in 1..65536"),
        ("eviction_policy", "FIFO", "accepted values are one of LRU"),
        ("pin_cpu_memory", "maybe", "one of auto, yes, no"),
        ("remote_url", "localhost:6379", "redis://127.0.0.1:6379/0"),
        ("device_backend", "cu da!", "auto, cpu, cuda"),
    ],
)
def test_bad_values_get_one_line_errors_naming_key_value_and_fix(key, value, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(env={}, overrides={key: value})
    assert "\n" not in str(e.value)


def test_env_values_are_parsed_and_validated():
    assert load_config(env={"LMCACHE_CHUNK_SIZE": "128"}).chunk_size == 128
    with pytest.raises(ConfigError, match="from env LMCACHE_CHUNK_SIZE"):
        load_config(env={"LMCACHE_CHUNK_SIZE": "-3"})


def test_file_problems_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad, env={})
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(lst, env={})


def test_set_flags_and_replace():
    assert parse_set_flags(["chunk_size=64", "cache_salt=a=b"]) == {"chunk_size": "64", "cache_salt": "a=b"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set_flags(["chunk_size"])
    cfg = load_config(env={}).replace(chunk_size=64)
    assert isinstance(cfg, LMCacheConfig) and cfg.chunk_size == 64 and cfg.source_of("chunk_size") == "override"


def test_the_readme_config_table_is_the_config_model():
    from pathlib import Path

    from lmcache.cli.main import markdown_keys

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert markdown_keys() in readme, "README's config table is stale: paste `lmcache config keys --markdown` into it"


def test_the_peers_environment_variables_never_stop_a_command(caplog):
    import logging

    env = {"LMCACHE_TRACK_USAGE": "false", "LMCACHE_LOCAL_CPU": "True", "LMCACHE_USE_EXPERIMENTAL": "True",
           "LMCACHE_MAX_LOCAL_CPU_SIZE": "2.5", "LMCACHE_CHUNK_SIZE": "512"}
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        cfg = load_config(env=env)
    assert cfg.max_cpu_size_gb == 2.5 and cfg.chunk_size == 512
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "'track_usage'" in said and "'use_experimental'" in said and "max_cpu_size_gb" in said
    assert "'local_cpu'" not in said  # its value is what lmcache always does: nothing to say


def test_the_peers_yaml_keys_map_to_ours(tmp_path):
    f = tmp_path / "peer.yaml"
    f.write_text("chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 5.0\nlocal_disk: file:///tmp/lmcache-disk/\n"
                 "max_local_disk_size: 40\nremote_url: redis-cluster://h1:7000,h2:7001\nremote_serde: naive\n"
                 "save_unfull_chunk: false\nuse_layerwise: true\nenable_blending: false\nenable_pd: false\n"
                 "cache_policy: LRU\n")
    cfg = load_config(str(f), env={})
    assert (cfg.max_cpu_size_gb, cfg.local_disk_path, cfg.max_local_disk_size_gb) == (5.0, "/tmp/lmcache-disk/", 40.0)
    assert cfg.remote_url == "redis+cluster://h1:7000,h2:7001" and cfg.layerwise_load is True
    assert cfg.source_of("layerwise_load") == f"file {f}"


def test_peer_keys_in_engine_extra_config_and_unknown_keys_still_fail():
    from lmcache.core.config import ConfigError, load_engine_config

    cfg = load_engine_config({"lmcache.max_local_cpu_size": 1.5, "lmcache.enable_blending": False}, "extra", env={})
    assert cfg.max_cpu_size_gb == 1.5
    with pytest.raises(ConfigError, match="did you mean 'max_local_cpu_size' \\(LMCache's name for 'max_cpu_size_gb'\\)"):
        load_config(env={"LMCACHE_MAX_LOCAL_CPU_SIZ": "1"})
    with pytest.raises(ConfigError, match="did you mean 'max_cpu_size_gb'"):
        load_config(env={"LMCACHE_MAX_CPU_SIZE_G": "1"})  # typos of our own keys still fail
    with pytest.raises(ConfigError, match="not an lmcache config key"):
        load_engine_config({"lmcache.no_such_thing": 1}, "extra", env={})

"""Settings precedence: defaults < site file < user file + profile < HPC_SERVE_* < flags."""

import pytest

from hpc_serve.errors import HpcServeError
from hpc_serve.planner.settings import resolve_settings, user_config_path


@pytest.fixture
def files(tmp_path, isolated_config):
    site = tmp_path / "site.toml"
    from pathlib import Path

    user = Path(user_config_path())
    user.parent.mkdir(parents=True, exist_ok=True)
    return site, user


def resolve(flags=None, profile=None, environ=None, probe=None):
    return resolve_settings(flags or {}, profile=profile, environ=environ or {}, gpus_probe=probe)


def test_defaults_when_nothing_is_configured(files):
    s = resolve()
    assert s.values["launcher"] == "auto" and s.sources["launcher"] == "default"
    assert s.values["gpus_per_node"] == 8 and s.sources["gpus_per_node"].startswith("fallback")


def test_each_layer_overrides_the_one_below(files):
    site, user = files
    site.write_text('partition = "site"\naccount = "site"\nqos = "site"\ntime = "site"\n')
    user.write_text('account = "user"\nqos = "user"\ntime = "user"\n')
    s = resolve(flags={"time": "flag"}, environ={"HPC_SERVE_QOS": "env"})
    assert [s.values[k] for k in ("partition", "account", "qos", "time")] == ["site", "user", "env", "flag"]
    assert s.sources["partition"].startswith("site file") and s.sources["account"].startswith("user file")
    assert s.sources["qos"] == "environment (HPC_SERVE_*)" and s.sources["time"] == "command line"


def test_profile_overrides_its_file_top_level(files):
    _, user = files
    user.write_text('partition = "short"\n[profiles.big]\npartition = "a100"\ngpus_per_node = 4\n')
    s = resolve(profile="big")
    assert s.values["partition"] == "a100" and s.values["gpus_per_node"] == 4
    assert s.sources["partition"] == "user file profile 'big'"
    assert resolve().values["partition"] == "short"


def test_default_profile_from_file_and_env(files):
    _, user = files
    user.write_text('profile = "a"\n[profiles.a]\nqos = "qa"\n[profiles.b]\nqos = "qb"\n')
    assert resolve().values["qos"] == "qa"
    assert resolve(environ={"HPC_SERVE_PROFILE": "b"}).values["qos"] == "qb"
    assert resolve(profile="b").values["qos"] == "qb"


def test_site_profiles_are_usable(files):
    site, _ = files
    site.write_text('[profiles.cluster]\nconstraint = "h100"\n')
    assert resolve(profile="cluster").values["constraint"] == "h100"


def test_unknown_profile_lists_known_ones(files):
    _, user = files
    user.write_text('[profiles.a]\nqos = "x"\n')
    with pytest.raises(HpcServeError, match="Unknown profile 'zz'") as err:
        resolve(profile="zz")
    assert "Known profiles: a" in err.value.hint


def test_toml_syntax_error_names_the_line(files):
    _, user = files
    user.write_text('partition = "ok"\naccount = unquoted\n')
    with pytest.raises(HpcServeError, match="not valid TOML") as err:
        resolve()
    assert "line 2" in err.value.problem


def test_unknown_key_lists_valid_keys(files):
    _, user = files
    user.write_text('partiton = "gpu"\n')
    with pytest.raises(HpcServeError, match="Unknown config key 'partiton'") as err:
        resolve()
    assert "partition" in err.value.hint and "gpus_per_node" in err.value.hint


def test_unknown_key_inside_a_profile(files):
    _, user = files
    user.write_text('[profiles.a]\nbogus = 1\n')
    with pytest.raises(HpcServeError, match="Unknown config key 'bogus'"):
        resolve(profile="a")


def test_wrong_type_in_file(files):
    _, user = files
    user.write_text('tp = "eight"\n')
    with pytest.raises(HpcServeError, match="tp must be a whole number"):
        resolve()


def test_environment_values_are_typed(files):
    s = resolve(environ={"HPC_SERVE_TP": "4", "HPC_SERVE_EP": "yes",
                         "HPC_SERVE_VLLM_ARGS": "--max-model-len 512", "HPC_SERVE_SETUP": "a\nb"})
    assert s.values["tp"] == 4 and s.values["ep"] is True
    assert s.values["vllm_args"] == ["--max-model-len", "512"] and s.values["setup"] == ["a", "b"]


def test_bad_environment_values(files):
    with pytest.raises(HpcServeError, match="HPC_SERVE_TP='x' is not a whole number"):
        resolve(environ={"HPC_SERVE_TP": "x"})
    with pytest.raises(HpcServeError, match="is not true or false"):
        resolve(environ={"HPC_SERVE_EP": "maybe"})


def test_unknown_flag_option():
    with pytest.raises(HpcServeError, match="Unknown option 'tensor_parallel'"):
        resolve(flags={"tensor_parallel": 4})


def test_gpus_per_node_from_the_cluster_when_nothing_sets_it(files):
    asked = []

    def probe(partition):
        asked.append(partition)
        return 4, f"sinfo (partition {partition})"

    s = resolve(flags={"partition": "gpu"}, probe=probe)
    assert s.values["gpus_per_node"] == 4 and s.sources["gpus_per_node"] == "sinfo (partition gpu)"
    assert asked == ["gpu"]


def test_flag_beats_the_cluster_probe(files):
    s = resolve(flags={"gpus_per_node": 2}, probe=lambda p: pytest.fail("probe must not run"))
    assert s.values["gpus_per_node"] == 2

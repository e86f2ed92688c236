"""Bad input is refused before anything reaches Slurm, with a message that names the fix."""

import json

import pytest

from hpc_serve.errors import HpcServeError
from hpc_serve.planner.spec import build_spec, parse_env, parse_time

BASE = {"model": "org/model", "gpus_per_node": 8}


def spec(**kwargs):
    return build_spec(**{**BASE, **kwargs})


@pytest.mark.parametrize("value,minutes", [
    ("30", 30), ("30:30", 31), ("04:00:00", 240), ("1-00", 1440), ("1-02:30", 1590),
    ("2-00:00:01", 2881), ("0:30:00", 30),
])
def test_slurm_time_formats(value, minutes):
    assert parse_time(value) == minutes


@pytest.mark.parametrize("value", ["4h", "1-2-3", "1:2:3:4", "", "abc", "-5", "0", "00:00:00"])
def test_malformed_time(value):
    with pytest.raises(HpcServeError) as err:
        parse_time(value)
    assert "--time" in str(err.value)


def test_spec_keeps_the_time_limit_in_minutes():
    assert spec(time="1-00:00:00").time_minutes == 1440


@pytest.mark.parametrize("port", [80, 1023, 65536, 0])
def test_port_outside_range(port):
    with pytest.raises(HpcServeError, match="outside 1024-65535"):
        spec(port=port)


def test_port_in_range():
    assert spec(port=8000).port == 8000


@pytest.mark.parametrize("model", [None, "", "   "])
def test_model_missing_or_empty(model):
    with pytest.raises(HpcServeError, match="No model given") as err:
        spec(model=model)
    assert "--model" in err.value.hint and "profile" in err.value.hint


@pytest.mark.parametrize("item", ["NOEQUALS", "=value", "1BAD=x", "with space=x"])
def test_env_not_key_value(item):
    with pytest.raises(HpcServeError, match="is not KEY=VALUE"):
        parse_env([item])


def test_env_pairs():
    assert parse_env(["A=1", "B=x=y", "C="]) == (("A", "1"), ("B", "x=y"), ("C", ""))


@pytest.mark.parametrize("key", ["HF_TOKEN", "OPENAI_API_KEY", "DB_PASSWORD", "MY_SECRET"])
def test_env_refuses_secrets(key):
    with pytest.raises(HpcServeError, match="looks like a secret") as err:
        parse_env([f"{key}=abc"])
    assert f"Export {key}" in err.value.hint


def test_container_path_that_does_not_exist(tmp_path):
    with pytest.raises(HpcServeError, match="does not exist"):
        spec(container=str(tmp_path / "vllm.sif"))


def test_container_path_that_exists(tmp_path):
    image = tmp_path / "vllm.sif"
    image.write_bytes(b"sif")
    assert spec(container=str(image)).container == str(image)


def test_container_registry_image_is_not_a_path():
    assert spec(container="docker://vllm/vllm-openai:v0.32.0").container.startswith("docker://")


def test_unknown_executor():
    with pytest.raises(HpcServeError, match="Unknown executor 'kubernetes'"):
        spec(executor="kubernetes")


@pytest.mark.parametrize("mem", ["64G", "0", "512000", "1T"])
def test_memory_sizes(mem):
    assert spec(mem=mem).mem == mem


def test_malformed_memory():
    with pytest.raises(HpcServeError, match="--mem '64 GB'"):
        spec(mem="64 GB")


@pytest.mark.parametrize("option", ["partition", "account", "qos", "constraint", "name"])
def test_directive_values_cannot_inject_shell(option):
    with pytest.raises(HpcServeError, match="#SBATCH line"):
        spec(**{option: "gpu\n#SBATCH --nodes=99"})


def test_setup_line_with_newline():
    with pytest.raises(HpcServeError, match="newline"):
        spec(setup=["module load a\nmodule load b"])


def test_empty_engine_command():
    with pytest.raises(HpcServeError, match="--engine-cmd is empty"):
        spec(engine_cmd="  ")


def _moe_folder(tmp_path, config):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_ep_on_a_dense_local_model(tmp_path):
    folder = _moe_folder(tmp_path, {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 128})
    with pytest.raises(HpcServeError, match="not a mixture-of-experts model") as err:
        spec(model=folder, ep=True)
    assert "Drop --ep" in err.value.hint


@pytest.mark.parametrize("config", [
    {"num_local_experts": 8}, {"num_experts": 128}, {"n_routed_experts": 256},
    {"text_config": {"num_experts": 16}},
])
def test_ep_on_a_local_moe_model(tmp_path, config):
    assert spec(model=_moe_folder(tmp_path, config), ep=True, tp=8, dp=2).layout.ep_size == 16


def test_ep_on_a_hub_name_is_not_checked_offline():
    assert spec(model="deepseek-ai/DeepSeek-V3", ep=True).layout.ep


def test_ep_with_unreadable_config(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(HpcServeError, match="Cannot read"):
        spec(model=str(folder), ep=True)


def test_to_json_round_trips():
    data = json.loads(spec(nodes=2, tp=8, pp=2, env=["A=1"]).to_json())
    assert data["layout"]["pp"] == 2 and data["env"] == [["A", "1"]]


def _on_the_node(spec):
    from hpc_serve.node.args import node_spec, to_node_args

    return node_spec(["--model", spec.model, *to_node_args(spec)])


def test_api_key_is_on_by_default_and_opting_out_warns_and_reaches_the_agent():
    from hpc_serve.node.args import to_node_args

    on = build_spec(model="org/m", gpus_per_node=1)
    assert on.api_key and "--no-api-key" not in to_node_args(on)
    off = build_spec(model="org/m", gpus_per_node=1, api_key=False)
    assert off.warnings == ("--no-api-key: anyone who can reach the node's address can use this endpoint.",)
    assert "--no-api-key" in to_node_args(off) and _on_the_node(off).api_key is False


def test_max_restarts_is_checked_and_reaches_the_agent():
    from hpc_serve.node.args import to_node_args

    assert "--max-restarts" not in to_node_args(build_spec(model="org/m", gpus_per_node=1))
    two = build_spec(model="org/m", gpus_per_node=1, max_restarts=2)
    assert to_node_args(two)[-2:] == ["--max-restarts", "2"] and _on_the_node(two).max_restarts == 2
    for bad in (-1, 101):
        with pytest.raises(HpcServeError, match="--max-restarts must be between 0 and 100"):
            build_spec(model="org/m", gpus_per_node=1, max_restarts=bad)


def test_max_restarts_needs_slurm():
    from hpc_serve.job.submission import submit

    with pytest.raises(HpcServeError, match="--max-restarts needs Slurm"):
        submit(build_spec(model="org/m", gpus_per_node=1, max_restarts=1, executor="local"))


def test_auto_renew_needs_a_time_limit_longer_than_its_lead_and_reaches_the_agent():
    with pytest.raises(HpcServeError, match="--auto-renew needs a time limit"):
        build_spec(model="org/m", gpus_per_node=1, auto_renew=True)
    with pytest.raises(HpcServeError, match="--renew-before 60 must be at least 1 minute and less than"):
        build_spec(model="org/m", gpus_per_node=1, auto_renew=True, time="1:00:00", renew_before=60)
    spec = build_spec(model="org/m", gpus_per_node=1, auto_renew=True, time="4", renew_before=3)
    again = _on_the_node(spec)
    assert (again.auto_renew, again.renew_before, again.time) == (True, 3, "4") and again == spec

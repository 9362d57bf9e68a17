"""The cluster files parse and carry what their schemas require; the submit path sends no secrets.

The Ray launcher config is validated against the JSON schema that ships with Ray; the KubeRay manifests
(whose CRD schemas are not installed here) are checked for the fields the RayCluster and RayJob CRDs
require and that musiclib relies on.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from musiclib import cli

PROJECT = Path(__file__).resolve().parent.parent
CLUSTER = PROJECT / "cluster"
KUBERAY = CLUSTER / "kuberay"
JOBS = ("pretrain", "embed", "tune", "tag", "suggest", "index", "study")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _submit_module():
    spec = importlib.util.spec_from_file_location("cluster_submit", CLUSTER / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_yaml_file_has_a_test_of_its_content():
    """Each YAML file under cluster/ is read by a test below that checks what it says, not only that it
    parses: a new file fails here until it gets one."""
    checked = {"aws.yaml", "kuberay/raycluster.yaml", "runtime_env.yaml", "runtime_env.local.yaml"}
    checked |= {f"kuberay/rayjob-{job}.yaml" for job in JOBS}
    assert {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*.yaml")} == checked


# --------------------------------------------------------------------------- Ray cluster launcher


def test_launcher_config_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(_load(CLUSTER / "aws.yaml"), schema)


def test_launcher_config_has_cpu_head_decode_and_gpu_workers():
    config = _load(CLUSTER / "aws.yaml")
    assert config["cluster_name"] and config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node in types.items():
        assert {"node_config", "resources", "min_workers", "max_workers"} <= set(node), name
        assert node["min_workers"] <= node["max_workers"], name
    workers = [node for name, node in types.items() if name != config["head_node_type"]]
    assert any(n["resources"].get("decode") and not n["resources"].get("GPU") for n in workers)
    assert any(n["resources"].get("GPU", 0) >= 1 for n in workers)
    assert sum(n["max_workers"] for n in workers) <= config["max_workers"]
    setup = " ".join(config["setup_commands"])
    assert "requirements.txt" in setup
    assert not any(k in yaml.safe_dump(config) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"))


def test_requirements_pin_every_package():
    lines = _submit_module().read_requirements(CLUSTER / "requirements.txt")
    assert lines and all("==" in line for line in lines)
    assert any(line.startswith("ray[default") for line in lines), "the job server needs ray[default]"


# --------------------------------------------------------------------------- KubeRay


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def _check_container(container: dict, secret_env: bool = True) -> None:
    assert container["name"] and container["image"]
    assert {"requests", "limits"} <= set(container["resources"])
    text = yaml.safe_dump(container)
    assert "AWS_SECRET_ACCESS_KEY:" not in text and "value: testing" not in text  # secrets only by reference
    if secret_env:
        assert any("secretRef" in e for e in container.get("envFrom", [])), container["name"]


def test_raycluster_manifest():
    manifest = _load(KUBERAY / "raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    for container in _containers(head["template"]):
        _check_container(container)
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in _containers(group["template"]):
            _check_container(container)
    gpu = [
        g
        for g in groups
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(g["template"]))
    ]
    assert gpu, "a GPU worker group"
    assert any("decode" in str(g["rayStartParams"].get("resources", "")) for g in groups), "a decode group"


def test_the_head_takes_the_tag_tables_catalog_from_a_secret():
    """Job drivers and the query tool run on the head: it reads the shared Iceberg catalog from a Secret
    (an S3 root is refused without one), never from a value written in the manifests."""
    cluster = _load(KUBERAY / "raycluster.yaml")
    (head,) = _containers(cluster["spec"]["headGroupSpec"]["template"])
    (catalog,) = [e for e in head["env"] if e["name"] == "MUSICLIB_TAG_CATALOG"]
    assert set(catalog) == {"name", "valueFrom"}
    ref = catalog["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "musiclib-iceberg-catalog" and ref["key"] == "uri"
    assert f"kubectl create secret generic {ref['name']}" in (KUBERAY / "raycluster.yaml").read_text()
    tag = _load(KUBERAY / "rayjob-tag.yaml")
    assert tag["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert "--catalog-uri" not in tag["spec"]["entrypoint"]  # from the head's Secret, not the command line
    for path in KUBERAY.glob("*.yaml"):
        assert (
            "MUSICLIB_TAG_CATALOG: " not in path.read_text() and "value: postgresql" not in path.read_text()
        )


@pytest.mark.parametrize("job", JOBS)
def test_rayjob_manifest(job):
    manifest = _load(KUBERAY / f"rayjob-{job}.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    assert spec.get("clusterSelector") or spec.get("rayClusterSpec")
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"  # the job's own ray.init may add to it
    assert not set(env["env_vars"]) & set(_submit_module().SECRETS)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["musiclib", job] and job in cli.JOBS  # the tool the image installs
    assert argv[argv.index("--root") + 1].startswith("s3://")
    for container in _containers(spec["submitterPodTemplate"]):
        _check_container(container, secret_env=False)


def test_the_image_installs_the_tool():
    """The image installs musiclib as a package (no PYTHONPATH to a source tree) and checks its command."""
    text = (CLUSTER / "Dockerfile").read_text()
    assert "pip install --no-cache-dir --no-deps /tmp/musiclib" in text and "musiclib --help" in text
    assert "PYTHONPATH" not in text


# --------------------------------------------------------------------------- the submit path


def test_runtime_env_carries_settings_but_never_credentials():
    submit = _submit_module()
    environ = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "very-secret",
        "AWS_SESSION_TOKEN": "session-secret",
        "RAY_AUTH_TOKEN": "token-secret",
    }
    for path in ("cluster/runtime_env.yaml", "cluster/runtime_env.local.yaml"):
        env = submit.build_runtime_env(path, environ)
        assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
        assert env["env_vars"]["AWS_REGION"] == "eu-west-1"
        text = json.dumps(env)
        assert not any(
            secret in text for secret in ("AKIDEXAMPLE", "very-secret", "session-secret", "token-secret")
        )
        assert env["working_dir"] == str(PROJECT)
        assert {".venv/", "data/", ".git/"} <= set(env["excludes"])
    assert "torch==2.11.0" in submit.build_runtime_env("cluster/runtime_env.yaml", {})["pip"]["packages"]
    assert "pip" not in submit.build_runtime_env("cluster/runtime_env.local.yaml", {})


def test_the_tag_catalog_travels_to_the_job_but_never_its_password():
    submit = _submit_module()
    env = submit.build_runtime_env("cluster/runtime_env.local.yaml", {"MUSICLIB_TAG_CATALOG": "glue"})
    assert env["env_vars"]["MUSICLIB_TAG_CATALOG"] == "glue"
    with_password = "postgresql://tagger:hunter2@db.internal/iceberg"
    with pytest.raises(submit.SubmitError, match="carries a password") as err:
        submit.build_runtime_env("cluster/runtime_env.local.yaml", {"MUSICLIB_TAG_CATALOG": with_password})
    assert "hunter2" not in str(err.value)
    with pytest.raises(submit.SubmitError, match="--catalog-uri carries a password"):
        submit.entrypoint("tag", "s3://b/c", ["--catalog-uri", with_password])
    no_password = "postgresql://tagger@db.internal/iceberg"
    assert submit.entrypoint("tag", "s3://b/c", ["--catalog-uri", no_password]).endswith(no_password)


def test_entrypoints_and_bad_job_names():
    submit = _submit_module()
    assert submit.entrypoint("tag", "s3://b/c", ["--batch-size", "4"]) == (
        "python -m musiclib.cli tag --root s3://b/c --batch-size 4"
    )
    for job in submit.JOBS:
        assert job in cli.JOBS and (PROJECT / "jobs" / f"{cli.JOBS[job][0]}.py").is_file(), job
    with pytest.raises(submit.SubmitError, match="unknown job"):
        submit.entrypoint("train", "data/demo", [])


def test_token_auth_is_switched_on_only_when_a_token_is_at_hand(tmp_path, monkeypatch):
    submit = _submit_module()
    monkeypatch.setattr(submit, "DEFAULT_TOKEN_FILE", tmp_path / "missing")
    assert "RAY_AUTH_MODE" not in submit.cli_environment({})
    assert submit.cli_environment({"RAY_AUTH_TOKEN_PATH": "/x"})["RAY_AUTH_MODE"] == "token"
    assert (
        submit.cli_environment({"RAY_AUTH_TOKEN": "t", "RAY_AUTH_MODE": "disabled"})["RAY_AUTH_MODE"]
        == "disabled"
    )
    token = tmp_path / "auth_token"
    token.write_text("t")
    monkeypatch.setattr(submit, "DEFAULT_TOKEN_FILE", token)
    assert submit.cli_environment({})["RAY_AUTH_MODE"] == "token"

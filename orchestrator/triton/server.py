"""Find, set up and run a ``tritonserver`` process for the cluster's model repository.

Two installations are supported:

- a ``tritonserver`` in PATH, as inside NVIDIA's Triton containers: its own backends;
- the server bundled in the ``nvidia-pytriton`` wheel, which runs on hosts without a GPU.
  Its Python backend needs the stub built for the running Python version copied next to
  ``libtriton_python.so``; the stub ignores ``PYTHONPATH`` and finds packages through the
  ``python`` in ``PATH``, so this environment's ``bin`` goes first in ``PATH``; and when the
  interpreter is not the system one, ``LD_LIBRARY_PATH`` must name its ``libpython`` or the
  stub mixes two Python builds.

The server runs with explicit model control: nothing is loaded until the cluster is ready
(``frontend.py`` loads and unloads), so Triton's readiness follows the cluster's. The child
is killed when the rank that started it dies (``PR_SET_PDEATHSIG``), so even a killed rank
leaves no orphan.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config_cli import cli, comma_list
from orchestrator.triton.model_env import INGRESS_URL_ENV, METRICS_MODEL_ENV, RELAY_SOCKET_ENV

logger = logging.getLogger(__name__)

DEFAULT_REPOSITORY = Path(__file__).resolve().parents[2] / "triton_repo"
"""``triton_repo/`` of this checkout (the models' code lives there)."""

MODEL_DIRS = ("kunserve", "kunserve_unary")
"""The repository's models: the decoupled (streaming) relay and the unary one."""

READINESS_MODEL = "kunserve_readiness"
"""Loaded only while the cluster serves (``frontend.py``): under ``--strict-readiness`` it
makes Triton's server readiness the cluster's, every served model loaded first."""

class TritonError(RuntimeError):
    """tritonserver cannot be found, set up, started or driven."""


@dataclass(frozen=True)
class TritonConfig:
    """Options of ``serve --triton``."""

    host: str = "127.0.0.1"
    """Triton's bind address (loopback only by default)."""
    http_port: int = 8000
    """Triton's HTTP port."""
    grpc_port: int = 8001
    """Triton's gRPC port."""
    metrics_port: int = 8002
    """Triton's metrics port, with the cluster's kunserve_* metrics."""
    model_names: tuple[str, ...] = field(default=MODEL_DIRS, metadata=cli(parse=comma_list, show=",".join))
    """Models to serve: kunserve (decoupled: gRPC streaming, /generate_stream), kunserve_unary
    (HTTP /infer and /generate, gRPC infer), and aliases as NAME=MODEL, e.g. ensemble=kunserve
    for TensorRT-LLM's clients."""
    repository: Path = field(default=DEFAULT_REPOSITORY, metadata=cli(flag="repo", metavar="DIR"))
    """Model repository holding kunserve/ (this checkout's triton_repo by default)."""
    binary: Path | None = field(default=None, metadata=cli(flag="--tritonserver", metavar="PATH"))
    """The tritonserver binary to run; PATH, then the nvidia-pytriton wheel's, when not given."""
    log_verbose: int = 0
    """tritonserver's --log-verbose level."""
    start_timeout_s: float = 60.0
    """Seconds tritonserver may take to become ready."""
    extra_args: tuple[str, ...] = field(default=(), metadata=cli(flag="arg", repeat=True, metavar="FLAG"))
    """One more tritonserver flag, after kunserve's own; repeat for more. Join it with '=', as
    it starts with '--': --triton-arg=--trace-config=level=TIMESTAMPS."""

    def __post_init__(self) -> None:
        if not self.model_names:
            raise ValueError("--triton-model-names must name at least one model")
        for name, directory in self.served().items():
            for part in (name, directory):
                if not part or "/" in part or part.startswith("."):
                    raise ValueError(f"--triton-model-names: {part!r} is not a valid model name")
            if READINESS_MODEL in (name, directory):
                raise ValueError(f"--triton-model-names: {READINESS_MODEL} is the server's readiness gate, "
                                 "not a model to serve")
        if len(self.served()) != len(self.model_names):
            raise ValueError("--triton-model-names names a model twice")
        ports = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if p != 0]
        if len(set(ports)) != len(ports):
            raise ValueError("--triton-http-port, --triton-grpc-port and --triton-metrics-port must differ")


    def served(self) -> dict[str, str]:
        """Served name -> model directory in the repository."""
        pairs = (n.split("=", 1) if "=" in n else (n, n) for n in self.model_names)
        return {name.strip(): directory.strip() for name, directory in pairs}


@dataclass(frozen=True)
class TritonInstall:
    """A usable ``tritonserver`` and the environment its Python backend needs."""

    binary: Path
    backend_dir: Path | None
    """The backends to use; None keeps the server's own default (container installs)."""
    env: dict[str, str] = field(default_factory=dict)


def find_tritonserver(binary: Path | None = None, work_dir: Path | None = None) -> TritonInstall:
    """Locate tritonserver (explicit, PATH, then the pytriton wheel) and prepare its backends."""
    env = _python_env()
    if binary is not None:
        if not binary.is_file():
            raise TritonError(f"--tritonserver {binary} does not exist")
        return TritonInstall(binary, None, env)
    in_path = shutil.which("tritonserver")
    if in_path:
        return TritonInstall(Path(in_path), None, env)
    root = _pytriton_root()
    if work_dir is None:
        raise TritonError("a work directory is needed to set up the bundled tritonserver")
    # The stub finds its bundled libraries through an $ORIGIN-relative RPATH, which the
    # copy next to libtriton_python.so no longer satisfies.
    env = _python_env(root.parents[1] / "nvidia_pytriton.libs")
    return TritonInstall(root / "bin" / "tritonserver", _bundled_backends(root, work_dir), env)


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise TritonError("no tritonserver in PATH and the nvidia-pytriton wheel is not installed; "
                          "pip install 'kunserve-orchestrator[triton]' (or run inside a Triton container)")
    root = Path(spec.origin).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise TritonError(f"{root}/bin/tritonserver is missing; reinstall nvidia-pytriton")
    return root


def _bundled_backends(root: Path, work_dir: Path) -> Path:
    """A backends directory whose Python backend has the stub for this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    python_dir = work_dir / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in (root / "backends" / "python").iterdir():
        if item.name != "__pycache__":
            (python_dir / item.name).symlink_to(item)
    shutil.copy2(stub, python_dir / stub.name)
    return work_dir / "backends"


def _python_env(extra_libs: Path | None = None) -> dict[str, str]:
    """PATH (this environment first) and LD_LIBRARY_PATH (this interpreter's libpython,
    then ``extra_libs``)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    libs = [sysconfig.get_config_var("LIBDIR"), str(extra_libs) if extra_libs else None,
            os.environ.get("LD_LIBRARY_PATH")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return env


def prepare_repository(cfg: TritonConfig, work_dir: Path) -> Path:
    """A model repository with one entry per served name, linked to its model directory.

    Triton takes a model's name from its directory when ``config.pbtxt`` names none, so
    a link per name serves the same model under several names.
    """
    repo = work_dir / "models"
    repo.mkdir(parents=True, exist_ok=True)
    for name, directory in {**cfg.served(), READINESS_MODEL: READINESS_MODEL}.items():
        source = cfg.repository / directory
        if not (source / "config.pbtxt").is_file() or not (source / "1" / "model.py").is_file():
            raise TritonError(f"{source} is not a model of the repository (config.pbtxt and 1/model.py "
                              f"expected; the repository has {', '.join(MODEL_DIRS)})")
        (repo / name).symlink_to(source.resolve(), target_is_directory=True)
    return repo


class TritonProcess:
    """One ``tritonserver`` child: start, health, explicit model load/unload, stop."""

    def __init__(self, cfg: TritonConfig, ingress_url: str, relay_socket: Path) -> None:
        self.cfg = cfg
        self.ingress_url = ingress_url
        self.relay_socket = relay_socket
        self._work_dir = Path(tempfile.mkdtemp(prefix="kunserve-triton-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "") else self.cfg.host
        return f"http://{host}:{self.cfg.http_port}"

    def start(self) -> None:
        """Spawn the server (returns at once; ``wait_live`` waits for it)."""
        install = find_tritonserver(self.cfg.binary, self._work_dir)
        repo = prepare_repository(self.cfg, self._work_dir)
        cmd = self._command(install, repo)
        env = dict(os.environ, **install.env)
        env[INGRESS_URL_ENV] = self.ingress_url
        env[RELAY_SOCKET_ENV] = str(self.relay_socket)
        env[METRICS_MODEL_ENV] = next(iter(self.cfg.served()))
        logger.info("starting %s", " ".join(cmd))
        self._proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent, start_new_session=True)

    def _command(self, install: TritonInstall, repo: Path) -> list[str]:
        c = self.cfg
        cmd = [str(install.binary), "--model-repository", str(repo), "--model-control-mode", "explicit",
               "--strict-readiness", "true", "--allow-gpu-metrics", "false", "--allow-cpu-metrics", "true",
               "--http-address", c.host, "--http-port", str(c.http_port),
               "--grpc-address", c.host, "--grpc-port", str(c.grpc_port),
               "--metrics-address", c.host, "--metrics-port", str(c.metrics_port),
               "--exit-timeout-secs", "10", "--log-verbose", str(c.log_verbose),
               # Asked for at start, the readiness gate fails to load (the cluster is not
               # serving yet): from its first answer the server is not ready, where with
               # nothing loaded it would say ready before any model is. That failure must
               # not end the server.
               "--load-model", READINESS_MODEL, "--exit-on-error", "false"]
        if install.backend_dir is not None:
            cmd += ["--backend-directory", str(install.backend_dir)]
        return cmd + list(c.extra_args)

    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def wait_live(self) -> None:
        """Block until the server answers ``/v2/health/live``; raise if it exits or times out."""
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            if self.returncode() is not None:
                raise TritonError(f"tritonserver exited with status {self.returncode()} while starting "
                                  f"(its log is above); are ports {self.cfg.http_port}/{self.cfg.grpc_port}/"
                                  f"{self.cfg.metrics_port} free?")
            if self._get("/v2/health/live") == 200:
                return
            time.sleep(0.1)  # polling a child process's HTTP port; nothing to compute meanwhile
        raise TritonError(f"tritonserver was not live within {self.cfg.start_timeout_s:.0f} s")

    def load(self, name: str) -> None:
        """Load one served name (Triton blocks until the model's ``initialize`` returns)."""
        status, body = self._post(f"/v2/repository/models/{name}/load")
        if status != 200:
            raise TritonError(f"loading model {name!r} failed: {body}")

    def unload(self, name: str) -> None:
        status, body = self._post(f"/v2/repository/models/{name}/unload")
        if status != 200:
            raise TritonError(f"unloading model {name!r} failed: {body}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, wait for the graceful exit (in-flight requests end), then SIGKILL."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop within %.0f s; killing it", timeout_s)
                proc.kill()
                proc.wait()
        shutil.rmtree(self._work_dir, ignore_errors=True)

    def _get(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return None

    def _post(self, path: str) -> tuple[int | None, str]:
        req = urllib.request.Request(self.http_url + path, data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.start_timeout_s) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, _error_text(exc.read())
        except (urllib.error.URLError, OSError) as exc:
            return None, str(exc)


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", body.decode(errors="replace")))
    except ValueError:
        return body.decode(errors="replace")


def die_with_parent() -> None:
    """In the child before exec: die when the parent dies, even by SIGKILL.

    SIGKILL rather than SIGTERM: a parent that died without stopping the server (mpirun
    killed it) gives no time for a graceful exit, and a server stuck loading a model would
    ignore SIGTERM. The orderly path is ``TritonProcess.stop``.
    """
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:  # not Linux: the launcher's own shutdown still stops the server
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)

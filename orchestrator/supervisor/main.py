"""``python -m orchestrator supervise``: the composition root of the supervisor process
(its options, the front door's backend, the ingress and Triton, then the run loop)."""

from __future__ import annotations

import argparse
import logging
import sys

from engines.errors import EngineError
from engines.store import EngineStore
from engines.tokenizer import Tokenizer
from orchestrator.config_cli import add_config_args
from orchestrator.config_cli import config_from_args as config_of
from orchestrator.serve import ServeConfig, add_serve_args, config_from_args
from orchestrator.supervisor.config import SuperviseConfig
from orchestrator.supervisor.remote_backend import RemoteBackend
from orchestrator.supervisor.supervisor import Supervisor, install_signal_handlers

logger = logging.getLogger("orchestrator.supervisor")


def add_supervise_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, SuperviseConfig)
    p.add_argument("serve_args", nargs=argparse.REMAINDER, metavar="-- SERVE_OPTIONS",
                   help="after '--': the options of `serve` (--engine-dir DIR ...), for the job and its front "
                        "ends (--host, --http-port, --triton ... are the supervisor's)")


def _serve_config(serve_argv: list[str]) -> ServeConfig:
    """The serve options, checked here as the job would check them (exit 2 before starting)."""
    if "--supervisor-socket" in " ".join(serve_argv):
        raise ValueError("--supervisor-socket is the supervisor's own; do not pass it")
    parser = argparse.ArgumentParser(prog="supervise -- ", add_help=False, exit_on_error=False)
    add_serve_args(parser)
    args, unknown = parser.parse_known_args(serve_argv)
    if unknown:
        raise ValueError(f"unknown serve options: {' '.join(unknown)}")
    return config_from_args(args)


def run_supervise(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s [supervisor] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    serve_argv = list(args.serve_args)
    if serve_argv[:1] == ["--"]:
        serve_argv = serve_argv[1:]
    try:
        sup_cfg = config_of(SuperviseConfig, args)
        cfg = _serve_config(serve_argv)
        store = EngineStore(cfg.engine_dir)
        backend = RemoteBackend(cfg.model_name or store.path.resolve().name, Tokenizer(store.tokenizer_dir),
                                store.config.max_position_embeddings, cfg.max_queued_requests,
                                sup_cfg.migration_limit, sup_cfg.retry_after_s)
    except (argparse.ArgumentError, EngineError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _run(sup_cfg, cfg, serve_argv, backend)


def _run(sup_cfg: SuperviseConfig, cfg: ServeConfig, serve_argv: list[str], backend: RemoteBackend) -> int:
    from orchestrator.ingress.server import IngressServer

    supervisor = Supervisor(sup_cfg, serve_argv, backend)
    install_signal_handlers(supervisor)
    ingress = IngressServer(backend, cfg.host, cfg.ingress_port, admin_token=cfg.admin_token,
                            relay_socket=cfg.relay_path(), request_log=cfg.request_log)
    triton = None
    try:
        ingress.start()
        if cfg.triton is not None:
            from orchestrator.triton.frontend import TritonFrontend

            triton = TritonFrontend(cfg.triton, ingress.url, ingress.relay_socket, backend.healthy)
            triton.start()
        logger.info("front door on %s; starting the job (%d ranks)", ingress.url, sup_cfg.ranks)
        return supervisor.run()
    except Exception as exc:  # noqa: BLE001 - a front end that cannot start: one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for part in (triton, ingress):
            if part is not None:
                part.stop()
        supervisor.stop_job()

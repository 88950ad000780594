"""Finding and setting up tritonserver, and the --triton options."""

from __future__ import annotations

import argparse
import os
import sys

import pytest

from orchestrator.serve import add_serve_args, config_from_args
from orchestrator.triton.server import (DEFAULT_REPOSITORY, READINESS_MODEL, TritonConfig, TritonError, TritonInstall,
                                        TritonProcess, find_tritonserver, prepare_repository)
from tests.deps import require


def test_served_names_map_aliases_onto_model_directories():
    cfg = TritonConfig(model_names=("kunserve", "kunserve_unary", "ensemble=kunserve"))
    assert cfg.served() == {"kunserve": "kunserve", "kunserve_unary": "kunserve_unary", "ensemble": "kunserve"}


@pytest.mark.parametrize("kw,message", [
    ({"model_names": ()}, "at least one"),
    ({"model_names": ("a/b",)}, "not a valid model name"),
    ({"model_names": ("kunserve", "kunserve")}, "twice"),
    ({"http_port": 9000, "grpc_port": 9000}, "must differ"),
])
def test_bad_triton_options(kw, message):
    with pytest.raises(ValueError, match=message):
        TritonConfig(**kw)


def test_repository_links_each_name_and_rejects_unknown_models(tmp_path):
    cfg = TritonConfig(model_names=("kunserve", "ensemble=kunserve_unary"))
    repo = prepare_repository(cfg, tmp_path)
    assert sorted(p.name for p in repo.iterdir()) == ["ensemble", "kunserve", READINESS_MODEL]
    assert (repo / "ensemble" / "config.pbtxt").read_text().count("decoupled: false") == 1
    assert (repo / "kunserve" / "config.pbtxt").read_text().count("decoupled: true") == 1
    with pytest.raises(TritonError, match="nope is not a model of the repository"):
        prepare_repository(TritonConfig(model_names=("x=nope",)), tmp_path / "other")
    with pytest.raises(ValueError, match="readiness gate"):
        TritonConfig(model_names=("kunserve", READINESS_MODEL))


def test_unary_model_is_the_same_code():
    assert (DEFAULT_REPOSITORY / "kunserve_unary/1/model.py").resolve() == \
           (DEFAULT_REPOSITORY / "kunserve/1/model.py").resolve()


def test_bundled_server_gets_the_stub_for_this_python_and_its_libraries(tmp_path, monkeypatch):
    require("pytriton")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no tritonserver in PATH
    install = find_tritonserver(work_dir=tmp_path)
    assert install.binary.name == "tritonserver" and os.access(install.binary, os.X_OK)
    stub = install.backend_dir / "python" / "triton_python_backend_stub"
    assert stub.is_file() and not stub.is_symlink()  # a copy: the stub resolves its backend dir
    assert (install.backend_dir / "python" / "libtriton_python.so").exists()
    assert install.env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert "nvidia_pytriton.libs" in install.env["LD_LIBRARY_PATH"]


def test_missing_binary_is_named():
    with pytest.raises(TritonError, match="does-not-exist does not exist"):
        find_tritonserver(binary=__import__("pathlib").Path("/does-not-exist"))


def _parse(*argv):
    p = argparse.ArgumentParser()
    p.add_argument("--log-level", default="info")
    add_serve_args(p)
    return config_from_args(p.parse_args(["--engine-dir", "x", *argv]))


def test_ingress_moves_off_tritons_default_ports():
    assert _parse().ingress_port == 8000 and _parse().triton is None
    cfg = _parse("--triton")
    assert cfg.ingress_port == 8080 and cfg.triton.http_port == 8000
    assert cfg.triton.served() == {"kunserve": "kunserve", "kunserve_unary": "kunserve_unary"}
    with pytest.raises(ValueError, match="--http-port 8001 is also one of Triton's ports"):
        _parse("--triton", "--http-port", "8001")


def test_triton_args_are_passed_after_kunserves_own(tmp_path):
    cfg = _parse("--triton", "--triton-arg=--trace-config=level=TIMESTAMPS", "--triton-arg=--log-info=false")
    cmd = TritonProcess(cfg.triton, "http://127.0.0.1:8080", tmp_path / "relay.sock")._command(
        TritonInstall(tmp_path / "tritonserver", None), tmp_path)
    assert cmd[-2:] == ["--trace-config=level=TIMESTAMPS", "--log-info=false"]
    assert cmd[cmd.index("--grpc-port") + 1] == "8001"
    assert _parse("--triton").triton.extra_args == ()


def test_request_log_option():
    assert _parse().request_log is None
    assert str(_parse("--request-log", "/tmp/requests.jsonl").request_log) == "/tmp/requests.jsonl"


def test_relay_socket_is_private_with_triton_named_when_asked_and_none_otherwise(tmp_path):
    assert _parse().relay_path() is None
    private = _parse("--triton").relay_path()
    assert private.name == f"kunserve-relay-{os.getpid()}.sock"
    assert _parse("--relay-socket", str(tmp_path / "r.sock")).relay_path() == tmp_path / "r.sock"
    with pytest.raises(ValueError, match="longer than a Unix socket path may be"):
        _parse("--relay-socket", "/tmp/" + "x" * 120)


def test_unary_config_declares_the_same_tensors_as_the_streaming_one():
    """Triton configs cannot include each other: the two copies must not drift apart."""
    import re

    def tensors(name):
        lines = (DEFAULT_REPOSITORY / name / "config.pbtxt").read_text().splitlines()
        text = "\n".join(line.split("#")[0] for line in lines)
        blocks = re.findall(r"^(?:input|output|parameters) \[.*?^\]", text, re.S | re.M)
        return blocks + re.findall(r"^(?:max_batch_size|backend):.*$", text, re.M)

    streaming = tensors("kunserve")
    assert len(streaming) == 5 and "text_input" in streaming[0] and "num_migrations" in streaming[1]
    assert tensors("kunserve_unary") == streaming

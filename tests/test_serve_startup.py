"""Starting `edgeserve serve` as a new user would: the config file in effect is found and
logged, a taken port or a wrong folder fails with one line before anything is written,
and one line says when the server is ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serving import LISTENING, run_server, stop, write_config
from tests.waiting import wait_until

ENV = {k: v for k, v in os.environ.items() if k != "EDGESERVE_CONFIG"}


def serve(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeserve", "serve", *args],
        cwd=cwd,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_config_discovery_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeserve.config.loader import find_config

    system = tmp_path / "etc.toml"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGESERVE_CONFIG", raising=False)
    assert find_config(None, system).path is None
    system.write_text("")
    assert find_config(None, system).reason == "system"
    (tmp_path / "edgeserve.toml").write_text("")
    assert find_config(None, system).path == tmp_path / "edgeserve.toml"
    monkeypatch.setenv("EDGESERVE_CONFIG", str(tmp_path / "from-env.toml"))
    assert find_config(None, system).path == tmp_path / "from-env.toml"
    assert find_config(tmp_path / "given.toml", system).path == tmp_path / "given.toml"


def test_serve_reads_edgeserve_toml_in_the_working_folder_and_logs_it(tmp_path: Path) -> None:
    write_config(tmp_path / "edgeserve.toml", "[auth]\nenabled = false\n", 0, tmp_path / "state")
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgeserve", "serve"],
            cwd=tmp_path,
            env=ENV,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: " msg=ready " in log_path.read_text(), 60, log_path.read_text)
        finally:
            stop(process)
    log = log_path.read_text()
    assert f"config file={tmp_path / 'edgeserve.toml'} from=working directory" in log
    listening = LISTENING.search(log.encode())
    assert listening, log
    assert f"ready url=http://127.0.0.1:{int(listening.group(1))} " in log


def test_ready_line_names_url_models_and_time(tmp_path: Path) -> None:
    with run_server(tmp_path, "[auth]\nenabled = false\n") as server:
        line = wait_until(
            lambda: next((x for x in server.log().splitlines() if "msg=ready " in x), None),
            60,
            server.log,
        )
    assert f"config file={server.config_path} from=--config" in server.log()
    assert f"url={server.url} " in line
    assert 'models="digits:1,2"' in line
    assert "ready_s=" in line


def test_port_in_use_is_one_line_and_exit_code_3(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = write_config(tmp_path / "edgeserve.toml", "", port, tmp_path / "state")
        done = serve(tmp_path, "--config", str(config))
    assert done.returncode == 3
    errors = [line for line in done.stderr.splitlines() if "level=" not in line]
    assert errors == [f"edgeserve: port {port} is in use"]
    assert not (tmp_path / "state").exists()  # nothing written


def test_grpc_port_in_use_is_refused_too(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        grpc_port = holder.getsockname()[1]
        config = write_config(tmp_path / "edgeserve.toml", "", 0, tmp_path / "state")
        config.write_text(
            config.read_text().replace("[models]", f"grpc_port = {grpc_port}\n[models]")
        )
        done = serve(tmp_path, "--config", str(config))
    assert done.returncode == 3
    assert f"edgeserve: port {grpc_port} is in use" in done.stderr


def test_serve_in_the_wrong_folder_writes_nothing(tmp_path: Path) -> None:
    done = serve(tmp_path, "--port", "0")
    assert done.returncode == 2
    assert "models.repository" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no .edgeserve/keys


def test_port_0_serves_on_the_port_its_listening_line_names(tmp_path: Path) -> None:
    """`port = 0` takes a free port from the kernel at the check before serving and holds
    it from then on, so nothing can take it between choosing and binding (issue 23)."""
    with run_server(tmp_path, "[auth]\nenabled = false\n") as server:
        assert "port = 0\n" in server.config_path.read_text()
        assert server.port != 0
        assert f"listening url=http://127.0.0.1:{server.port}" in server.log()
        assert httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200


def test_an_address_this_box_does_not_have_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "edgeserve.toml"
    write_config(config, "", 0, tmp_path / "state")
    config.write_text(config.read_text().replace('host = "127.0.0.1"', 'host = "192.0.2.1"'))
    done = serve(tmp_path, "--config", str(config))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "level=" not in line]
    assert errors == [
        "edgeserve: config error: server.host: cannot listen on 192.0.2.1 port 0: "
        "Cannot assign requested address"
    ]
    assert not (tmp_path / "state").exists()  # nothing written


def test_grpc_port_auto_serves_on_the_port_its_listening_line_names(tmp_path: Path) -> None:
    """`grpc_port = "auto"` binds a port the kernel picks, as `port = 0` does for HTTP,
    and the `grpc listening` and `ready` lines name it (issue 23)."""
    import tritonclient.grpc as triton

    config = write_config(tmp_path / "edgeserve.toml", "[auth]\nenabled = false\n", 0, tmp_path)
    text = config.read_text().replace("port = 0\n", 'port = {port}\ngrpc_port = "auto"\n')
    with run_server(tmp_path, config_text=text) as server:
        address = server.grpc_address()
        port = int(address.rpartition(":")[2])
        assert address == f"127.0.0.1:{port}" and port != 0
        with triton.InferenceServerClient(address) as client:
            assert client.is_server_ready()
        ready = wait_until(
            lambda: next((x for x in server.log().splitlines() if "msg=ready " in x), None),
            60,
            server.log,
        )
    assert f" grpc=127.0.0.1:{port} " in ready

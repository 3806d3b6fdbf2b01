"""Split training over the network: the wire format, the gRPC link, and ``atlas-pl serve`` + ``atlas-pl client``.

The last tests run real processes on loopback: a server and two client processes train to the adapters and
validation losses of one ``atlas-pl fit`` process bit for bit, and after the server is killed mid-run (the clients
stop with a clear error) a restarted server and clients resume from the last round to the same end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from atlas_pl.transport import LinkClient, LinkError, LinkServer, Message, WireError, decode, encode

ROOT = Path(__file__).parents[2]


# -------------------------------------------------------------------------------------------- wire format
def test_a_message_round_trips_tensors_of_every_dtype_and_its_fields_without_pickle() -> None:
    tensors = {"h": torch.randn(2, 3, 4), "bf": torch.randn(5).to(torch.bfloat16), "ids": torch.arange(6),
               "ok": torch.tensor([1, 0], dtype=torch.uint8)}  # fmt: skip
    data = encode(Message("step", {"client": 3, "task_id": "1"}, tensors))
    assert b"\x80\x04" not in data[:16]  # not a pickle stream: an 8-byte length, then a JSON header
    back = decode(data)
    assert back.kind == "step" and back.fields == {"client": "3", "task_id": "1"}
    for name, t in tensors.items():
        assert back.tensors[name].dtype == t.dtype and torch.equal(back.tensors[name], t)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x01\x02", "at least 8 bytes"),
        ((10**9).to_bytes(8, "little") + b"{}", "header size"),
        (encode(Message("step"))[:-1], "header size"),
        (b"\x04" + bytes(7) + b"{no}", "malformed"),
    ],  # fmt: skip
)
def test_malformed_bytes_are_a_wire_error(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode(data)


def test_unknown_kinds_are_refused_both_ways() -> None:
    with pytest.raises(WireError, match="unknown message kind 'pickle'"):
        encode(Message("pickle"))
    from safetensors.torch import save

    with pytest.raises(WireError, match="unknown message kind"):
        decode(save({}, metadata={"kind": "exec"}))


# ---------------------------------------------------------------------------------------------- gRPC link
def _echo(message: Message, connection: str) -> Message:
    if message.kind == "bye":
        raise RuntimeError("no goodbyes here")
    if message.fields.get("sleep"):
        time.sleep(float(message.fields["sleep"]))
    return Message("gradient", {"connection": connection, **message.fields}, {"grad": 2 * message.tensor("hidden")})


@pytest.fixture
def server():
    link = LinkServer(_echo, "127.0.0.1:0", token="s3cret").start()
    yield link
    link.stop(0)


def test_requests_get_their_replies_in_order_with_a_window_of_several(server) -> None:
    with LinkClient(server.address, token="s3cret", window=3) as client:
        for i in range(3):
            client.send(Message("step", {"client": i}, {"hidden": torch.full((2,), float(i))}))
        replies = [client.receive() for _ in range(3)]
    assert [r.fields["client"] for r in replies] == ["0", "1", "2"]
    assert [float(r.tensor("grad")[0]) for r in replies] == [0.0, 2.0, 4.0]
    assert replies[0].fields["connection"] == client.connection


def test_a_handler_error_is_named_to_the_client_and_the_stream_stays_open(server) -> None:
    with LinkClient(server.address, token="s3cret") as client:
        with pytest.raises(LinkError, match="no goodbyes here"):
            client.request(Message("bye", {"client": 0}))
        assert client.request(Message("step", {}, {"hidden": torch.ones(1)})).kind == "gradient"


def test_a_wrong_token_is_refused(server) -> None:
    with LinkClient(server.address, token="guess") as client, pytest.raises(LinkError, match="UNAUTHENTICATED"):
        client.request(Message("step", {}, {"hidden": torch.ones(1)}))


def test_a_slow_reply_times_out_and_a_missing_server_is_named() -> None:
    link = LinkServer(_echo, "127.0.0.1:0").start()
    try:
        with LinkClient(link.address, timeout_s=0.5) as client, pytest.raises(LinkError, match="no reply .* within"):
            client.request(Message("step", {"sleep": "2"}, {"hidden": torch.ones(1)}))
    finally:
        link.stop(0)
    with pytest.raises(LinkError, match="no server answers at 127.0.0.1"):
        LinkClient(link.address, connect_timeout_s=0.5)


def test_a_server_that_goes_away_mid_stream_is_a_link_error() -> None:
    link = LinkServer(_echo, "127.0.0.1:0").start()
    client = LinkClient(link.address, timeout_s=10)
    assert client.request(Message("step", {}, {"hidden": torch.ones(1)})).kind == "gradient"
    threading.Thread(target=link.stop, args=(0,)).start()
    time.sleep(0.5)
    with pytest.raises(LinkError, match="127.0.0.1"):
        client.request(Message("step", {}, {"hidden": torch.ones(1)}))
    client.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_serves_a_client_that_trusts_the_certificate_and_refuses_a_plain_one(tmp_path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)  # fmt: skip
    link = LinkServer(_echo, "127.0.0.1:0", tls_cert=cert, tls_key=key).start()
    try:
        with LinkClient(link.address, tls_root_cert=cert) as client:
            assert client.request(Message("step", {}, {"hidden": torch.ones(1)})).kind == "gradient"
        with pytest.raises(LinkError):
            plain = LinkClient(link.address, connect_timeout_s=2, timeout_s=2)
            plain.request(Message("step", {}, {"hidden": torch.ones(1)}))
    finally:
        link.stop(0)


# --------------------------------------------------------------------------- serve + client processes
OVERLAY = """
model:
  share: none
trainer:
  callbacks:
    - class_path: atlas_pl.callbacks.cluster_aggregation.ClusterAggregation
      init_args:
        method:
          class_path: atlas_pl.algorithms.Exact
"""
ROUNDS = 2


def _args(tmp: Path, sub: str, out: str, *extra: str) -> list[str]:
    (tmp / "overlay.yaml").write_text(OVERLAY)
    return [sys.executable, "-m", "atlas_pl", sub, "--config", "configs/demo.yaml", "--config",
            str(tmp / "overlay.yaml"),
            "--trainer.logger.init_args.save_dir", str(tmp / out), "--trainer.default_root_dir", str(tmp / out),
            "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", str(ROUNDS), "--model.model_overrides",
            '{"n_layer": 3, "n_embd": 32, "n_head": 2, "resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0}',
            "--model.lora.target_modules", "null", "--data.num_clients", "2", "--data.num_groups", "2",
            "--data.tasks_per_group", "1", "--data.examples_per_client", "16", "--data.local_steps", "2",
            "--data.batch_size", "8", *extra]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _start(tmp: Path, sub: str, out: str, *extra: str) -> subprocess.Popen:
    log = open(tmp / f"{out}.log", "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(_args(tmp, sub, out, *extra), cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, tmp: Path, out: str, code: int = 0) -> str:
    try:
        got = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{out} hung:\n{(tmp / f'{out}.log').read_text()[-3000:]}")
    log = (tmp / f"{out}.log").read_text()
    assert got == code, f"{out} exited with {got}:\n{log[-3000:]}"
    return log


def _address(tmp: Path, server: subprocess.Popen, previous: str | None = None) -> str:
    path = tmp / "srv" / "server" / "address"
    deadline = time.monotonic() + 120
    while not path.exists() or path.read_text() == previous:
        assert server.poll() is None, (tmp / "srv.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the server never wrote its address"
        time.sleep(0.1)
    return path.read_text()


def _networked_run(tmp: Path, *extra: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    server = _start(tmp, "serve", "srv", "--address", "127.0.0.1:0", "--token", "t0k", *extra)
    address = _address(tmp, server)
    clients = [_start(tmp, "client", f"c{c}", "--server", address, "--clients", f"[{c}]", "--token", "t0k", *extra)
               for c in (0, 1)]  # fmt: skip
    for c, proc in enumerate(clients):
        _wait(proc, tmp, f"c{c}")
    _wait(server, tmp, "srv")
    return _collect(tmp)


def _collect(tmp: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    adapters = dict(torch.load(tmp / "srv" / "server" / "server_state.pt", weights_only=False)["adapters"])
    history = []
    for c in (0, 1):
        adapters.update(torch.load(tmp / f"c{c}" / "clients" / f"clients_{c}.pt", weights_only=False)["adapters"])
        history.append(json.loads((tmp / f"c{c}" / "clients" / f"clients_{c}.json").read_text())["history"])
    return adapters, history


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tmp = tmp_path_factory.mktemp("fit")
    _wait(_start(tmp, "fit", "ref"), tmp, "ref")
    state = torch.load(tmp / "ref" / "demo" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    history = json.loads(sorted((tmp / "ref" / "demo").glob("version_*/results.json"))[-1].read_text())["history"]
    return state, history


def _assert_same(in_process: tuple, networked: tuple) -> None:
    (state, history), (adapters, client_histories) = in_process, networked
    assert state.keys() == adapters.keys()  # every client adapter (on its client) and server adapter + head
    for key, value in state.items():
        torch.testing.assert_close(adapters[key], value, rtol=0, atol=1e-5)
    for c, rows in enumerate(client_histories):
        assert [r["round"] for r in rows] == list(range(ROUNDS))
        for r, row in enumerate(rows):
            key = f"val_loss/client_{c:03d}"
            assert row[key] == pytest.approx(history[r][key], abs=1e-5)


@pytest.mark.slow
def test_a_server_and_two_client_processes_train_what_one_process_trains(tmp_path, in_process) -> None:
    networked = _networked_run(tmp_path)
    _assert_same(in_process, networked)
    rows = networked[1][0]
    assert rows[-1]["bytes_up"] > rows[0]["bytes_up"] > 0 and rows[0]["bytes_down"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_killed_server_stops_the_clients_clearly_and_a_restart_resumes_from_the_last_round(tmp_path, in_process):
    server = _start(tmp_path, "serve", "srv", "--address", "127.0.0.1:0", "--round_timeout_s", "60")
    address = _address(tmp_path, server)
    clients = [_start(tmp_path, "client", f"c{c}", "--server", address, "--clients", f"[{c}]", "--timeout_s", "30")
               for c in (0, 1)]  # fmt: skip
    saved = [tmp_path / f"c{c}" / "clients" / f"clients_{c}.pt" for c in (0, 1)]
    deadline = time.monotonic() + 240
    while not all(p.exists() for p in saved):  # round 0 merged and saved on all sides: kill while round 1 trains
        assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "srv.log").read_text()[-2000:]
        time.sleep(0.02)
    server.send_signal(signal.SIGKILL)
    server.wait()
    for c, proc in enumerate(clients):
        log = _wait(proc, tmp_path, f"c{c}", code=2)
        assert f"link to {address} failed" in log or f"the server at {address} closed" in log, log[-2000:]
    server = _start(tmp_path, "serve", "srv", "--address", "127.0.0.1:0", "--resume", "true")
    address = _address(tmp_path, server, previous=address)
    clients = [_start(tmp_path, "client", f"c{c}", "--server", address, "--clients", f"[{c}]", "--resume", "true")
               for c in (0, 1)]  # fmt: skip
    for c, proc in enumerate(clients):
        _wait(proc, tmp_path, f"c{c}")
    _wait(server, tmp_path, "srv")
    _assert_same(in_process, _collect(tmp_path))


@pytest.mark.parametrize("option", [{"dp_sgd": {"noise_multiplier": 1.0}}, {"bottleneck": {"weight": 0.1}}])
def test_defences_the_network_client_does_not_run_are_refused_by_name(option: dict) -> None:
    from atlas_pl.cli import _networked
    from atlas_pl.data import FederatedDataModule
    from atlas_pl.federation import Federation
    from tests.conftest import tiny_data_kwargs, tiny_federation_kwargs

    fed = Federation(**tiny_federation_kwargs(), **option)
    with pytest.raises(ValueError, match=rf"model\.{next(iter(option))} do not run over the network"):
        _networked(fed, FederatedDataModule(**tiny_data_kwargs()), [])

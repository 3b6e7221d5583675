"""TLS, mutual TLS, bearer tokens in one interceptor, sessions owned by their creator, per-client
limits, unguessable ids, and logs free of tokens and input data."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.api.auth import TokenFileError, parse_tokens
from tests.certs import Pki
from tests.grpc_helpers import channel, expect_code, native, serving, step_request

MODEL = "tiny_lstm"
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef0123"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def tls_files(pki: Pki, directory: Path) -> dict[str, Path]:
    cert, key = pki.issue("localhost", server=True).write(directory, "server")
    ca = directory / "ca.crt"
    ca.write_bytes(pki.ca_pem)
    return {"tls_cert_file": cert, "tls_key_file": key, "ca": ca}


def secure_channel(port: int, pki: Pki, client_cn: str | None = None) -> grpc.aio.Channel:
    client = pki.issue(client_cn) if client_cn else None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_pem,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


async def test_tls_serves_verified_clients_and_refuses_plaintext(
    make_settings: Any, pki: Pki, tmp_path: Path
) -> None:
    files = tls_files(pki, tmp_path)
    settings = make_settings(
        tls_cert_file=files["tls_cert_file"], tls_key_file=files["tls_key_file"]
    )
    async with serving(settings) as srv:
        async with secure_channel(srv.grpc_port, pki) as ch:
            models = await native(ch).ListModels(pb.ListModelsRequest())
            assert {m.name for m in models.models} >= {MODEL}
        async with channel(srv.grpc_port) as ch:
            await expect_code(grpc.StatusCode.UNAVAILABLE,
                              native(ch).ListModels(pb.ListModelsRequest(), timeout=5))  # fmt: skip


async def test_mutual_tls_requires_a_client_certificate_and_scopes_sessions_to_it(
    make_settings: Any, pki: Pki, tmp_path: Path
) -> None:
    files = tls_files(pki, tmp_path)
    settings = make_settings(tls_cert_file=files["tls_cert_file"], tls_key_file=files["tls_key_file"],
                             tls_client_ca_file=files["ca"])  # fmt: skip
    async with serving(settings) as srv:
        async with secure_channel(srv.grpc_port, pki) as ch:  # no client certificate
            await expect_code(grpc.StatusCode.UNAVAILABLE,
                              native(ch).ListModels(pb.ListModelsRequest(), timeout=5))  # fmt: skip
        async with (
            secure_channel(srv.grpc_port, pki, "alice") as alice_ch,
            secure_channel(srv.grpc_port, pki, "bob") as bob_ch,
        ):
            alice = native(alice_ch)
            bob = native(bob_ch)
            await alice.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="mine"))
            await expect_code(grpc.StatusCode.NOT_FOUND,
                              bob.GetSession(pb.GetSessionRequest(model=MODEL, session_id="mine")))  # fmt: skip
            info = await alice.GetSession(pb.GetSessionRequest(model=MODEL, session_id="mine"))
            assert info.session_id == "mine"
        assert srv.engine.model(MODEL).store.sessions  # alice's session lives on


async def test_bearer_tokens_gate_every_rpc_but_health(make_settings: Any) -> None:
    settings = make_settings(auth_tokens=f"alice:{ALICE},bob:{BOB}")
    async with (
        serving(settings) as srv,
        channel(srv.grpc_port) as ch,
    ):
        stub = native(ch)
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        await expect_code(grpc.StatusCode.UNAUTHENTICATED, stub.ListModels(pb.ListModelsRequest()))
        await expect_code(grpc.StatusCode.UNAUTHENTICATED,
                          stub.ListModels(pb.ListModelsRequest(), metadata=bearer("wrong" * 5)))  # fmt: skip
        call = stub.Stream(metadata=bearer("wrong" * 5))
        await expect_code(grpc.StatusCode.UNAUTHENTICATED, call.read())
        assert (await stub.ListModels(pb.ListModelsRequest(), metadata=bearer(ALICE))).models


async def test_sessions_belong_to_the_identity_that_created_them(make_settings: Any) -> None:
    settings = make_settings(auth_tokens=f"alice:{ALICE},bob:{BOB}")
    async with (
        serving(settings) as srv,
        channel(srv.grpc_port) as ch,
    ):
        stub = native(ch)
        created = await stub.CreateSession(
            pb.CreateSessionRequest(model=MODEL), metadata=bearer(ALICE)
        )
        sid = created.session_id
        assert len(sid) == 32 and int(sid, 16) >= 0  # 128 random bits, hex
        x = np.ones((2, 3), np.float32)
        missing = await expect_code(grpc.StatusCode.NOT_FOUND, stub.GetSession(
            pb.GetSessionRequest(model=MODEL, session_id="never-existed"), metadata=bearer(BOB)))  # fmt: skip
        for call in (
            stub.GetSession(
                pb.GetSessionRequest(model=MODEL, session_id=sid), metadata=bearer(BOB)
            ),
            stub.Step(step_request(MODEL, sid, x), metadata=bearer(BOB)),
            stub.CloseSession(
                pb.CloseSessionRequest(model=MODEL, session_id=sid), metadata=bearer(BOB)
            ),
        ):
            details = await expect_code(grpc.StatusCode.NOT_FOUND, call)
            assert details == missing.replace("never-existed", sid)  # indistinguishable
        # Bob may use the same id for a session of his own; neither sees the other's.
        await stub.CreateSession(
            pb.CreateSessionRequest(model=MODEL, session_id=sid), metadata=bearer(BOB)
        )
        reply = await stub.Step(step_request(MODEL, sid, x), metadata=bearer(ALICE))
        assert reply.steps == 2
        bobs = await stub.GetSession(
            pb.GetSessionRequest(model=MODEL, session_id=sid), metadata=bearer(BOB)
        )
        assert bobs.steps == 0


async def test_per_client_session_limit(make_settings: Any) -> None:
    settings = make_settings(auth_tokens=f"alice:{ALICE},bob:{BOB}", max_sessions_per_client=2)
    async with (
        serving(settings) as srv,
        channel(srv.grpc_port) as ch,
    ):
        stub = native(ch)
        first = await stub.CreateSession(
            pb.CreateSessionRequest(model=MODEL), metadata=bearer(ALICE)
        )
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL), metadata=bearer(ALICE))
        await expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          stub.CreateSession(pb.CreateSessionRequest(model=MODEL), metadata=bearer(ALICE)))  # fmt: skip
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL), metadata=bearer(BOB))
        await stub.CloseSession(pb.CloseSessionRequest(model=MODEL, session_id=first.session_id),
                                metadata=bearer(ALICE))  # fmt: skip
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL), metadata=bearer(ALICE))


async def test_logs_hold_neither_tokens_nor_input_data(
    make_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(auth_tokens=f"alice:{ALICE}", log_level="DEBUG")
    marker = 1234.5677490234375  # exactly representable in float32
    async with (
        serving(settings) as srv,
        channel(srv.grpc_port) as ch,
    ):
        stub = native(ch)
        await expect_code(grpc.StatusCode.UNAUTHENTICATED,
                          stub.ListModels(pb.ListModelsRequest(), metadata=bearer(BOB)))  # fmt: skip
        created = await stub.CreateSession(
            pb.CreateSessionRequest(model=MODEL), metadata=bearer(ALICE)
        )
        x = np.full((2, 3), marker, np.float32)
        await stub.Step(step_request(MODEL, created.session_id, x), metadata=bearer(ALICE))
        bad = np.full((2, 4), marker, np.float32)  # wrong feature count: an error path
        await expect_code(grpc.StatusCode.INVALID_ARGUMENT,
                          stub.Step(step_request(MODEL, created.session_id, bad), metadata=bearer(ALICE)))  # fmt: skip
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert caplog.records  # the server did log
    for secret in (ALICE, BOB, "1234.56", x.tobytes().hex()[:16]):
        assert secret not in text


def test_token_entries_must_name_an_identity_and_be_long() -> None:
    assert parse_tokens(f"# comment\nalice:{ALICE}\n\nbob:{BOB}", "f") == {
        ALICE: "alice",
        BOB: "bob",
    }
    for bad in ("justatoken0123456789", "alice:short", ":0123456789abcdef0123"):
        with pytest.raises(TokenFileError):
            parse_tokens(bad, "f")

"""Kafka SASL/TLS settings reach every client (replay producer, topic admin, the workers' consumers and
producers), the metrics bind address is configurable, and no secret is ever printed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contracts.connection import KafkaSecurity
from controller.settings import ControllerSettings
from replay.producer import producer_options

SECRET = "s3cr3t-Pa55w0rd-do-not-log"
SASL_ENV = {"DTWIN_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "DTWIN_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "DTWIN_KAFKA_SASL_USERNAME": "dtwin", "DTWIN_KAFKA_SASL_PASSWORD": SECRET}


def test_replay_and_admin_clients_get_the_sasl_settings(monkeypatch):
    for k, v in SASL_ENV.items():
        monkeypatch.setenv(k, v)
    opts = producer_options("127.0.0.1:1")
    assert opts["security_protocol"] == "SASL_PLAINTEXT" and opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert opts["sasl_plain_username"] == "dtwin" and opts["sasl_plain_password"] == SECRET
    assert opts["enable_idempotence"] is True and opts["acks"] == "all"


def test_tls_files_reach_kafka_python(tmp_path):
    sec = KafkaSecurity.from_env({"DTWIN_KAFKA_SECURITY_PROTOCOL": "ssl", "DTWIN_KAFKA_SSL_CAFILE": "/ca.pem",
                                  "DTWIN_KAFKA_SSL_CERTFILE": "/c.pem", "DTWIN_KAFKA_SSL_KEYFILE": "/k.pem"})
    assert sec.kafka_python_options() == {"security_protocol": "SSL", "ssl_cafile": "/ca.pem",
                                          "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem"}


def test_bad_security_settings_name_the_variable():
    with pytest.raises(ValueError, match="DTWIN_KAFKA_SECURITY_PROTOCOL"):
        KafkaSecurity.from_env({"DTWIN_KAFKA_SECURITY_PROTOCOL": "TLS"})
    with pytest.raises(ValueError, match="DTWIN_KAFKA_SASL_MECHANISM"):
        KafkaSecurity.from_env({"DTWIN_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "DTWIN_KAFKA_SASL_USERNAME": "u",
                                "DTWIN_KAFKA_SASL_PASSWORD": "p"})


def test_workers_consumers_and_producers_get_the_sasl_settings(monkeypatch, tmp_path):
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from controller.app import Controller

    for k, v in SASL_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DTWIN_STATE_DIR", str(tmp_path))
    ctl = Controller(ControllerSettings())
    auth = credentials_to_aiokafka_auth(ctl.app.conf.broker_credentials)  # what Faust hands aiokafka
    assert auth["security_protocol"] == "SASL_PLAINTEXT" and auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert auth["sasl_plain_username"] == "dtwin" and auth["sasl_plain_password"] == SECRET


def test_secrets_never_appear_in_reprs():
    sec = KafkaSecurity.from_env(SASL_ENV)
    settings = ControllerSettings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                                  kafka_sasl_username="dtwin", kafka_sasl_password=SECRET)
    for text in (repr(sec), str(sec), repr(settings), str(settings), repr(settings.security())):
        assert SECRET not in text


def test_a_worker_that_cannot_authenticate_never_logs_the_password(tmp_path, artifact_dir):
    """A worker pointed at a closed port with SASL settings, at debug level: its whole output is searched."""
    from dtwin.broker import free_port

    port = free_port()
    env = {**os.environ, **SASL_ENV, "DTWIN_BOOTSTRAP": f"127.0.0.1:{port}", "DTWIN_MODEL_DIR": str(artifact_dir),
           "DTWIN_STATE_DIR": str(tmp_path / "state"), "DTWIN_METRICS_PORT": str(free_port()),
           "DTWIN_METRICS_BIND": "127.0.0.1", "DTWIN_WEB_PORT": str(free_port()), "DTWIN_LOG_LEVEL": "debug"}
    log = tmp_path / "worker.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "dtwin", "controller", "--no-create-topics", "--log-level",
                                 "debug"], env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(12)
        proc.kill()
        proc.wait()
    text = Path(log).read_text(errors="replace")
    assert "127.0.0.1" in text or "Connect" in text, text[-2000:]  # it did try, and logged about it
    assert SECRET not in text


def test_metrics_bind_address_is_configurable(monkeypatch):
    monkeypatch.setenv("DTWIN_METRICS_BIND", "127.0.0.1")
    assert ControllerSettings().metrics_bind == "127.0.0.1"

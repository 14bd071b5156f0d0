"""ClusterConfig: defaults, file < env < CLI precedence, and clear errors for bad values."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from runtime.settings import ClusterConfig, ConfigError, add_arguments, from_args, load_config


def parse(argv: list[str], env: dict[str, str] | None = None) -> ClusterConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv), env=env or {})


def test_defaults_bind_loopback_and_use_embedded_etcd() -> None:
    config = load_config(env={})
    assert config == ClusterConfig()
    assert config.host == "127.0.0.1"
    assert config.embedded_etcd and config.etcd_endpoints == ()
    assert (config.port, config.grpc_port, config.lease_ttl_s) == (8000, 8001, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.namespace = "x"  # type: ignore[misc]


def test_precedence_file_then_env_then_cli(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "namespace: from-file\n"
        "lease-ttl-s: 7\n"
        "etcd_endpoints: [10.0.0.1:2379, 10.0.0.2:2379]\n"
        "model: file-model\n"
        "port: 9000\n"
    )
    env = {"TANDEM_NAMESPACE": "from-env", "TANDEM_LEASE_TTL_S": "5", "TANDEM_UNRELATED": "ignored"}

    from_file = load_config(path, env={})
    assert from_file.namespace == "from-file" and from_file.lease_ttl_s == 7 and from_file.port == 9000
    assert from_file.etcd_endpoints == ("10.0.0.1:2379", "10.0.0.2:2379") and not from_file.embedded_etcd

    from_env = load_config(path, env=env)
    assert (from_env.namespace, from_env.lease_ttl_s, from_env.model) == ("from-env", 5, "file-model")

    from_cli = parse(["--config", str(path), "--namespace", "from-cli", "--port", "9100"], env=env)
    assert from_cli.namespace == "from-cli"  # CLI beats env
    assert from_cli.lease_ttl_s == 5  # env beats file
    assert from_cli.model == "file-model"  # file beats default
    assert from_cli.port == 9100 and from_cli.grpc_port == 8001


def test_config_file_from_env_and_json(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(
        json.dumps({"namespace": "js", "metrics_interval_s": 2, "etcd_user": "u", "etcd_password": "p"})
    )
    config = parse([], env={"TANDEM_CONFIG": str(path)})
    assert config.namespace == "js" and config.metrics_interval_s == 2.0
    assert (config.etcd_user, config.etcd_password) == ("u", "p")


def test_env_list_and_optional_values() -> None:
    config = load_config(env={"TANDEM_ETCD_ENDPOINTS": "a:2379, https://b:2379", "TANDEM_ETCD_USER": ""})
    assert config.etcd_endpoints == ("a:2379", "https://b:2379") and config.etcd_user is None
    assert parse(["--etcd-endpoints", "h:1,h:2"]).etcd_endpoints == ("h:1", "h:2")


def test_variants_with_replace() -> None:
    base = ClusterConfig(namespace="a")
    worker = dataclasses.replace(base, port=0, metrics_port=9300)
    assert worker.namespace == "a" and worker.metrics_port == 9300
    with pytest.raises(ConfigError, match="metrics_port"):
        dataclasses.replace(base, metrics_port=70000)


def test_tls_files_must_exist(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    config = ClusterConfig(etcd_cert_file=str(cert), etcd_key_file=str(key))
    assert config.etcd_cert_file == str(cert)
    with pytest.raises(ConfigError, match=r"etcd_ca_file=.*no such file"):
        ClusterConfig(etcd_ca_file=str(tmp_path / "missing.pem"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TANDEM_PORT": "eighty"}, r"port: expected an integer, got 'eighty' \(from TANDEM_PORT\)"),
        ({"TANDEM_PORT": "70000"}, r"port=70000: must be in 0\.\.65535"),
        ({"TANDEM_GRPC_PORT": "8000"}, "must differ"),
        ({"TANDEM_LEASE_TTL_S": "1"}, "lease_ttl_s=1: must be between 2"),
        ({"TANDEM_LEASE_TTL_S": "2.5"}, "lease_ttl_s: expected an integer"),
        ({"TANDEM_METRICS_INTERVAL_S": "0"}, "metrics_interval_s"),
        ({"TANDEM_NAMESPACE": "a/b"}, "bad namespace 'a/b'"),
        ({"TANDEM_ETCD_ENDPOINTS": "nohost"}, "bad etcd endpoint 'nohost'"),
        ({"TANDEM_ETCD_USER": "root"}, "etcd_user and its password .* go together"),
        ({"TANDEM_ETCD_PASSWORD": "pw"}, "etcd_user and its password .* go together"),
        ({"TANDEM_ETCD_USER": "u", "TANDEM_ETCD_PASSWORD": "pw", "TANDEM_ETCD_PASSWORD_FILE": "/etc/hostname"},
         "etcd_password_file=.*not both"),
        ({"TANDEM_ETCD_USER": "u", "TANDEM_ETCD_PASSWORD_FILE": "/no/such/file"},
         "etcd_password_file='/no/such/file': no such file"),
        ({"TANDEM_ETCD_CA_FILE": "/etc/hostname"}, "etcd_ca_file=.*embedded etcd .* etcd_cert_file"),
        ({"TANDEM_ETCD_CERT_FILE": "/etc/hostname"}, "etcd_cert_file and etcd_key_file go together"),
        ({"TANDEM_LOG_LEVEL": "chatty"}, "log_level='CHATTY': must be one of"),
        ({"TANDEM_HOST": ""}, "host='': must not be empty"),
        ({"TANDEM_ASYNC_SCHEDULING": "yes"}, "async_scheduling='yes': must be auto, on or off"),
        ({"TANDEM_ASYNC_SCHEDULING": "on", "TANDEM_ENGINE": "sim"}, "async_scheduling='on': needs the torch engine"),
        ({"TANDEM_WARM_POOL": "-1"}, "warm_pool=-1: must be >= 0"),
    ],
)
def test_bad_values_are_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)


def test_bad_files(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("namespce: x\n")
    with pytest.raises(ConfigError, match="unknown setting 'namespce'"):
        load_config(typo, env={})
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(broken, env={})
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listed, env={})
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("port: [1]\n")
    with pytest.raises(ConfigError, match=r"port: expected an integer, got \[1\]"):
        load_config(wrong_type, env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml", env={})


def test_cli_errors_and_help() -> None:
    with pytest.raises(ConfigError, match=r"lease_ttl_s: expected an integer, got 'ten' \(from override\)"):
        parse(["--lease-ttl-s", "ten"])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    assert "--etcd-endpoints" in text and "TANDEM_NAMESPACE" in text and "--config" in text


def test_async_scheduling_reaches_the_engine_config() -> None:
    from worker.server import engine_config

    cpu = {v: engine_config(ClusterConfig(async_scheduling=v)).use_async_scheduling for v in ("auto", "on", "off")}
    assert cpu == {"auto": False, "on": True, "off": False}  # auto: on with CUDA only
    assert engine_config(ClusterConfig(async_scheduling="auto", device="cuda")).use_async_scheduling


def test_etcd_password_comes_from_env_or_a_file_never_a_flag(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.etcd import EtcdAccess

    secret = tmp_path / "etcd-password"
    secret.write_text("s3cret\nignored\n")
    from_file = parse(["--etcd-user", "tandem", "--etcd-password-file", str(secret)])
    assert EtcdAccess.from_config(from_file).password == "s3cret"
    from_env = parse(["--etcd-user", "tandem"], env={"TANDEM_ETCD_PASSWORD": "envpw"})
    assert EtcdAccess.from_config(from_env).password == "envpw"
    assert "envpw" not in repr(from_env) and "envpw" not in repr(EtcdAccess.from_config(from_env))
    with pytest.raises(SystemExit):
        parse(["--etcd-user", "tandem", "--etcd-password", "onthecommandline"])
    assert "ps would show it" in capsys.readouterr().err
    secret.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        EtcdAccess.from_config(from_file)

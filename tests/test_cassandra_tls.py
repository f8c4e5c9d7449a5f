"""The Cassandra registry over TLS against one real TLS-only node (client certificates required),
and the refusal of secrets others may read (password file, client key)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.errors import EXIT_CONFIG, RegistryMisconfigured, RegistryUnavailable, SpecError
from cluster.registry import Service, open_registry
from tests.fixtures._pki import CertAuthority
from tests.fixtures.cassandra import TlsNode, cassandra_spec, free_port

pytestmark = pytest.mark.cassandra


def tls_spec(tmp_path: Path, tls: TlsNode, keyspace: str, *, ca: Path | None = None, client: bool = True,
             extra: str = "", connect_timeout: int = 30):
    fields = [f"ca_file: '{ca or tls.ca.file}'"]
    if client:
        fields += [f"cert_file: '{tls.client.cert}'", f"key_file: '{tls.client.key}'"]
    fields += [extra] if extra else []
    return cassandra_spec(tmp_path, [tls.node.address], keyspace,
                          extra=f", connect_timeout: {connect_timeout}, tls: {{{', '.join(fields)}}}")


def refusal(spec, kind: type) -> str:
    with pytest.raises(kind) as err:
        open_registry(spec)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_registry_over_tls_with_the_site_ca_and_a_client_certificate(cassandra_tls_node, tmp_path):
    with open_registry(tls_spec(tmp_path, cassandra_tls_node, "tlsok")) as reg:
        reg.register(Service(role="sage", service_id="sage-1", host="10.0.0.5", port=6000, hypervisor="hv1",
                             scheduler="slurm", job_id="7", image="demo@1"))
        assert [s.service_id for s in reg.lookup("sage")] == ["sage-1"]
    # The node's name is checked: its certificate names its address, not this.
    message = refusal(tls_spec(tmp_path, cassandra_tls_node, "tlsname", extra="server_hostname: db.example.org"),
                      RegistryMisconfigured)
    assert "TLS handshake failed" in message and "db.example.org" in message, message


def test_a_node_signed_by_another_ca_is_refused_as_configuration(cassandra_tls_node, tmp_path, cli):
    spec = tls_spec(tmp_path, cassandra_tls_node, "tlsca", ca=cassandra_tls_node.other_ca.file)
    message = refusal(spec, RegistryMisconfigured)
    assert "TLS handshake failed (check registry.cassandra.tls)" in message
    assert "CERTIFICATE_VERIFY_FAILED" in message and cassandra_tls_node.node.address in message, message
    spec_file = tmp_path / "site.yaml"
    spec_file.write_text(
        f"registry: {{cassandra: {{contact_points: [{cassandra_tls_node.node.address}], connect_timeout: 30, "
        f"tls: {{ca_file: '{cassandra_tls_node.other_ca.file}'}}}}}}\nroles: {{sage: {{image: demo@1, port: 6000}}}}\n")
    done = cli("--spec", str(spec_file), "services")
    assert done.returncode == EXIT_CONFIG and done.stderr.count("\n") == 1, done.stderr
    assert "TLS handshake failed" in done.stderr


def test_without_the_client_certificate_or_without_tls_the_node_refuses(cassandra_tls_node, tmp_path):
    message = refusal(tls_spec(tmp_path, cassandra_tls_node, "tlsnocert", client=False), RegistryMisconfigured)
    assert "TLS handshake failed" in message, message
    # A plain client cannot tell a TLS-only node from a broken connection: transient (75).
    plain = cassandra_spec(tmp_path, [cassandra_tls_node.node.address], "plain", extra=", connect_timeout: 10")
    refusal(plain, RegistryUnavailable)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_password_file_others_may_read_is_refused_in_one_line(tmp_path, mode, cli):
    password = tmp_path / "password"
    password.write_text("cassandra\n")
    password.chmod(mode)
    spec = cassandra_spec(tmp_path, ["127.0.0.1"], "modes", username="cassandra", password_file=password,
                          extra=f", port: {free_port()}")
    message = refusal(spec, SpecError)
    assert message == (f"registry.cassandra.password_file: {password} is open to group or others "
                       f"(mode {mode:04o}); expected readable by its owner only (chmod 600)")
    spec_file = tmp_path / "site.yaml"
    spec_file.write_text(f"registry: {{cassandra: {{contact_points: [127.0.0.1], username: cassandra, "
                         f"password_file: '{password}'}}}}\nroles: {{sage: {{image: demo@1, port: 6000}}}}\n")
    done = cli("--spec", str(spec_file), "services")
    assert done.returncode == EXIT_CONFIG and done.stderr == f"salvus_jobs: {message}\n"


def test_a_client_key_others_may_read_and_bad_tls_files_are_refused(tmp_path):
    ca = CertAuthority.create(tmp_path, "ca")
    client = ca.issue(tmp_path, "client")
    client.key.chmod(0o644)
    fields = f"ca_file: '{ca.file}', cert_file: '{client.cert}', key_file: '{client.key}'"
    spec = cassandra_spec(tmp_path, ["127.0.0.1"], "keys", extra=f", port: {free_port()}, tls: {{{fields}}}")
    assert refusal(spec, SpecError) == (f"registry.cassandra.tls.key_file: {client.key} is open to group or "
                                        f"others (mode 0644); expected readable by its owner only (chmod 600)")
    missing = cassandra_spec(tmp_path, ["127.0.0.1"], "keys", extra=f", tls: {{ca_file: '{tmp_path}/none.pem'}}")
    assert refusal(missing, SpecError).startswith(
        f"registry.cassandra.tls.ca_file: cannot load {tmp_path}/none.pem: No such file or directory")
    with pytest.raises(SpecError, match="cert_file and key_file go together"):
        cassandra_spec(tmp_path, ["127.0.0.1"], "keys", extra=f", tls: {{ca_file: '{ca.file}', cert_file: '{client.cert}'}}")

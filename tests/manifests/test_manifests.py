"""manifests/ and istio/: valid against the real schemas, consistent across clouds,
and carrying exactly the filter configuration and SDS settings the product uses."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess

import pytest
import yaml

import hcl
import validate

REPO = validate.REPO
CLOUDS = ["aws", "gcp", "azure"]
OVERLAYS = REPO / "manifests" / "overlays"
ISTIO = REPO / "istio"
EXAMPLES = REPO / "filter" / "examples"
BIN = REPO / "target" / "debug"


@pytest.fixture(scope="session")
def crds():
    return validate.load_crd_schemas()


@pytest.fixture(scope="session")
def rendered():
    return {cloud: validate.render_overlay(OVERLAYS / cloud) for cloud in CLOUDS}


def source_files():
    return [*validate.kubernetes_files(REPO / "manifests"), *validate.kubernetes_files(ISTIO)]


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_source_document_validates(path, crds):
    errors = [f"{where}: {e}" for where, doc in validate.yaml_documents(path) for e in validate.validate_document(doc, crds)]
    assert errors == []


@pytest.mark.parametrize("cloud", CLOUDS)
def test_rendered_overlay_validates(cloud, rendered, crds):
    docs = rendered[cloud]
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "DaemonSet", "ClusterSPIFFEID", "ClusterFederatedTrustDomain", "NetworkPolicy", "CSIDriver"} <= kinds
    errors = [f"{d['kind']}/{d['metadata']['name']}: {e}" for d in docs for e in validate.validate_document(d, crds)]
    assert errors == []


@pytest.mark.parametrize(
    "fixture, expected",
    [
        ("bad-core-unknown-field.yaml", "imagePullPolicyy"),
        ("bad-core-wrong-type.yaml", "spec.replicas"),
        ("bad-crd-unknown-field.yaml", "bundleEndpointUrl"),
        ("bad-istio-wrong-type.yaml", "BEFORE_EVERYTHING"),
        ("bad-istio-unknown-field.yaml", "hostz"),
    ],
)
def test_the_validator_catches_bad_documents(fixture, expected, crds):
    path = pathlib.Path(__file__).parent / "fixtures" / fixture
    errors = [e for _, doc in validate.yaml_documents(path) for e in validate.validate_document(doc, crds)]
    assert any(expected in e for e in errors), errors


def spire_configs(cloud):
    config = OVERLAYS / cloud / "config"
    return hcl.parse((config / "server.conf").read_text()), hcl.parse((config / "agent.conf").read_text())


@pytest.mark.parametrize("cloud", CLOUDS)
def test_spire_configs_parse_and_use_only_documented_keys(cloud):
    server, agent = spire_configs(cloud)
    assert hcl.unknown_keys(server, "server") == []
    assert hcl.unknown_keys(agent, "agent") == []


def test_the_hcl_key_check_catches_unknown_keys():
    bad = hcl.parse('server {\n trust_domain = "a.org"\n trust_domian = "typo"\n}\nplugins {\n DataStor "sql" {}\n}\n')
    assert hcl.unknown_keys(bad, "server") == ["server.trust_domian", "plugins.DataStor"]


def bundle_endpoint_url(trust_domain):
    return f"https://spire-bundle.{trust_domain}:8443"


def cloud_facts(cloud, rendered):
    server, agent = spire_configs(cloud)
    s = hcl.block(server, "server")
    federation = s["federation"][0]
    federates = {td: peer for entry in federation["federates_with"] for td, peer in entry.items()}
    psat = server["plugins"][0]["NodeAttestor"][0]["k8s_psat"]["plugin_data"][0]["clusters"]
    docs = rendered[cloud]
    manager = next(
        yaml.safe_load(d["data"]["controller-manager-config.yaml"])
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("spire-controller-manager")
    )
    return {
        "td": s["trust_domain"],
        "bundle_port": federation["bundle_endpoint"][0]["port"],
        "federates": federates,
        "psat_clusters": set(psat.keys()) if isinstance(psat, dict) else {k for c in psat for k in c},
        "agent_td": hcl.block(agent, "agent")["trust_domain"],
        "agent_cluster": agent["plugins"][0]["NodeAttestor"][0]["k8s_psat"]["plugin_data"][0]["cluster"],
        "manager": manager,
        "cftds": [d["spec"] for d in docs if d["kind"] == "ClusterFederatedTrustDomain"],
        "spiffeid": next(d["spec"] for d in docs if d["kind"] == "ClusterSPIFFEID"),
        "lb_port": next(
            p["port"] for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "spire-bundle-endpoint" for p in d["spec"]["ports"]
        ),
        "istiod": yaml.safe_load((ISTIO / "values" / f"istiod-{cloud}.yaml").read_text()),
        "gateway": yaml.safe_load((ISTIO / "values" / f"eastwest-gateway-{cloud}.yaml").read_text()),
    }


def test_trust_domains_endpoints_and_federation_are_consistent_across_clouds(rendered):
    facts = {cloud: cloud_facts(cloud, rendered) for cloud in CLOUDS}
    domains = {cloud: f["td"] for cloud, f in facts.items()}
    assert len(set(domains.values())) == 3, "one trust domain per cloud"
    mesh_ids = set()
    for cloud, f in facts.items():
        peers = {td for c, td in domains.items() if c != cloud}
        # SPIRE server: federates_with every peer, at the peer's bundle endpoint, https_spiffe.
        assert set(f["federates"]) == peers
        for td, peer in f["federates"].items():
            assert peer["bundle_endpoint_url"] == bundle_endpoint_url(td)
            (profile,) = peer["bundle_endpoint_profile"]
            assert profile == {"https_spiffe": {"endpoint_spiffe_id": f"spiffe://{td}/spire/server"}}
        # The peers' URLs point at this cloud's exposed bundle endpoint port.
        assert f["bundle_port"] == f["lb_port"] == 8443
        # One ClusterFederatedTrustDomain per peer, matching the server config.
        assert sorted(c["trustDomain"] for c in f["cftds"]) == sorted(peers)
        for c in f["cftds"]:
            assert c["bundleEndpointURL"] == bundle_endpoint_url(c["trustDomain"])
            assert c["bundleEndpointProfile"] == {"type": "https_spiffe", "endpointSPIFFEID": f"spiffe://{c['trustDomain']}/spire/server"}
        # Workloads are registered as federated with every peer, in Istio's ID shape.
        assert sorted(f["spiffeid"]["federatesWith"]) == sorted(peers)
        assert f["spiffeid"]["spiffeIDTemplate"].endswith("/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}")
        # Agent, controller manager and node attestation agree on trust domain and cluster.
        cluster = f["manager"]["clusterName"]
        assert f["agent_td"] == f["manager"]["trustDomain"] == f["td"]
        assert f["psat_clusters"] == {cluster} and f["agent_cluster"] == cluster
        # Istio: same trust domain and cluster; the peers declared; gateway on the same network.
        istiod = f["istiod"]
        assert istiod["meshConfig"]["trustDomain"] == f["td"]
        assert sorted(istiod["meshConfig"]["trustDomainAliases"]) == sorted(peers)
        assert istiod["global"]["multiCluster"]["clusterName"] == cluster
        assert f["gateway"]["networkGateway"] == istiod["global"]["network"] == f["gateway"]["labels"]["topology.istio.io/network"]
        mesh_ids.add(istiod["global"]["meshID"])
    assert len(mesh_ids) == 1, "one mesh across the clouds"
    assert len({f["istiod"]["global"]["network"] for f in facts.values()}) == 3, "separate networks"


def istio_wasm_configurations():
    """(resource file, filter configuration JSON) for every wasm filter in istio/."""
    found = []
    for path in sorted(ISTIO.glob("envoyfilter-*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for patch in doc["spec"]["configPatches"]:
                value = patch["patch"]["value"]
                if str(value.get("name", "")).endswith(".wasm"):
                    found.append((path.name, value["typed_config"]["config"]["configuration"]["value"]))
    for path in sorted(ISTIO.glob("wasmplugin-*.yaml")):
        doc = yaml.safe_load(path.read_text())
        found.append((path.name, json.dumps(doc["spec"]["pluginConfig"])))
    return found


SHIPPED = {
    "envoyfilter-sidecar-http.yaml": "multi-cloud-policy.json",
    "envoyfilter-sidecar-network.yaml": "l4-identity-policy.json",
    "envoyfilter-gateway-http.yaml": "eastwest-terminating.json",
    "envoyfilter-gateway-sni.yaml": "eastwest-passthrough.json",
    "wasmplugin-oci.yaml": "multi-cloud-policy.json",
    "wasmplugin-file.yaml": "multi-cloud-policy.json",
    "wasmplugin-rego.yaml": "rego-federated.json",
}


def test_embedded_filter_configuration_is_the_shipped_file_and_validates(tmp_path):
    found = istio_wasm_configurations()
    assert sorted(name for name, _ in found) == sorted(SHIPPED)
    for name, configuration in found:
        shipped = EXAMPLES / SHIPPED[name]
        assert json.loads(configuration) == json.loads(shipped.read_text()), f"{name} differs from {shipped.name}"
        embedded = tmp_path / f"{name}.json"
        embedded.write_text(configuration)
        out = subprocess.run([BIN / "trustweave-policy", "validate", embedded], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def sds_defaults():
    """Defaults as the trustweave-sds binary itself reports them."""
    help_text = subprocess.run([BIN / "trustweave-sds", "--help"], capture_output=True, text=True, check=True).stdout
    defaults = {}
    for flag in ["sds-socket", "default-svid-name", "default-bundle-name", "socket-mode"]:
        match = re.search(rf"--{flag} <[^>]+>\s*\n(?:.*\n)*?\s*\[default: ([^\]]+)\]", help_text)
        assert match, f"--{flag} default not in --help"
        defaults[flag] = match.group(1)
    return defaults


@pytest.mark.parametrize("cloud", CLOUDS)
def test_injection_template_runs_trustweave_sds_as_istio_expects(cloud):
    values = yaml.safe_load((ISTIO / "values" / f"istiod-{cloud}.yaml").read_text())
    template = yaml.safe_load(values["sidecarInjectorWebhook"]["templates"]["trustweave"])
    (sds,) = [c for c in template["spec"]["initContainers"] if c["name"] == "trustweave-sds"]
    args = dict(a.lstrip("-").split("=", 1) for a in sds["args"])
    defaults = sds_defaults()
    # The socket istio-proxy checks for is the server's default; the names Istio asks for are not renamed.
    assert args["sds-socket"] == defaults["sds-socket"] == "/var/run/secrets/workload-spiffe-uds/socket"
    assert "default-svid-name" not in args and defaults["default-svid-name"] == "default"
    assert "default-bundle-name" not in args and defaults["default-bundle-name"] == "ROOTCA"
    mounts = {m["name"]: m["mountPath"] for m in sds["volumeMounts"]}
    assert mounts["workload-socket"] == str(pathlib.PurePosixPath(args["sds-socket"]).parent)
    assert args["workload-api-socket"] == f"unix://{mounts['spire-agent-socket']}/socket"
    # Native sidecar, ready before istio-proxy; hardened.
    assert sds["restartPolicy"] == "Always" and sds["startupProbe"]["httpGet"]["path"] == "/readyz"
    sc = sds["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["runAsUser"] == 1337 and args["allowed-uids"] == "1337", "istio-proxy's UID reaches the 0600 socket"
    assert {"requests", "limits"} <= set(sds["resources"])
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["spire-agent-socket"]["csi"]["driver"] == "csi.spiffe.io"
    # The template, applied to a pod, is a valid Pod.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "app", "labels": template["metadata"]["labels"]},
        "spec": {**template["spec"], "containers": [{"name": "istio-proxy", "image": "istio/proxyv2"}]},
    }
    assert validate.validate_document(pod, {}) == []


def test_dockerfile_builds_a_static_non_root_image():
    dockerfile = (REPO / "sds-server" / "Dockerfile").read_text()
    assert dockerfile.count("FROM ") >= 2, "multi-stage"
    assert "distroless/static" in dockerfile and "nonroot" in dockerfile
    assert "x86_64-unknown-linux-musl" in dockerfile


def envoy_filter_patches():
    for path in sorted(ISTIO.glob("envoyfilter-*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for patch in doc["spec"]["configPatches"]:
                yield path.name, patch


def test_http_and_network_filters_run_in_separate_vms():
    """One trapped VM must not take the other layer's traffic down."""
    vm_ids = {}
    for name, patch in envoy_filter_patches():
        value = patch["patch"]["value"]
        if str(value.get("name", "")).endswith(".wasm"):
            vm_ids.setdefault(value["typed_config"]["config"]["vm_config"]["vm_id"], []).append(name)
    assert vm_ids and all(len(files) == 1 for files in vm_ids.values()), vm_ids


def test_connection_managers_give_the_filter_the_certificate_and_normalized_paths():
    """Every HCM a trustweave HTTP filter runs behind forwards the peer's Cert= and normalizes paths."""
    merged = [(name, p["patch"]["value"]["typed_config"]) for name, p in envoy_filter_patches()
              if p["patch"]["operation"] == "MERGE"
              and p["match"].get("listener", {}).get("filterChain", {}).get("filter", {}).get("name") == "envoy.filters.network.http_connection_manager"]
    assert sorted(name for name, _ in merged) == ["envoyfilter-gateway-http.yaml", "envoyfilter-sidecar-hcm.yaml"]
    for name, hcm in merged:
        assert hcm["set_current_client_cert_details"] == {"uri": True, "cert": True}, name
        assert hcm["normalize_path"] and hcm["merge_slashes"], name
        assert hcm["path_with_escaped_slashes_action"] == "UNESCAPE_AND_FORWARD", name
    forward = {name: hcm["forward_client_cert_details"] for name, hcm in merged}
    assert forward == {"envoyfilter-gateway-http.yaml": "SANITIZE_SET", "envoyfilter-sidecar-hcm.yaml": "APPEND_FORWARD"}


def test_l4_sidecar_connects_upstream_only_after_the_filter_decided():
    (tcp,) = [p["patch"]["value"]["typed_config"] for name, p in envoy_filter_patches()
              if name == "envoyfilter-sidecar-network.yaml" and p["patch"]["operation"] == "MERGE"]
    assert tcp["upstream_connect_mode"] == "ON_DOWNSTREAM_DATA" and tcp["max_early_data_bytes"] > 0

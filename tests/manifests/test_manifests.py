"""manifests/ and istio/: valid against the real schemas, consistent across clouds,
and carrying exactly the filter configuration and SDS settings the product uses."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

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
    federates = {td: peer for entry in federation.get("federates_with", []) for td, peer in entry.items()}
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
        "spiffeid": next(d["spec"] for d in docs if d["kind"] == "ClusterSPIFFEID" and d["metadata"]["name"] == "istio-workloads"),
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
        # One source of federation: the server config names no peer (it would
        # override the resources and silently ignore their edits)…
        assert f["federates"] == {}
        # The peers' URLs point at this cloud's exposed bundle endpoint port.
        assert f["bundle_port"] == f["lb_port"] == 8443
        # …one ClusterFederatedTrustDomain per peer, at its bundle endpoint, https_spiffe.
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


def istio_wasm_configurations(root=ISTIO):
    """(resource file, filter configuration JSON) for every wasm filter in `root`."""
    found = []
    for path in sorted(root.glob("envoyfilter-*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for patch in doc["spec"]["configPatches"]:
                value = patch["patch"]["value"]
                if str(value.get("name", "")).endswith(".wasm"):
                    found.append((path.name, value["typed_config"]["config"]["configuration"]["value"]))
    for path in sorted(root.glob("wasmplugin-*.yaml")):
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


def flag_args(container):
    """`--flag=value` arguments of a container, as a dict."""
    return dict(a.lstrip("-").split("=", 1) for a in container["args"] if a.startswith("--") and "=" in a)


def dash_args(container):
    """`-flag value` argument pairs (the SPIFFE CSI driver's style), as a dict."""
    args = container["args"]
    return {args[i].lstrip("-"): args[i + 1] for i in range(0, len(args) - 1, 2)}


def host_path_of(pod_spec, container, path):
    """The host directory behind `path` in `container`, through its hostPath volume."""
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    for mount in container["volumeMounts"]:
        root = mount["mountPath"].rstrip("/")
        if path == root or path.startswith(root + "/"):
            return volumes[mount["name"]]["hostPath"]["path"] + path[len(root):]
    raise AssertionError(f"{path} is not mounted in {container['name']}")


def daemonset(docs, name):
    return next(d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"] == name)


@pytest.mark.parametrize("cloud", CLOUDS)
def test_node_sds_socket_reaches_every_pod_before_it_starts(cloud, rendered):
    """Node mode as Istio's SPIRE integration wires it: trustweave-sds's socket in
    a host directory, mounted by a CSI driver into pods where istio-proxy checks."""
    docs = rendered[cloud]
    values = yaml.safe_load((ISTIO / "values" / f"istiod-{cloud}.yaml").read_text())
    template = yaml.safe_load(values["sidecarInjectorWebhook"]["templates"]["trustweave"])
    defaults = sds_defaults()
    pod_dir = str(pathlib.PurePosixPath(defaults["sds-socket"]).parent)
    assert defaults["sds-socket"] == "/var/run/secrets/workload-spiffe-uds/socket"
    # Nothing runs in the pod but istio-proxy: no sidecar whose probes Istio rewrites.
    assert "initContainers" not in template["spec"]
    (proxy,) = template["spec"]["containers"]
    assert proxy["name"] == "istio-proxy"
    assert {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]} == {"workload-socket": pod_dir}
    (volume,) = template["spec"]["volumes"]
    assert volume["name"] == "workload-socket" and volume["csi"]["readOnly"] is True
    driver_name = volume["csi"]["driver"]

    # The CSI driver of that name mounts the host directory trustweave-sds binds in.
    assert any(d["kind"] == "CSIDriver" and d["metadata"]["name"] == driver_name for d in docs)
    (csi_ds,) = [
        d for d in docs
        if d["kind"] == "DaemonSet"
        for c in d["spec"]["template"]["spec"]["containers"]
        if c["name"] == "spiffe-csi-driver" and dash_args(c)["plugin-name"] == driver_name
    ]
    csi_spec = csi_ds["spec"]["template"]["spec"]
    csi = next(c for c in csi_spec["containers"] if c["name"] == "spiffe-csi-driver")
    served_dir = host_path_of(csi_spec, csi, dash_args(csi)["workload-api-socket-dir"])

    sds_ds = daemonset(docs, "trustweave-sds")
    sds_spec = sds_ds["spec"]["template"]["spec"]
    (sds,) = sds_spec["containers"]
    args = flag_args(sds)
    assert args["source"] == "delegated" and sds_spec["hostPID"] is True
    socket = pathlib.PurePosixPath(args["sds-socket"])
    assert socket.name == pathlib.PurePosixPath(defaults["sds-socket"]).name == "socket"
    assert host_path_of(sds_spec, sds, str(socket.parent)) == served_dir
    # istio-proxy's UID reaches the 0600 socket.
    assert args["allowed-uids"] == "1337" and sds["securityContext"]["runAsUser"] == 1337
    sc = sds["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= set(sds["resources"])
    assert sds["startupProbe"]["httpGet"]["path"] == "/readyz"

    # The agent's admin socket is the one trustweave-sds dials, outside the
    # Workload API socket's directory (which pods see), and names it a delegate.
    _, agent_conf = spire_configs(cloud)
    agent = hcl.block(agent_conf, "agent")
    admin_path = args["admin-socket"].removeprefix("unix://")
    agent_ds = daemonset(docs, "spire-agent")
    agent_spec = agent_ds["spec"]["template"]["spec"]
    (agent_container,) = agent_spec["containers"]
    assert host_path_of(sds_spec, sds, admin_path) == host_path_of(agent_spec, agent_container, agent["admin_socket_path"])
    workload_dir = str(pathlib.PurePosixPath(agent["socket_path"]).parent)
    assert not agent["admin_socket_path"].startswith(workload_dir + "/")
    namespace, account = sds_ds["metadata"]["namespace"], sds_spec["serviceAccountName"]
    own_id = f"spiffe://{agent['trust_domain']}/ns/{namespace}/sa/{account}"
    assert agent["authorized_delegates"] == [own_id]
    # …and trustweave-sds gets that ID from a ClusterSPIFFEID.
    (entry,) = [
        d["spec"] for d in docs
        if d["kind"] == "ClusterSPIFFEID"
        and d["spec"]["podSelector"]["matchLabels"].items() <= sds_ds["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert entry["spiffeIDTemplate"] == "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}"
    assert entry["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}

    # The gateways get the same template through their Helm values.
    gateway = yaml.safe_load((ISTIO / "values" / f"eastwest-gateway-{cloud}.yaml").read_text())
    assert "trustweave" in gateway["podAnnotations"]["inject.istio.io/templates"].split(",")
    # The template, applied to a pod, is a valid Pod.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "app", "labels": template["metadata"]["labels"]},
        "spec": {**template["spec"], "containers": [{**proxy, "image": "istio/proxyv2"}]},
    }
    assert validate.validate_document(pod, {}) == []


def test_dockerfile_builds_a_static_non_root_image():
    dockerfile = (REPO / "sds-server" / "Dockerfile").read_text()
    assert dockerfile.count("FROM ") >= 2, "multi-stage"
    assert "distroless/static" in dockerfile and "nonroot" in dockerfile
    # Multi-arch: each platform's musl target, chosen from buildx's TARGETARCH.
    assert "ARG TARGETARCH" in dockerfile
    for arch, target in [("amd64", "x86_64-unknown-linux-musl"), ("arm64", "aarch64-unknown-linux-musl")]:
        assert re.search(rf"{arch}\) echo {target}", dockerfile), arch
    assert "USER 1337:1337" in dockerfile


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
    for source in ["envoyfilter-sidecar-network.yaml", "envoyfilter-sidecar-tcp-rbac.yaml"]:
        (tcp,) = [p["patch"]["value"]["typed_config"] for name, p in envoy_filter_patches()
                  if name == source and p["patch"]["operation"] == "MERGE"]
        assert tcp["upstream_connect_mode"] == "ON_DOWNSTREAM_DATA" and tcp["max_early_data_bytes"] > 0, source


def selector(path):
    (doc,) = yaml.safe_load_all(path.read_text())
    return doc["spec"].get("selector", {}).get("matchLabels") or doc["spec"]["workloadSelector"]["labels"]


@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_install_path_enforces_the_caller_policy_on_tcp_chains(cloud):
    """A WasmPlugin is HTTP only: each path's pods also get a filter before tcp_proxy."""
    istiod = yaml.safe_load((ISTIO / "values" / f"istiod-{cloud}.yaml").read_text())
    trust_domain = istiod["meshConfig"]["trustDomain"]
    here = ISTIO / "clouds" / cloud
    tcp_for = {
        "wasmplugin-oci.yaml": here / "envoyfilter-sidecar-tcp-rbac.yaml",
        "wasmplugin-rego.yaml": here / "envoyfilter-sidecar-tcp-rbac.yaml",
        "wasmplugin-file.yaml": ISTIO / "envoyfilter-sidecar-network.yaml",
    }
    for plugin, tcp in tcp_for.items():
        (doc,) = yaml.safe_load_all((here / plugin).read_text())
        assert doc["spec"]["type"] == "HTTP", plugin
        # Every pod the HTTP plugin selects is selected for TCP too.
        assert selector(tcp).items() <= selector(here / plugin).items(), (plugin, tcp.name)
        inserted = [p for p in yaml.safe_load((tcp).read_text())["spec"]["configPatches"]
                    if p["patch"]["operation"] == "INSERT_BEFORE"]
        assert [p["match"]["context"] for p in inserted] == ["SIDECAR_INBOUND"], tcp.name
        assert inserted[0]["match"]["listener"]["filterChain"]["filter"]["name"] == "envoy.filters.network.tcp_proxy"
    # The RBAC copy is l4-identity-policy.json for this cloud: same trust domain, nothing else.
    l4 = json.loads((REPO / "filter" / "examples" / "l4-identity-policy.json").read_text())
    assert l4["default_action"] == "DENY" and l4["policies"] == [
        {"name": "same-trust-domain-tcp", "action": "ALLOW", "rules": [{"from": {"same_trust_domain": True}}]}]
    (rbac,) = [p["patch"]["value"]["typed_config"] for p in yaml.safe_load(tcp_for["wasmplugin-oci.yaml"].read_text())["spec"]["configPatches"]
               if p["patch"]["operation"] == "INSERT_BEFORE"]
    assert rbac["rules"] == {"action": "ALLOW", "policies": {"same-trust-domain-tcp": {
        "permissions": [{"any": True}],
        "principals": [{"authenticated": {"principal_name": {"prefix": f"spiffe://{trust_domain}/"}}}]}}}


def allows_egress(policy, port):
    """Whether a NetworkPolicy lets TCP `port` out to addresses outside the cluster."""
    for rule in policy["spec"].get("egress", []):
        ports = rule.get("ports")
        port_ok = ports is None or any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports)
        anywhere = "to" not in rule or any(peer.get("ipBlock", {}).get("cidr") == "0.0.0.0/0" for peer in rule["to"])
        if port_ok and anywhere:
            return True
    return False


@pytest.mark.parametrize("cloud", CLOUDS)
def test_mesh_network_policies_let_cross_cluster_and_registry_traffic_out(cloud, rendered):
    meshed = {
        d["metadata"]["name"] for d in rendered[cloud]
        if d["kind"] == "Namespace" and d["metadata"].get("labels", {}).get("istio-injection") == "enabled"
    }
    assert meshed, "a meshed namespace is shipped"
    policies = [
        d for d in rendered[cloud]
        if d["kind"] == "NetworkPolicy" and d["metadata"]["namespace"] in meshed and "Egress" in d["spec"]["policyTypes"]
    ]
    assert policies
    for policy in policies:
        name = policy["metadata"]["name"]
        # The remote clouds' east-west gateways (load-balancer addresses, outside the cluster).
        assert allows_egress(policy, 15443), f"{name} drops cross-network mTLS"
        # istio-agent pulling the WasmPlugin image (else FAIL_CLOSE denies everything).
        assert allows_egress(policy, 443), f"{name} blocks the wasm image pull"


@pytest.mark.parametrize("cloud", CLOUDS)
def test_east_west_gateway_is_reachable_and_exposes_only_what_multi_primary_needs(cloud):
    values = yaml.safe_load((ISTIO / "values" / f"eastwest-gateway-{cloud}.yaml").read_text())
    assert {p["port"] for p in values["service"]["ports"]} == {15021, 15443}
    annotations = values["service"].get("annotations", {})
    if cloud == "aws":
        # The AWS Load Balancer Controller provisions internal NLBs unless told otherwise.
        assert annotations["service.beta.kubernetes.io/aws-load-balancer-scheme"] == "internet-facing"
    if cloud == "gcp":
        assert annotations.get("networking.gke.io/load-balancer-type") != "Internal"
    if cloud == "azure":
        assert annotations.get("service.beta.kubernetes.io/azure-load-balancer-internal") != "true"


@pytest.mark.parametrize("cloud", CLOUDS)
def test_istio_system_carries_the_network_istiod_is_configured_with(cloud):
    istiod = yaml.safe_load((ISTIO / "values" / f"istiod-{cloud}.yaml").read_text())
    (namespace,) = [doc for _, doc in validate.yaml_documents(ISTIO / f"namespace-istio-system-{cloud}.yaml")]
    assert namespace["metadata"]["name"] == "istio-system"
    network = istiod["global"]["network"]
    assert namespace["metadata"]["labels"]["topology.istio.io/network"] == network
    gateway = yaml.safe_load((ISTIO / "values" / f"eastwest-gateway-{cloud}.yaml").read_text())
    assert gateway["labels"]["topology.istio.io/network"] == gateway["networkGateway"] == network


def test_tracing_names_a_provider_every_cloud_defines_and_samples_a_fraction():
    (telemetry,) = [doc for _, doc in validate.yaml_documents(ISTIO / "telemetry.yaml")]
    for tracing in telemetry["spec"]["tracing"]:
        assert 0 < tracing["randomSamplingPercentage"] < 100
        for provider in tracing["providers"]:
            for cloud in CLOUDS:
                mesh = yaml.safe_load((ISTIO / "values" / f"istiod-{cloud}.yaml").read_text())["meshConfig"]
                assert provider["name"] in {p["name"] for p in mesh["extensionProviders"]}, cloud


def test_the_wasm_image_is_the_layout_istio_loads():
    """Istio's fetcher takes an image whose last (tar+gzip) layer holds `plugin.wasm`."""
    lines = [
        line.split("#", 1)[0].strip()
        for line in (REPO / "filter" / "Dockerfile.wasm").read_text().splitlines()
    ]
    instructions = [line for line in lines if line]
    assert instructions[0] == "FROM scratch"
    (copy,) = [line for line in instructions if line.startswith(("COPY", "ADD"))]
    source, destination = copy.split()[1:]
    assert destination in {"plugin.wasm", "./plugin.wasm", "/plugin.wasm"}
    arg = next(line for line in instructions if line.startswith("ARG MODULE="))
    module = arg.split("=", 1)[1]
    built = REPO / source.replace("${MODULE}", module)
    assert built.parent == REPO / "target" / "wasm32-wasip1" / "wasm" and built.name == "trustweave_filter.wasm"
    oci = [doc for _, doc in validate.yaml_documents(ISTIO / "wasmplugin-oci.yaml")]
    assert all(doc["spec"]["url"].startswith("oci://") for doc in oci)
    assert "oras push" not in (REPO / "README.md").read_text(), "the single-layer recipe Istio refuses"


def test_federation_bootstrap_script_patches_the_resources_the_overlays_ship(rendered):
    """scripts/bootstrap-federation.sh patches `clusterfederatedtrustdomain <peer cloud>`."""
    script = (REPO / "scripts" / "bootstrap-federation.sh").read_text()
    assert 'patch clusterfederatedtrustdomain "$peer"' in script and "trustDomainBundle" in script
    for cloud in CLOUDS:
        names = {d["metadata"]["name"]: d["spec"]["trustDomain"] for d in rendered[cloud] if d["kind"] == "ClusterFederatedTrustDomain"}
        assert names == {peer: f"{peer}.company.com" for peer in CLOUDS if peer != cloud}


def wasm_files_loaded():
    """(resource, selector labels, file path) for every resource in istio/ that loads the module from a file."""
    loaded = []
    for path in sorted(ISTIO.glob("envoyfilter-*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            labels = doc["spec"].get("workloadSelector", {}).get("labels", {})
            for patch in doc["spec"]["configPatches"]:
                code = patch["patch"]["value"].get("typed_config", {}).get("config", {}).get("vm_config", {}).get("code", {})
                if "local" in code:
                    loaded.append((path.name, labels, code["local"]["filename"]))
    for path in sorted(ISTIO.glob("wasmplugin-*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc["spec"]["url"].startswith("file://"):
            loaded.append((path.name, doc["spec"]["selector"]["matchLabels"], doc["spec"]["url"].removeprefix("file://")))
    return loaded


@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_wasm_file_a_resource_loads_is_mounted_where_it_applies(cloud):
    values = yaml.safe_load((ISTIO / "values" / f"istiod-{cloud}.yaml").read_text())
    template = yaml.safe_load(values["sidecarInjectorWebhook"]["templates"]["trustweave-wasm-file"])
    template_labels = template["metadata"]["labels"]
    (proxy,) = template["spec"]["containers"]
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    mounted = {}
    for mount in proxy["volumeMounts"]:
        config_map = volumes[mount["name"]]["configMap"]
        mounted[mount["mountPath"]] = config_map
    loaded = wasm_files_loaded()
    assert len(loaded) >= 4
    for resource, labels, filename in loaded:
        # Scoped: only pods that carry the template's label (hence the mount) select it.
        assert labels and template_labels.items() <= {k: str(v) for k, v in labels.items()}.items(), resource
        directory = str(pathlib.PurePosixPath(filename).parent)
        assert directory in mounted, f"{resource} loads {filename}, which nothing mounts"
    # Gateways get the template too.
    gateway = yaml.safe_load((ISTIO / "values" / f"eastwest-gateway-{cloud}.yaml").read_text())
    assert "trustweave-wasm-file" in gateway["podAnnotations"]["inject.istio.io/templates"].split(",")


def test_per_cloud_filter_resources_are_rendered_from_istio_and_current():
    out = subprocess.run([sys.executable, REPO / "scripts" / "render-istio-clouds.py", "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("cloud", CLOUDS)
def test_each_cloud_installs_its_own_place_and_gateway(cloud, tmp_path):
    """One cloud's policy must not be installed everywhere: each names its own place and gateway."""
    istiod = yaml.safe_load((ISTIO / "values" / f"istiod-{cloud}.yaml").read_text())
    trust_domain = istiod["meshConfig"]["trustDomain"]
    gateway_values = yaml.safe_load((ISTIO / "values" / f"eastwest-gateway-{cloud}.yaml").read_text())
    # The gateway chart names the service account after the release (`name`).
    gateway = f"spiffe://{trust_domain}/ns/istio-system/sa/{gateway_values['name']}"
    found = istio_wasm_configurations(ISTIO / "clouds" / cloud)
    names = {name for name, _ in found}
    placed = {name for name, config in istio_wasm_configurations() if "local" in json.loads(config) or "trusted_gateways" in json.loads(config)}
    assert names == placed, "every resource that names a place or gateway has a per-cloud copy"
    for name, configuration in found:
        config = json.loads(configuration)
        place = config["trust_domains"][trust_domain]
        assert config["local"]["cloud"] == place["cloud"] == cloud, name
        assert config["local"]["region"] == place["region"], name
        assert config["trusted_gateways"] == [gateway], name
        path = tmp_path / f"{name}.json"
        path.write_text(configuration)
        out = subprocess.run([BIN / "trustweave-policy", "validate", path], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def pod_specs(docs):
    for d in docs:
        if d["kind"] in ("DaemonSet", "StatefulSet", "Deployment"):
            yield d, d["spec"]["template"]["spec"]


@pytest.mark.parametrize("cloud", CLOUDS)
def test_production_shape(cloud, rendered):
    docs = rendered[cloud]
    for workload, spec in pod_specs(docs):
        name = workload["metadata"]["name"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            image = container["image"]
            assert not image.endswith(":latest") and (":" in image.rsplit("/", 1)[-1] or "@sha256:" in image), f"{name}: {image}"
            assert {"requests", "limits"} <= set(container.get("resources", {})), f"{name}/{container['name']}"
            sc = container.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True and sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{container['name']}"
            if not sc.get("privileged"):
                assert sc.get("allowPrivilegeEscalation") is False, f"{name}/{container['name']}"
        if workload["kind"] == "DaemonSet":
            # Node agents run everywhere, before ordinary pods are preempted.
            assert spec["priorityClassName"] == "system-node-critical", name
            assert {"operator": "Exists"} in spec["tolerations"], name
    # SPIRE server: two replicas on different nodes, a shared datastore, a disruption budget.
    server_set = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "spire-server")
    spec = server_set["spec"]["template"]["spec"]
    assert server_set["spec"]["replicas"] >= 2
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" for t in anti)
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == "spire-server"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= server_set["spec"]["template"]["metadata"]["labels"].items()
    server, _ = spire_configs(cloud)
    datastore = server["plugins"][0]["DataStore"][0]["sql"]["plugin_data"][0]
    assert datastore["database_type"] in ("postgres", "mysql"), "replicas need a shared datastore"
    (container,) = [c for c in spec["containers"] if c["name"] == "spire-server"]
    variable = datastore["connection_string"].strip("${}")
    assert "-expandEnv" in container["args"]
    assert any(e["name"] == variable and "secretKeyRef" in e["valueFrom"] for e in container["env"])
    # The controller manager may patch its own webhook configuration only.
    role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "spire-server")
    for rule in role["rules"]:
        if "validatingwebhookconfigurations" in rule["resources"] and {"patch", "update"} & set(rule["verbs"]):
            assert rule.get("resourceNames") == ["spire-controller-manager-webhook"]
    # The agent as upstream runs it.
    agent = next(d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "spire-agent")["spec"]["template"]["spec"]
    assert agent["hostPID"] and agent["hostNetwork"] and agent["dnsPolicy"] == "ClusterFirstWithHostNet"


@pytest.mark.parametrize("cloud", CLOUDS)
def test_the_controller_manager_registers_trustweave_sds(cloud, rendered):
    f = cloud_facts(cloud, rendered)
    sds = daemonset(rendered[cloud], "trustweave-sds")
    assert sds["metadata"]["namespace"] not in f["manager"]["ignoreNamespaces"]


@pytest.mark.parametrize("cloud", CLOUDS)
def test_the_node_workload_map_is_never_on_the_pod_port(cloud, rendered):
    """/debug/workloads lists every PID, SPIFFE ID and serial of the node: the
    server serves it only on loopback, so the pod-reachable admin address must
    not be loopback-only by accident and the debug address must be loopback."""
    import ipaddress
    sds = daemonset(rendered[cloud], "trustweave-sds")
    (container,) = sds["spec"]["template"]["spec"]["containers"]
    flags = dict(a.lstrip("-").split("=", 1) for a in container["args"] if "=" in a)
    admin_host = flags["admin-addr"].rsplit(":", 1)[0]
    debug_host, debug_port = flags["debug-addr"].rsplit(":", 1)
    assert not ipaddress.ip_address(admin_host).is_loopback, "probes must reach /readyz"
    assert ipaddress.ip_address(debug_host).is_loopback
    ports = {p["containerPort"] for p in container["ports"]}
    assert int(debug_port) not in ports, "the debug port is not exposed"
    assert sds["spec"]["template"]["spec"].get("hostNetwork") is not True, \
        "with the host's network, loopback would be every host-network pod's"


@pytest.mark.parametrize("cloud", CLOUDS)
def test_each_cloud_offers_an_upstream_authority_and_nothing_else_differs(cloud, crds):
    overlay = OVERLAYS / f"{cloud}-upstream-ca"
    docs = validate.render_overlay(overlay)
    errors = [f"{d['kind']}/{d['metadata']['name']}: {e}" for d in docs for e in validate.validate_document(d, crds)]
    assert errors == []
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("spire-server")]
    upstream = hcl.parse(config_map["data"]["server.conf"])
    assert hcl.unknown_keys(upstream, "server") == []
    (authority,) = [p for p in upstream["plugins"][0].get("UpstreamAuthority", [])]
    assert set(authority) <= {"aws_pca", "gcp_cas", "cert-manager"}
    plain, _ = spire_configs(cloud)
    # The same server otherwise: trust domain, federation endpoint, datastore, attestation.
    for block in ("trust_domain", "federation", "socket_path", "data_dir"):
        assert hcl.block(upstream, "server")[block] == hcl.block(plain, "server")[block], block
    strip = lambda config: {k: v for k, v in config["plugins"][0].items() if k != "UpstreamAuthority"}
    assert strip(upstream) == strip(plain)

//! One Kubernetes cluster of the mesh with its own Istio control plane: an
//! apiserver ([`ControlPlane`]) with Istio's CRDs, our `istio/` resources
//! for its cloud (the "WasmPlugin, file" install of the README: the cloud's
//! `wasmplugin-file.yaml`, the sidecar and gateway EnvoyFilters, the
//! east-west Gateway), and istiod configured by our Helm values.
//!
//! Workloads are VMs ([`super::vm`]): each gets a Service selecting a
//! WorkloadEntry, as Istio's VM onboarding registers them, and a `Sidecar`
//! with explicit `captureMode: NONE` listeners, because this machine has no
//! iptables to redirect traffic into Envoy (a test-only resource: a real VM
//! runs `pilot-agent istio-iptables`; the README says so).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

use super::{Istiod, IstiodConfig};
use crate::kube::{self, ControlPlane};
use crate::mesh::netns::Site;

/// The port each workload's service listens on (the app behind the sidecar: [`APP_PORT`]).
pub const SERVICE_PORT: u16 = 8080;
/// Where the app listens, on the VM's loopback.
pub const APP_PORT: u16 = 8081;

/// The east-west gateway's service account (the `istio/gateway` chart's name).
pub const GATEWAY_SERVICE_ACCOUNT: &str = "istio-eastwestgateway";
/// The remote secret's reader (istioctl's name).
const READER: &str = "istio-reader-service-account";

/// Our `istio/` files a cluster of `cloud` gets, in the order they are applied.
pub fn install_files(cloud: &str) -> Vec<PathBuf> {
    let istio = Path::new(env!("CARGO_MANIFEST_DIR")).join("../istio");
    let mut files = vec![istio.join(format!("namespace-istio-system-{cloud}.yaml"))];
    files.extend(
        [
            "envoyfilter-sidecar-hcm.yaml",
            "envoyfilter-sidecar-network.yaml",
            "eastwest-gateway.yaml",
            "envoyfilter-gateway-sni.yaml",
            "envoyfilter-gateway-mss.yaml",
        ]
        .iter()
        .map(|f| istio.join(f)),
    );
    files.push(
        istio
            .join("clouds")
            .join(cloud)
            .join("wasmplugin-file.yaml"),
    );
    files
}

/// A running cluster: apiserver, resources, istiod.
pub struct Cluster {
    /// The cloud (`aws`).
    pub cloud: String,
    /// Its apiserver.
    pub kube: ControlPlane,
    /// Its istiod.
    pub istiod: Istiod,
    dir: PathBuf,
}

impl Cluster {
    /// Starts the apiserver and istiod of `cloud` in `site` on `address`, with our resources applied.
    pub async fn start(
        cloud: &str,
        site: &Site,
        address: IpAddr,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let kube = ControlPlane::start(site, address, &dir.join("kube")).await?;
        kube.apply_crds(&kube::istio_crds()?).await?;
        for file in install_files(cloud) {
            kube.apply(&file).await?;
        }
        let config = IstiodConfig::from_values(cloud)?;
        let istiod = Istiod::start(site, address, &dir.join("istiod"), &kube, config)
            .await
            .with_context(|| format!("istiod of {cloud}"))?;
        Ok(Self {
            cloud: cloud.to_string(),
            kube,
            istiod,
            dir: dir.to_path_buf(),
        })
    }

    /// Registers a VM workload: its namespace and service account, a Service
    /// `name` on [`SERVICE_PORT`], its WorkloadEntry at `ip` with `labels`,
    /// and the `Sidecar` that binds its listeners without traffic capture.
    pub async fn add_workload(
        &self,
        name: &str,
        namespace: &str,
        service_account: &str,
        ip: IpAddr,
        labels: &BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let network = &self.istiod.config.network;
        let documents = [
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": service_account, "namespace": namespace}}),
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
                   "spec": {"selector": {"app": name},
                            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": SERVICE_PORT}]}}),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                   "metadata": {"name": format!("{name}-vm"), "namespace": namespace},
                   "spec": {"address": ip.to_string(), "labels": labels,
                            "serviceAccount": service_account, "network": network}}),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
                   "metadata": {"name": name, "namespace": namespace},
                   "spec": {"workloadSelector": {"labels": {"app": name}},
                            "ingress": [{"port": {"number": SERVICE_PORT, "protocol": "HTTP", "name": "http"},
                                         "bind": ip.to_string(),
                                         "defaultEndpoint": format!("127.0.0.1:{APP_PORT}"),
                                         "captureMode": "NONE"}],
                            "egress": [{"port": {"number": SERVICE_PORT, "protocol": "HTTP", "name": "http"},
                                        "bind": "127.0.0.1",
                                        "captureMode": "NONE",
                                        "hosts": ["*/*"]}]}}),
        ];
        self.apply_documents(&format!("workload-{namespace}-{name}"), &documents)
            .await
    }

    /// The east-west gateway's Service (as the `istio/gateway` chart with our
    /// `eastwest-gateway-<cloud>.yaml` values creates it) and service account;
    /// its load balancer's address, which no cloud controller sets here, is
    /// written into its status: that address is how the other clusters'
    /// istiods learn where this network's gateway is.
    pub async fn add_gateway(&self, ip: IpAddr) -> anyhow::Result<()> {
        let network = &self.istiod.config.network;
        let documents = [
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": GATEWAY_SERVICE_ACCOUNT, "namespace": "istio-system"}}),
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "istio-eastwestgateway", "namespace": "istio-system",
                                "labels": {"app": "istio-eastwestgateway", "istio": "eastwestgateway",
                                           "topology.istio.io/network": network}},
                   "spec": {"type": "LoadBalancer",
                            "selector": {"app": "istio-eastwestgateway", "istio": "eastwestgateway"},
                            "ports": [{"name": "status-port", "port": 15021, "targetPort": 15021},
                                      {"name": "tls", "port": 15443, "targetPort": 15443}]}}),
        ];
        self.apply_documents("eastwest-gateway", &documents).await?;
        let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}});
        self.kube
            .kubectl(&[
                "patch",
                "service",
                "istio-eastwestgateway",
                "-n",
                "istio-system",
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ])
            .await?;
        Ok(())
    }

    /// The labels of the east-west gateway proxy (the chart's, and the file module's).
    pub fn gateway_labels(&self) -> BTreeMap<String, String> {
        [
            ("app", "istio-eastwestgateway"),
            ("istio", "eastwestgateway"),
            (
                "topology.istio.io/network",
                self.istiod.config.network.as_str(),
            ),
            ("spiffe.io/spire-managed-identity", "true"),
            ("trustweave.io/wasm-file", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Lets this cluster's istiod read `remote`'s apiserver, as `istioctl
    /// create-remote-secret` does: a read-only service account in `remote`
    /// (`istio-reader-service-account`), and in this cluster a Secret labelled
    /// `istio/multiCluster: "true"` holding a kubeconfig with its token, keyed
    /// and annotated by `remote`'s cluster ID.
    pub async fn add_remote(&self, remote: &Cluster) -> anyhow::Result<()> {
        let reader = [
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": READER, "namespace": "istio-system"}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": "istio-reader-clusterrole-istio-system"},
                   "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["get", "list", "watch"]},
                             {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                             {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": "istio-reader-clusterrole-istio-system"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                               "name": "istio-reader-clusterrole-istio-system"},
                   "subjects": [{"kind": "ServiceAccount", "name": READER, "namespace": "istio-system"}]}),
        ];
        remote.apply_documents("istio-reader", &reader).await?;
        let token = remote
            .kube
            .kubectl(&[
                "create",
                "token",
                READER,
                "-n",
                "istio-system",
                "--duration",
                "24h",
            ])
            .await?;
        let id = &remote.istiod.config.cluster_id;
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": format!("istio-remote-secret-{id}"), "namespace": "istio-system",
                         "labels": {"istio/multiCluster": "true"},
                         "annotations": {"networking.istio.io/cluster": id}},
            "stringData": {id.as_str(): remote.kube.kubeconfig_for_token(token.trim())}});
        self.apply_documents(&format!("remote-secret-{id}"), &[secret])
            .await
    }

    /// Applies `documents` (written to `<dir>/<name>.yaml` first, so an error names a file).
    pub async fn apply_documents(
        &self,
        name: &str,
        documents: &[serde_json::Value],
    ) -> anyhow::Result<()> {
        let mut text = String::new();
        for document in documents {
            text.push_str("---\n");
            text.push_str(&serde_yaml_ng::to_string(document)?);
        }
        let file = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&file, text)?;
        self.kube.apply(&file).await?;
        Ok(())
    }

    /// The labels of a sidecar VM `name` that gets our filter: Istio's mTLS
    /// label, SPIRE-managed identity, and the file-based module.
    pub fn sidecar_labels(name: &str) -> BTreeMap<String, String> {
        [
            ("app", name),
            ("security.istio.io/tlsMode", "istio"),
            ("spiffe.io/spire-managed-identity", "true"),
            ("trustweave.io/wasm-file", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

//! Our manifests on a real kube-apiserver (with etcd; no nodes): Istio's CRDs
//! and the SPIRE controller manager's, then every overlay under
//! `manifests/overlays/` of one cloud and every file under `istio/` and
//! `istio/clouds/<cloud>/`, each applied server-side with strict field
//! validation. What offline schema checks cannot see is checked here: CEL
//! rules, pruning of unknown fields, namespaces that must exist, the size of
//! Istio's CRDs (client-side apply would overflow the annotation limit).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use trustweave_e2e::kube::{self, ControlPlane};
use trustweave_e2e::mesh::netns::Site;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Each test's apiserver on its own loopback address (tests run side by side).
async fn control_plane(test: &str, octet: u8) -> (tempfile::TempDir, ControlPlane) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("tw-kube-{test}-"))
        .tempdir_in("/tmp")
        .expect("a directory");
    let address = IpAddr::V4(Ipv4Addr::new(127, 76, octet, 5));
    let plane = ControlPlane::start(&Site::Host, address, dir.path())
        .await
        .expect("etcd and kube-apiserver start");
    let crds = [
        kube::istio_crds().expect("Istio's CRDs"),
        repo().join("tests/manifests/schemas/spire.spiffe.io_clusterspiffeids.yaml"),
        repo().join("tests/manifests/schemas/spire.spiffe.io_clusterfederatedtrustdomains.yaml"),
        repo().join("tests/manifests/schemas/spire.spiffe.io_clusterstaticentries.yaml"),
    ];
    for crd in &crds {
        plane.apply_crds(crd).await.expect("CRDs accepted");
    }
    (dir, plane)
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// `rendered` (a multi-document YAML stream) split into its webhook configurations and the rest.
fn split_webhooks(rendered: &str) -> (String, String) {
    let (mut hooks, mut rest) = (String::new(), String::new());
    for document in rendered.split("\n---\n") {
        let is_hook = document.lines().any(|l| {
            l == "kind: ValidatingWebhookConfiguration" || l == "kind: MutatingWebhookConfiguration"
        });
        let out = if is_hook { &mut hooks } else { &mut rest };
        out.push_str("---\n");
        out.push_str(document);
        out.push('\n');
    }
    (hooks, rest)
}

async fn applies_every_resource_of(cloud: &str, octet: u8) {
    let (dir, plane) = control_plane(cloud, octet).await;
    // The overlays (the plain one and the upstream-CA variant), rendered by the same kubectl.
    // Their webhook configurations go last: nothing serves them here (no
    // spire-controller-manager runs), and once stored the apiserver would call
    // them for every later ClusterSPIFFEID.
    let mut webhooks = Vec::new();
    for overlay in [cloud.to_string(), format!("{cloud}-upstream-ca")] {
        let source = repo().join("manifests/overlays").join(&overlay);
        let rendered = plane
            .kubectl(&["kustomize", &source.to_string_lossy()])
            .await
            .expect("the overlay renders");
        let (hooks, rest) = split_webhooks(&rendered);
        let file = dir.path().join(format!("overlay-{overlay}.yaml"));
        std::fs::write(&file, rest).expect("write");
        plane.apply(&file).await.expect("the overlay is accepted");
        if !hooks.is_empty() {
            let file = dir.path().join(format!("overlay-{overlay}-webhooks.yaml"));
            std::fs::write(&file, hooks).expect("write");
            webhooks.push(file);
        }
    }
    // istio/: this cloud's istio-system namespace first (it carries the network label),
    // then every resource file (the other clouds' namespace files excepted), then the cloud's copies.
    let istio = repo().join("istio");
    let own_namespace = istio.join(format!("namespace-istio-system-{cloud}.yaml"));
    plane.apply(&own_namespace).await.expect("istio-system");
    for file in yaml_files(&istio) {
        let name = file
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        if name.starts_with("namespace-istio-system-") {
            continue;
        }
        plane.apply(&file).await.expect("accepted");
    }
    for file in yaml_files(&istio.join("clouds").join(cloud)) {
        plane.apply(&file).await.expect("accepted");
    }
    for file in &webhooks {
        plane
            .apply(file)
            .await
            .expect("the webhook configurations are accepted");
    }
    // What was applied is what is stored: the network label, the filter resources in istio-system.
    let namespace = plane
        .get_json(&["namespace", "istio-system"])
        .await
        .expect("istio-system");
    assert_eq!(
        namespace["metadata"]["labels"]["topology.istio.io/network"],
        format!("network-{cloud}")
    );
    let plugins = plane
        .get_json(&["wasmplugins.extensions.istio.io", "-n", "istio-system"])
        .await
        .expect("WasmPlugins");
    let names: Vec<&str> = plugins["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert!(names.contains(&"wasmplugin-file"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_resources_are_accepted_by_a_real_apiserver() {
    applies_every_resource_of("aws", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_resources_are_accepted_by_a_real_apiserver() {
    applies_every_resource_of("gcp", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_resources_are_accepted_by_a_real_apiserver() {
    applies_every_resource_of("azure", 3).await;
}

/// A refused resource fails with the apiserver's message, naming the file and the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apiserver_names_the_file_and_field_it_refuses() {
    let (_dir, plane) = control_plane("refused", 4).await;
    let fixtures = repo().join("tests/manifests/fixtures");
    plane
        .apply(&repo().join("istio/namespace-istio-system-aws.yaml"))
        .await
        .expect("istio-system");
    for (fixture, field) in [
        // Strict field validation (without it the field would be pruned silently).
        ("bad-crd-unknown-field.yaml", "bundleEndpointUrl"),
        ("bad-istio-unknown-field.yaml", "hostz"),
        // A CEL rule of Istio's CRD: only a real apiserver evaluates it.
        (
            "bad-istio-cel.yaml",
            "only one of targetRefs or selector can be set",
        ),
    ] {
        let path = fixtures.join(fixture);
        let error = format!("{:#}", plane.apply(&path).await.expect_err(fixture));
        assert!(error.contains(fixture), "{error}");
        assert!(error.contains(field), "{fixture}: {error}");
    }
}

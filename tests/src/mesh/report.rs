//! Report sections both demos print (`make demo`, `make demo-istio`).

use std::net::SocketAddr;
use std::path::Path;

use super::spire::CloudSpire;

/// Cloud `name`'s first `federation refresh` of each peer's bundle endpoint, a line each.
pub fn print_federation(name: &str, spire: &CloudSpire) {
    if spire.refreshes.is_empty() {
        println!("  {name:<6} ← nobody");
    }
    for refresh in &spire.refreshes {
        println!(
            "  {:<6} ← {:<19} {:<28} {}",
            name,
            refresh.trust_domain,
            refresh.url,
            match &refresh.result {
                Ok(()) => "refreshed".to_string(),
                Err(e) => format!("FAILED: {e}"),
            }
        );
    }
}

/// What cloud `name`'s node trustweave-sds (`sds_bin`, admin on `admin`)
/// serves its Envoys: `trustweave-sds inspect --workloads`, indented.
pub async fn print_inspect(sds_bin: &Path, name: &str, admin: SocketAddr) -> anyhow::Result<()> {
    println!("  [{name}]");
    let inspect = tokio::process::Command::new(sds_bin)
        .args(["inspect", "--workloads", "--admin-addr"])
        .arg(admin.to_string())
        .output()
        .await?;
    for line in String::from_utf8_lossy(&inspect.stdout).lines() {
        println!("    {line}");
    }
    Ok(())
}

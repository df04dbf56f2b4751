//! What a certificate's URI SANs prove: a workload identity (an X509-SVID's
//! one SPIFFE ID with a path), or why they prove none. Below both
//! [`super::certificate`] (finding the certificate) and [`super::identity`]
//! (resolving the caller).

use super::spiffe_id::SpiffeId;

/// What one verified certificate says about identity: its URI SANs, in order,
/// or why they could not be read (which yields no identity).
pub type CertSans = Result<Vec<String>, String>;

/// What a certificate proves: a workload identity, or why it proves none.
pub type Identity = Result<SpiffeId, String>;

/// The workload identity of a certificate: exactly one URI SAN, a SPIFFE ID with a path.
pub fn workload_identity(sans: &CertSans) -> Identity {
    let sans = sans.as_ref().map_err(Clone::clone)?;
    let [only] = sans.as_slice() else {
        return Err(format!(
            "certificate has {} URI SANs; exactly one is required",
            sans.len()
        ));
    };
    let id = SpiffeId::parse(only).map_err(|e| format!("URI SAN is not a SPIFFE ID: {e}"))?;
    if id.path().is_empty() {
        return Err(format!(
            "{id} names a trust domain, not a workload (an X509-SVID's ID has a path)"
        ));
    }
    Ok(id)
}

//! SPIFFE Workload API messages (X.509 part), defined with prost derives from
//! the field numbers published in the SPIFFE Workload API specification.

use std::collections::HashMap;

/// Request for the workload's X.509-SVIDs (no fields).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct X509SvidRequest {}

/// The workload's X.509-SVIDs, CRLs and federated bundles.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct X509SvidResponse {
    /// SVIDs; the first is the default.
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    /// DER CRLs.
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub crl: Vec<Vec<u8>>,
    /// Federated bundles: trust domain ID → concatenated DER roots.
    #[prost(map = "string, bytes", tag = "3")]
    pub federated_bundles: HashMap<String, Vec<u8>>,
}

/// One X.509-SVID.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct X509Svid {
    /// The SPIFFE ID.
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    /// Concatenated DER certificates, leaf first.
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    /// PKCS#8 DER private key.
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    /// Concatenated DER roots of the SVID's own trust domain.
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    /// Optional operator hint.
    #[prost(string, tag = "5")]
    pub hint: String,
}

/// Request for X.509 bundles (no fields).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct X509BundlesRequest {}

/// Every X.509 bundle the workload trusts.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct X509BundlesResponse {
    /// DER CRLs.
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub crl: Vec<Vec<u8>>,
    /// Trust domain ID → concatenated DER roots.
    #[prost(map = "string, bytes", tag = "2")]
    pub bundles: HashMap<String, Vec<u8>>,
}

//! Configuration errors, each naming its field (shared by [`super::config`]
//! and the Rego compiler, below both).

/// A configuration error, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// Path of the field, e.g. `policies[0].rules[1].to.paths[2]`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// Every error found in one configuration (never empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("; "))
    }
}

impl std::error::Error for ConfigErrors {}

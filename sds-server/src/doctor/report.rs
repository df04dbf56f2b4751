//! The doctor's findings: one row per link checked, with what is wrong and
//! the command that fixes it; a table for people, JSON for automation.

use serde::Serialize;

/// The state of one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Holds what its upstream holds.
    InStep,
    /// Works.
    Ok,
    /// Holds other roots than its upstream.
    Stale,
    /// Should hold something and holds nothing.
    Missing,
    /// Federated one way only.
    OneSided,
    /// Cannot be reached (or read).
    Unreachable,
    /// Reached, but its certificate fails the check a peer makes.
    Untrusted,
    /// A call would be refused here.
    Refused,
    /// No MSS clamp: segments exceed the path MTU.
    NoClamp,
}

impl Status {
    /// Whether this breaks (or will break) cross-cloud calls.
    pub fn is_broken(self) -> bool {
        !matches!(self, Self::InStep | Self::Ok)
    }

    fn label(self) -> &'static str {
        match self {
            Self::InStep => "in step",
            Self::Ok => "ok",
            Self::Stale => "STALE",
            Self::Missing => "MISSING",
            Self::OneSided => "ONE-SIDED",
            Self::Unreachable => "UNREACHABLE",
            Self::Untrusted => "UNTRUSTED",
            Self::Refused => "REFUSED",
            Self::NoClamp => "NO CLAMP",
        }
    }
}

/// One link checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What holds or serves (`spire-server aws.company.com`, `envoy aws/node-1/collector`).
    pub holder: String,
    /// The trust domain concerned (or the subject of the check).
    pub subject: String,
    /// Its state.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to run or change, when broken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    /// A check.
    pub fn new(holder: &str, subject: &str, status: Status, detail: impl Into<String>) -> Self {
        Self {
            holder: holder.to_string(),
            subject: subject.to_string(),
            status,
            detail: detail.into(),
            fix: None,
        }
    }

    /// With a fix.
    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// Everything checked.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// The checks, in the order made.
    pub checks: Vec<Check>,
    /// Whether anything is broken.
    pub broken: bool,
}

impl Report {
    /// A report of `checks`.
    pub fn new(checks: Vec<Check>) -> Self {
        let broken = checks.iter().any(|c| c.status.is_broken());
        Self { checks, broken }
    }

    /// The broken checks.
    pub fn broken_checks(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status.is_broken())
    }

    /// A table: status, holder, subject, detail; each fix under its row.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let width = |f: fn(&Check) -> usize, title: usize| {
            self.checks.iter().map(f).max().unwrap_or(0).max(title)
        };
        let status_w = width(|c| c.status.label().len(), 6);
        let holder_w = width(|c| c.holder.chars().count(), 6);
        let subject_w = width(|c| c.subject.chars().count(), 7);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:status_w$}  {:holder_w$}  {:subject_w$}  DETAIL",
            "STATUS", "HOLDER", "SUBJECT"
        );
        for check in &self.checks {
            let _ = writeln!(
                out,
                "{:status_w$}  {:holder_w$}  {:subject_w$}  {}",
                check.status.label(),
                check.holder,
                check.subject,
                check.detail
            );
            if let Some(fix) = &check.fix {
                let _ = writeln!(out, "{:status_w$}  fix: {fix}", "");
            }
        }
        let broken = self.broken_checks().count();
        let _ = writeln!(
            out,
            "\n{} checks, {}",
            self.checks.len(),
            if broken == 0 {
                "nothing broken".to_string()
            } else {
                format!("{broken} broken")
            }
        );
        out
    }
}

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

/// One row of the table.
struct Row<'a> {
    status: Status,
    holder: &'a str,
    subject: String,
    detail: &'a str,
    fix: Option<&'a str>,
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

    fn rows(&self) -> Vec<Row<'_>> {
        let mut rows: Vec<Row<'_>> = Vec::new();
        for check in &self.checks {
            if let Some(last) = rows.last_mut() {
                if !check.status.is_broken()
                    && last.status == check.status
                    && last.holder == check.holder
                    && last.detail == check.detail
                {
                    last.subject.push_str(", ");
                    last.subject.push_str(&check.subject);
                    continue;
                }
            }
            rows.push(Row {
                status: check.status,
                holder: &check.holder,
                subject: check.subject.clone(),
                detail: &check.detail,
                fix: check.fix.as_deref(),
            });
        }
        rows
    }

    /// The broken checks.
    pub fn broken_checks(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status.is_broken())
    }

    /// A table: status, holder, subject, detail; each fix under its row.
    /// Consecutive healthy checks of one holder share a row (their subjects
    /// joined); JSON keeps every check.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let rows = self.rows();
        let width = |f: fn(&Row<'_>) -> usize, title: usize| {
            rows.iter().map(f).max().unwrap_or(0).max(title)
        };
        let status_w = width(|r| r.status.label().len(), 6);
        let holder_w = width(|r| r.holder.chars().count(), 6);
        let subject_w = width(|r| r.subject.chars().count(), 7);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:status_w$}  {:holder_w$}  {:subject_w$}  DETAIL",
            "STATUS", "HOLDER", "SUBJECT"
        );
        for row in &rows {
            let _ = writeln!(
                out,
                "{:status_w$}  {:holder_w$}  {:subject_w$}  {}",
                row.status.label(),
                row.holder,
                row.subject,
                row.detail
            );
            if let Some(fix) = row.fix {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_checks_of_one_holder_share_a_row_and_fixes_follow_their_row() {
        let report = Report::new(vec![
            Check::new("envoy a", "x.test", Status::InStep, "1 root(s)"),
            Check::new("envoy a", "y.test", Status::InStep, "1 root(s)"),
            Check::new("envoy a", "z.test", Status::Stale, "lacks root").fix("refresh"),
        ]);
        let text = report.to_text();
        assert!(
            text.contains("envoy a  x.test, y.test  1 root(s)"),
            "{text}"
        );
        assert!(text.contains("STALE    envoy a  z.test"), "{text}");
        assert!(text.contains("fix: refresh"), "{text}");
        assert!(text.ends_with("3 checks, 1 broken\n"), "{text}");
        assert!(report.broken);
    }
}

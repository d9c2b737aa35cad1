//! The doctor's report: one verdict per rule, as a table for people and as JSON (the field
//! names are the `--json` contract).

use std::fmt::Write as _;

use serde::Serialize;

use crate::relying_party::Target;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// One rule's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// The rule ID in relying-party-rules.md.
    pub rule: &'static str,
    pub check: String,
    pub status: Status,
    pub observed: String,
    /// The relying parties this verdict is about; empty means all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub issuer: String,
    /// What must be said before anything else: the one failure that explains every refused
    /// token (a signing key that is not public yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headline: Option<String>,
    pub findings: Vec<Finding>,
    /// The AWS thumbprint of the JWKS host (A-8b).
    pub thumbprint: Option<String>,
    /// The token's `sub`: what a trust policy's `:sub` condition must say.
    pub subject: Option<String>,
}

impl Report {
    pub(crate) fn new(issuer: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            headline: None,
            findings: Vec::new(),
            thumbprint: None,
            subject: None,
        }
    }

    pub fn failed(&self) -> bool {
        self.findings.iter().any(|f| f.status == Status::Fail)
    }

    pub(super) fn add(
        &mut self,
        rule: &'static str,
        check: impl Into<String>,
        status: Status,
        observed: impl Into<String>,
    ) {
        self.add_for(rule, check, status, observed, &[]);
    }

    pub(super) fn add_for(
        &mut self,
        rule: &'static str,
        check: impl Into<String>,
        status: Status,
        observed: impl Into<String>,
        targets: &[Target],
    ) {
        self.findings.push(Finding {
            rule,
            check: check.into(),
            status,
            observed: observed.into(),
            targets: targets.iter().map(|t| t.name()).collect(),
        });
    }

    pub(super) fn pass_or(
        &mut self,
        ok: bool,
        rule: &'static str,
        check: &str,
        bad: Status,
        observed: impl Into<String>,
    ) {
        self.add(rule, check, if ok { Status::Pass } else { bad }, observed);
    }

    /// The table for people.
    pub fn table(&self) -> String {
        let mut out = format!("oidc-edge check {}\n", self.issuer);
        if let Some(headline) = &self.headline {
            let _ = writeln!(out, "{headline}");
        }
        for f in &self.findings {
            let status = match f.status {
                Status::Pass => "pass",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            let targets = if f.targets.is_empty() {
                String::new()
            } else {
                format!(" [{}]", f.targets.join(","))
            };
            let _ = writeln!(
                out,
                "{status:<5} {:<6} {}{targets}: {}",
                f.rule, f.check, f.observed
            );
        }
        if let Some(thumbprint) = &self.thumbprint {
            let _ = writeln!(out, "AWS thumbprint: {thumbprint}");
        }
        if let Some(subject) = &self.subject {
            let _ = writeln!(out, "token subject (trust policy :sub): {subject}");
        }
        let fails = self
            .findings
            .iter()
            .filter(|f| f.status == Status::Fail)
            .count();
        let warns = self
            .findings
            .iter()
            .filter(|f| f.status == Status::Warn)
            .count();
        let _ = writeln!(
            out,
            "{} checks: {fails} failed, {warns} warnings",
            self.findings.len()
        );
        out
    }
}

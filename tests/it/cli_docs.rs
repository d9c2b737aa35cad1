//! `oidc-edge man` and `oidc-edge completions`: the generated man pages render under man-db
//! and groff without warnings and list every subcommand; bash completes a subcommand from the
//! generated script; an unknown shell is a usage error.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::process::run;
use crate::support::{Scratch, bin};

/// Every page `oidc-edge man DIR` writes: the main page and one per (nested) subcommand.
const PAGES: &[&str] = &[
    "oidc-edge.1",
    "oidc-edge-serve.1",
    "oidc-edge-check-config.1",
    "oidc-edge-healthcheck.1",
    "oidc-edge-check.1",
    "oidc-edge-render.1",
    "oidc-edge-publish.1",
    "oidc-edge-push.1",
    "oidc-edge-trust.1",
    "oidc-edge-rotation.1",
    "oidc-edge-rotation-status.1",
    "oidc-edge-aws.1",
    "oidc-edge-aws-provider.1",
    "oidc-edge-aws-trust-policy.1",
    "oidc-edge-completions.1",
    "oidc-edge-man.1",
];

/// The top-level subcommands, each of which the main page must list.
const SUBCOMMANDS: &[&str] = &[
    "serve",
    "check-config",
    "healthcheck",
    "check",
    "render",
    "publish",
    "push",
    "trust",
    "rotation",
    "aws",
    "completions",
    "man",
];

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `page` as man-db renders it, 80 columns, no pager; fails on any warning.
fn man_l(page: &Path) -> String {
    let out = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .output()
        .expect("run man (man-db)");
    assert!(
        out.status.success(),
        "man -l {}: {}",
        page.display(),
        stderr(&out)
    );
    assert_eq!(stderr(&out), "", "man -l {}", page.display());
    stdout(&out)
}

/// groff's own check, every warning enabled: the page is well-formed roff.
fn groff_warnings(page: &Path) -> String {
    let out = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(page)
        .output()
        .expect("run groff");
    assert!(
        out.status.success(),
        "groff {}: {}",
        page.display(),
        stderr(&out)
    );
    stderr(&out)
}

/// The command a rendered page's NAME section names: its first line is `NAME - summary`
/// (man-db justifies the line, so the spaces around `-` vary).
fn name_line(rendered: &str) -> Option<&str> {
    let mut lines = rendered.lines().skip_while(|line| *line != "NAME");
    let first = lines.nth(1)?;
    let mut words = first.split_whitespace();
    let name = words.next()?;
    (words.next()? == "-").then_some(name)
}

#[test]
fn man_writes_a_page_per_subcommand_that_man_renders() {
    let dir = Scratch::new();
    let out = run(&["man", dir.path("").to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", stderr(&out));

    let mut written: Vec<String> = std::fs::read_dir(dir.path(""))
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .filter(|name| name.ends_with(".1"))
        .collect();
    written.sort();
    let mut expected: Vec<String> = PAGES.iter().map(|p| (*p).to_owned()).collect();
    expected.sort();
    assert_eq!(written, expected);
    // It names each file it wrote, one per line.
    assert_eq!(
        stdout(&out).lines().count(),
        PAGES.len(),
        "{}",
        stdout(&out)
    );

    for page in PAGES {
        let path = dir.path(page);
        assert_eq!(groff_warnings(&path), "", "{page}");
        let text = man_l(&path);
        let name = page.trim_end_matches(".1");
        assert_eq!(name_line(&text), Some(name), "{page}:\n{text}");
    }

    let main = man_l(&dir.path("oidc-edge.1"));
    assert!(main.contains("SUBCOMMANDS"), "{main}");
    for sub in SUBCOMMANDS {
        assert!(
            main.contains(&format!("oidc-edge-{sub}(1)")),
            "main page does not list {sub}:\n{main}"
        );
    }
}

#[test]
fn man_without_dir_prints_the_main_page() {
    let out = run(&["man"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = stdout(&out);
    assert!(page.starts_with(".ie \\n(.g .ds Aq"), "{page}");
    assert!(page.contains(".TH oidc-edge 1"), "{page}");
}

#[test]
fn man_into_a_missing_dir_fails_naming_it() {
    let dir = Scratch::new();
    let missing = dir.path("absent");
    let out = run(&["man", missing.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(missing.to_str().expect("utf-8")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bash_completes_a_subcommand() {
    let script = format!(
        r#"source <("{bin}" completions bash) || exit 9
COMP_WORDS=(oidc-edge che); COMP_CWORD=1; COMP_LINE="oidc-edge che"; COMP_POINT=${{#COMP_LINE}}
_oidc__edge oidc-edge che oidc-edge
echo "${{COMPREPLY[@]}}""#,
        bin = bin()
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &script])
        .output()
        .expect("run bash");
    assert!(out.status.success(), "{}", stderr(&out));
    let reply = stdout(&out);
    let mut offered: Vec<&str> = reply.split_whitespace().collect();
    offered.sort_unstable();
    let offered = offered.join(" ");
    assert_eq!(offered, "check check-config", "stderr: {}", stderr(&out));
}

#[test]
fn every_shell_gets_a_script() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        assert!(script.contains("check-config"), "{shell}: {script}");
        assert!(script.contains("trust-policy"), "{shell}: {script}");
    }
}

/// clap's usage error, with the project's exit code for a bad command line (sysexits
/// `EX_USAGE`, as everywhere in `main.rs`), not clap's default 2.
#[test]
fn an_unknown_shell_is_a_usage_error() {
    let out = run(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    let err = stderr(&out);
    assert!(
        err.starts_with("error: invalid value 'tcsh' for '<SHELL>'"),
        "{err}"
    );
    assert!(
        err.contains("[possible values: bash, elvish, fish, powershell, zsh]"),
        "{err}"
    );
}

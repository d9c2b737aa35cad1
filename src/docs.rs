//! `completions` and `man`: shell completion scripts and man pages, generated from the
//! clap definitions in [`crate::cli`], so they never drift from `--help`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::Cli;

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: Shell, out: &mut dyn Write) -> std::io::Result<()> {
    let mut cmd = Cli::command();
    let name = cmd.get_name().to_owned();
    clap_complete::generate(shell, &mut cmd, name, out);
    out.flush()
}

/// Writes the main man page (`oidc-edge.1`) to `out`.
pub fn man_page(out: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(out)?;
    out.flush()
}

/// Writes `oidc-edge.1` and one page per subcommand (`oidc-edge-serve.1`,
/// `oidc-edge-aws-provider.1`, …) into `dir`, which must exist; returns the files written, the
/// main page first. Hidden subcommands and clap's `help` get no page.
pub fn man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    // As `clap_mangen::generate_to` does, but keeping the paths: built, so that subcommands
    // carry their full names (`oidc-edge-aws-provider`).
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, dir, &mut written)?;
    Ok(written)
}

fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    written.push(clap_mangen::Man::new(cmd.clone()).generate_to(dir)?);
    for sub in cmd.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_main_page_names_every_subcommand() {
        let mut page = Vec::new();
        man_page(&mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.contains(".TH oidc-edge 1"), "{page}");
        for sub in Cli::command().get_subcommands() {
            let name = sub.get_name().replace('-', "\\-");
            assert!(page.contains(&name), "{name} missing from\n{page}");
        }
    }

    #[test]
    fn every_shell_gets_a_script() {
        for shell in [
            Shell::Bash,
            Shell::Zsh,
            Shell::Fish,
            Shell::Elvish,
            Shell::PowerShell,
        ] {
            let mut script = Vec::new();
            completions(shell, &mut script).unwrap();
            let script = String::from_utf8(script).unwrap();
            assert!(script.contains("check-config"), "{shell}: {script}");
        }
    }
}

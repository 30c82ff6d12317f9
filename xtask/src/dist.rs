//! `cargo xtask dist`: the files an operator installs, in `target/dist`: the binary, shell
//! completions and man pages generated from the binary's own command-line definition, and
//! the systemd unit from `packaging/`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Completion scripts: (shell as `limiter completions` names it, file name).
const COMPLETIONS: [(&str, &str); 3] = [("bash", "limiter.bash"), ("zsh", "_limiter"), ("fish", "limiter.fish")];

/// Files copied from `packaging/` into `target/dist/systemd/`.
const PACKAGING_FILES: [&str; 2] = ["limiter@.service", "limiter.env.example"];

/// Writes `target/dist` from the release binary, which must be built already.
pub fn dist(workspace: &Path) -> anyhow::Result<PathBuf> {
    let binary = workspace.join("target/release/limiter");
    let out = workspace.join("target/dist");
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("failed to remove the old {}", out.display()))?;
    }

    // Step 1: the binary, with the XDP program embedded.
    fs::create_dir_all(&out).with_context(|| format!("failed to create {}", out.display()))?;
    fs::copy(&binary, out.join("limiter")).with_context(|| format!("failed to copy {}", binary.display()))?;

    // Step 2: completions and man pages, from the binary's hidden generator subcommands.
    let completions = out.join("completions");
    fs::create_dir_all(&completions)?;
    for (shell, file) in COMPLETIONS {
        let script = crate::command_output(Command::new(&binary).args(["completions", shell]))?;
        fs::write(completions.join(file), script)?;
    }
    crate::command_output(Command::new(&binary).arg("man").arg(out.join("man")))?;

    // Step 3: the systemd unit and its example environment file.
    let systemd = out.join("systemd");
    fs::create_dir_all(&systemd)?;
    for file in PACKAGING_FILES {
        let source = workspace.join("packaging").join(file);
        fs::copy(&source, systemd.join(file)).with_context(|| format!("failed to copy {}", source.display()))?;
    }

    // Step 4: every subcommand must appear in every generated file.
    let help = crate::command_output(Command::new(&binary).arg("--help"))?;
    check_dist(&out, &subcommands_in_help(&help))?;
    Ok(out)
}

/// Returns the subcommands listed under `Commands:` in clap's help output, without `help`.
pub fn subcommands_in_help(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// Checks that each completion script names every subcommand and that each subcommand has
/// a man page that the main page refers to.
pub fn check_dist(out: &Path, subcommands: &[String]) -> anyhow::Result<()> {
    if subcommands.is_empty() {
        bail!("found no subcommands in `limiter --help`: has its output format changed?");
    }
    for (_, file) in COMPLETIONS {
        let path = out.join("completions").join(file);
        let script = fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))?;
        let missing: Vec<&String> = subcommands.iter().filter(|name| !script.contains(name.as_str())).collect();
        if !missing.is_empty() {
            bail!("{} does not mention subcommands {missing:?}", path.display());
        }
    }
    let main_page_path = out.join("man/limiter.1");
    let main_page = fs::read_to_string(&main_page_path).with_context(|| format!("failed to read {}", main_page_path.display()))?;
    for name in subcommands {
        let page = out.join("man").join(format!("limiter-{name}.1"));
        if !page.is_file() {
            bail!("missing man page {}", page.display());
        }
        // clap_mangen names each subcommand's page in the main page's SUBCOMMANDS section.
        if !main_page.contains(&format!("limiter\\-{name}")) {
            bail!("{} does not refer to limiter-{name}(1)", main_page_path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELP: &str = "Per-key packet rate limiter\n\nUsage: limiter <COMMAND>\n\nCommands:\n  agent    Attach the program\n  limit    Add, change, remove or list limits\n  help     Print this message\n\nOptions:\n  -h, --help  Print help\n";

    #[test]
    fn help_lists_subcommands() {
        assert_eq!(subcommands_in_help(HELP), vec!["agent", "limit"]);
    }

    #[test]
    fn check_dist_finds_missing_page() {
        let out = std::env::temp_dir().join(format!("limiter-dist-test-{}", std::process::id()));
        fs::create_dir_all(out.join("completions")).unwrap();
        fs::create_dir_all(out.join("man")).unwrap();
        for (_, file) in COMPLETIONS {
            fs::write(out.join("completions").join(file), "agent limit").unwrap();
        }
        fs::write(out.join("man/limiter.1"), "limiter\\-agent(1) limiter\\-limit(1)").unwrap();
        fs::write(out.join("man/limiter-agent.1"), "").unwrap();
        let subcommands = subcommands_in_help(HELP);

        let error = check_dist(&out, &subcommands).unwrap_err().to_string();
        assert!(error.contains("missing man page"), "{error}");
        assert!(error.contains("limiter-limit.1"), "{error}");

        fs::write(out.join("man/limiter-limit.1"), "").unwrap();
        let result = check_dist(&out, &subcommands);
        fs::remove_dir_all(&out).unwrap();
        result.unwrap();
    }
}

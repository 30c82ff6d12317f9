//! Shell completions and man pages generated from the command-line definition, so they
//! list exactly the subcommands and options the binary accepts. `cargo xtask dist` runs the
//! hidden `limiter completions` and `limiter man` subcommands to write them.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// Writes the completion script for `shell` to `out`.
pub fn write_completions(mut command: clap::Command, shell: clap_complete::Shell, out: &mut dyn Write) {
    let name = command.get_name().to_owned();
    clap_complete::generate(shell, &mut command, name, out);
}

/// Writes a man page for the command and one for each visible subcommand, at any depth, into
/// `dir`: `limiter.1`, `limiter-limit.1`, `limiter-limit-add.1`, and so on. Returns the
/// paths written.
pub fn write_man_pages(command: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut written = Vec::new();
    write_man_page(command.clone(), command.get_name().to_owned(), dir, &mut written)?;
    Ok(written)
}

fn write_man_page(command: clap::Command, page_name: String, dir: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    // A subcommand's page is named for its whole path, as `git-remote-add(1)` is.
    let command = command.name(page_name.clone()).version(env!("CARGO_PKG_VERSION"));
    let path = dir.join(format!("{page_name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page).with_context(|| format!("failed to render {page_name}.1"))?;
    std::fs::write(&path, page).with_context(|| format!("failed to write {}", path.display()))?;
    written.push(path);

    for subcommand in command.get_subcommands().filter(|subcommand| !subcommand.is_hide_set()) {
        let name = format!("{page_name}-{}", subcommand.get_name());
        write_man_page(subcommand.clone(), name, dir, written)?;
    }
    Ok(())
}

//! Workspace invariants that users rely on.

use std::path::Path;
use std::process::Command;

fn workspace_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Services embed the runtime: it must never pull libtorch in, whatever features are on.
#[test]
fn runtime_dependency_tree_is_free_of_libtorch() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "tree",
            "--offline",
            "--locked",
            "-p",
            "agiqa-runtime",
            "--all-features",
            "-e",
            "normal,build",
            "--prefix",
            "none",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    assert!(
        tree.contains("agiqa-runtime"),
        "unexpected cargo tree output:\n{tree}"
    );
    assert!(
        tree.contains("ort v"),
        "the runtime should depend on ort:\n{tree}"
    );
    for forbidden in ["tch v", "torch-sys v"] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "agiqa-runtime depends on {forbidden}:\n{tree}"
        );
    }
}

/// The README opens with the two commands that set up and run everything; CI runs the second.
#[test]
fn readme_commands_exist_and_ci_runs_the_test_command() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let first_block = readme
        .split("```")
        .nth(1)
        .expect("README has a code block near the top");
    assert!(first_block.contains("scripts/demo"), "{first_block}");
    assert!(first_block.contains("scripts/test"), "{first_block}");
    let ci = std::fs::read_to_string(root.join(".ci/run")).expect(".ci/run");
    assert!(ci.contains("scripts/test"), "{ci}");
    for script in [
        "scripts/setup",
        "scripts/test",
        "scripts/demo",
        "scripts/make-fixtures",
    ] {
        assert!(root.join(script).is_file(), "{script} is missing");
    }
}

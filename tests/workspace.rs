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

/// Checkpoints are read and written in one place (`trainer/src/checkpoint/`): no other module
/// of the trainer or the exporter opens checkpoint files or parses their descriptions itself.
#[test]
fn only_the_checkpoint_module_touches_checkpoint_files() {
    let forbidden = [
        "write_safetensors",
        "read_safetensors",
        "best.json",
        "last.json",
        "best.safetensors",
        "last.safetensors",
        "tensors_sha256\":",
        "from_slice::<CheckpointMeta>",
        "from_str::<CheckpointMeta>",
        ": CheckpointMeta = serde_json",
    ];
    // CLIP weight files (not checkpoints) are safetensors too: the loaders may read them.
    let allowed = ["trainer/src/checkpoint/", "trainer/src/weights/"];
    let mut offenders = Vec::new();
    for dir in ["trainer/src", "exporter/src"] {
        let mut stack = vec![workspace_root().join(dir)];
        while let Some(path) = stack.pop() {
            if path.is_dir() {
                stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            let relative = path
                .strip_prefix(workspace_root())
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            if path.extension().is_none_or(|e| e != "rs")
                || allowed.iter().any(|a| relative.starts_with(a))
            {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests may build files of their own; comments and help texts may name them.
            let code: String = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            for pattern in forbidden {
                if code.contains(pattern) {
                    offenders.push(format!("{relative}: {pattern}"));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "checkpoint files touched outside trainer/src/checkpoint/:\n{}",
        offenders.join("\n")
    );
}

//! Workspace invariants that users rely on.

use std::path::Path;
use std::process::Command;

fn workspace_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Services embed the runtime: it must never pull libtorch in, whatever features are on.
#[test]
fn runtime_dependency_tree_is_free_of_libtorch() {
    // `cli` turns every other feature on.
    let tree = runtime_tree("cli");
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

/// The fuzz targets and their corpus replay (in CI) build without libtorch: the trainer's
/// readers they drive live in `agiqa-readers`, which must stay free of tch.
#[test]
fn readers_and_fuzz_bodies_are_free_of_libtorch() {
    for package in ["agiqa-readers", "agiqa-fuzz"] {
        let tree = dependency_tree(&["-p", package, "-e", "normal,build,dev"]);
        assert!(
            tree.contains(package),
            "unexpected cargo tree output:\n{tree}"
        );
        for forbidden in ["tch v", "torch-sys v", "agiqa-trainer v"] {
            assert!(
                !tree.lines().any(|l| l.starts_with(forbidden)),
                "{package} depends on {forbidden}:\n{tree}"
            );
        }
    }
}

/// The normal (non-dev) dependency tree of `agiqa-runtime` with `features` only, one package
/// per line (`name vX.Y.Z`).
fn runtime_tree(features: &str) -> String {
    dependency_tree(&[
        "-p",
        "agiqa-runtime",
        "--no-default-features",
        "--features",
        features,
        "-e",
        "normal,build",
    ])
}

/// `cargo tree` with `args`, one package per line (`name vX.Y.Z`).
fn dependency_tree(args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["tree", "--offline", "--locked", "--prefix", "none"])
        .args(args)
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A service that embeds only `Scorer` compiles ONNX Runtime's bindings and tracing, not the
/// HTTP stack, the CLI or libtorch; the features above it add exactly their own crates.
#[test]
fn scorer_feature_alone_has_no_service_cli_or_libtorch_crates() {
    let has = |tree: &str, name: &str| tree.lines().any(|l| l.starts_with(&format!("{name} v")));
    let scorer = runtime_tree("scorer");
    assert!(
        has(&scorer, "ort"),
        "scorer should depend on ort:\n{scorer}"
    );
    for forbidden in [
        "tokio",
        "hyper",
        "axum",
        "clap",
        "indicatif",
        "glob",
        "anyhow",
        "tch",
        "torch-sys",
    ] {
        assert!(
            !has(&scorer, forbidden),
            "agiqa-runtime with only `scorer` depends on {forbidden}:\n{scorer}"
        );
    }
    let serve = runtime_tree("serve");
    assert!(has(&serve, "axum") && has(&serve, "tokio"), "{serve}");
    assert!(!has(&serve, "clap") && !has(&serve, "indicatif"), "{serve}");
    let cli = runtime_tree("cli");
    for needed in ["clap", "indicatif", "glob", "anyhow", "axum"] {
        assert!(has(&cli, needed), "cli should depend on {needed}:\n{cli}");
    }
}

/// The README's Rust example is `runtime/examples/embed.rs` verbatim (CI runs the example and
/// compiles the README block as a doc-test), so the two cannot drift apart.
#[test]
fn readme_rust_example_is_the_embed_example() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let example =
        std::fs::read_to_string(root.join("runtime/examples/embed.rs")).expect("embed.rs");
    let code: String = example
        .lines()
        .filter(|l| !l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let block = readme
        .split("```rust")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README has a ```rust block");
    let block = block.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(
        block.trim(),
        code.trim(),
        "README's rust block differs from examples/embed.rs"
    );
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
/// of the trainer (its tch-free readers included) or the exporter opens checkpoint files or
/// parses their descriptions itself.
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
    for dir in ["trainer/src", "trainer/readers/src", "exporter/src"] {
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

/// The Python binding is outside the workspace with a lock file of its own: a runtime
/// dependency added without updating it would break the wheel's `--locked` build in CI.
#[test]
fn python_binding_lock_file_is_current() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "metadata",
            "--offline",
            "--locked",
            "--format-version",
            "1",
            "--manifest-path",
            "runtime/python/Cargo.toml",
        ])
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "runtime/python/Cargo.lock is out of date (run `cargo metadata --manifest-path runtime/python/Cargo.toml` and commit it): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

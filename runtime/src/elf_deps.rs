//! Which shared libraries an ELF library needs, and where the dynamic loader would find each,
//! so that a provider that does not load is explained by the exact missing library (ONNX
//! Runtime's own message is only "failed to load").
//!
//! The search follows ld.so(8): the needing object's `DT_RPATH` (only when it has no
//! `DT_RUNPATH`), `LD_LIBRARY_PATH`, its `DT_RUNPATH` (`$ORIGIN` = its folder), ld.so.cache,
//! then the default folders; libraries already loaded under a soname (those preloaded by
//! [`crate::gpu_libraries`]) satisfy that name first. Only the dynamic section is read (by
//! offset), so the 500 MB CUDA libraries cost a few small reads.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Why an ELF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable ELF library: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// The dynamic-section entries that decide what a library loads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ElfDynamic {
    pub soname: Option<String>,
    /// `DT_NEEDED`, in order.
    pub needed: Vec<String>,
    /// `DT_RPATH` entries (colon-separated in the file), unexpanded.
    pub rpath: Vec<String>,
    /// `DT_RUNPATH` entries, unexpanded.
    pub runpath: Vec<String>,
}

const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_SONAME: u64 = 14;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
/// Larger tables than this are a corrupt file, not a library.
const MAX_TABLE: u64 = 64 << 20;

/// Reads the dynamic section of a 64-bit little-endian ELF file (x86-64 and aarch64 Linux).
pub fn read_dynamic(path: &Path) -> Result<ElfDynamic, ElfError> {
    let read_err = |source| ElfError::Read {
        path: path.to_path_buf(),
        source,
    };
    let format = |reason: &str| ElfError::Format {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut file = File::open(path).map_err(read_err)?;
    let header = read_at(&mut file, 0, 64).map_err(|_| format("shorter than an ELF header"))?;
    if &header[..4] != b"\x7fELF" {
        return Err(format("no ELF magic"));
    }
    if header[4] != 2 || header[5] != 1 {
        return Err(format("only 64-bit little-endian ELF is read"));
    }
    let phoff = u64_at(&header, 32);
    let phentsize = u16_at(&header, 54) as u64;
    let phnum = u16_at(&header, 56) as u64;
    if phentsize < 56 || phentsize * phnum > MAX_TABLE {
        return Err(format("bad program header table"));
    }
    let phdrs = read_at(&mut file, phoff, (phentsize * phnum) as usize)
        .map_err(|_| format("truncated program headers"))?;
    let mut loads = Vec::new();
    let mut dynamic = None;
    for ph in phdrs.chunks_exact(phentsize as usize) {
        let (kind, offset, vaddr, filesz) =
            (u32_at(ph, 0), u64_at(ph, 8), u64_at(ph, 16), u64_at(ph, 32));
        match kind {
            PT_LOAD => loads.push((vaddr, offset, filesz)),
            PT_DYNAMIC => dynamic = Some((offset, filesz)),
            _ => {}
        }
    }
    // A static executable or an object file: nothing is loaded for it.
    let Some((dyn_offset, dyn_size)) = dynamic else {
        return Ok(ElfDynamic::default());
    };
    if dyn_size > MAX_TABLE {
        return Err(format("bad dynamic section size"));
    }
    let entries = read_at(&mut file, dyn_offset, dyn_size as usize)
        .map_err(|_| format("truncated dynamic section"))?;
    let mut tagged = Vec::new();
    let (mut strtab, mut strsz) = (None, 0);
    for entry in entries.chunks_exact(16) {
        let (tag, value) = (u64_at(entry, 0), u64_at(entry, 8));
        match tag {
            0 => break,
            DT_STRTAB => strtab = Some(value),
            DT_STRSZ => strsz = value,
            DT_NEEDED | DT_SONAME | DT_RPATH | DT_RUNPATH => tagged.push((tag, value)),
            _ => {}
        }
    }
    if tagged.is_empty() {
        return Ok(ElfDynamic::default());
    }
    let strtab = strtab.ok_or_else(|| format("dynamic section without a string table"))?;
    // DT_STRTAB is an address: the file offset comes from the load segment holding it.
    let offset = loads
        .iter()
        .find(|(vaddr, _, size)| strtab >= *vaddr && strtab < vaddr + size)
        .map(|(vaddr, offset, _)| offset + (strtab - vaddr))
        .ok_or_else(|| format("string table outside the loaded segments"))?;
    if strsz == 0 || strsz > MAX_TABLE {
        return Err(format("bad string table size"));
    }
    let strings =
        read_at(&mut file, offset, strsz as usize).map_err(|_| format("truncated string table"))?;
    let text = |index: u64| -> Result<String, ElfError> {
        let start = index as usize;
        let rest = strings
            .get(start..)
            .ok_or_else(|| format("string index out of range"))?;
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    };
    let mut out = ElfDynamic::default();
    let split = |s: String| -> Vec<String> {
        s.split(':')
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect()
    };
    for (tag, value) in tagged {
        match tag {
            DT_NEEDED => out.needed.push(text(value)?),
            DT_SONAME => out.soname = Some(text(value)?),
            DT_RPATH => out.rpath.extend(split(text(value)?)),
            _ => out.runpath.extend(split(text(value)?)),
        }
    }
    Ok(out)
}

fn read_at(file: &mut File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0; len];
    file.read_exact(&mut buf)?;
    Ok(buf)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// The loader's built-in folders: glibc's, and the multiarch ones Debian and Ubuntu add.
#[cfg(target_arch = "x86_64")]
const DEFAULT_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];
#[cfg(target_arch = "aarch64")]
const DEFAULT_DIRS: &[&str] = &[
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const DEFAULT_DIRS: &[&str] = &["/lib64", "/usr/lib64", "/lib", "/usr/lib"];

/// Where libraries are looked for, besides each library's own RPATH/RUNPATH.
#[derive(Debug, Clone, Default)]
pub struct SearchPath {
    /// Libraries already in the process, by soname (those preloaded from `library-path`).
    pub loaded: HashMap<String, PathBuf>,
    pub ld_library_path: Vec<PathBuf>,
    /// ld.so.cache, soname → path, for this machine's architecture.
    pub cache: HashMap<String, PathBuf>,
    pub defaults: Vec<PathBuf>,
}

impl SearchPath {
    /// This process's search path: `LD_LIBRARY_PATH`, `ldconfig -p`, the default folders.
    pub fn from_system(loaded: HashMap<String, PathBuf>) -> SearchPath {
        let ld_library_path = std::env::var_os("LD_LIBRARY_PATH")
            .map(|v| {
                std::env::split_paths(&v)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect()
            })
            .unwrap_or_default();
        SearchPath {
            loaded,
            ld_library_path,
            cache: ld_so_cache(),
            defaults: DEFAULT_DIRS.iter().map(PathBuf::from).collect(),
        }
    }
}

/// ld.so.cache as `ldconfig -p` prints it (the file format is glibc-internal).
fn ld_so_cache() -> HashMap<String, PathBuf> {
    let output = ["/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"]
        .iter()
        .find_map(|cmd| std::process::Command::new(cmd).arg("-p").output().ok());
    let Some(output) = output else {
        return HashMap::new();
    };
    parse_ldconfig(&String::from_utf8_lossy(&output.stdout))
}

/// `\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1` lines; entries of
/// other architectures are skipped, as the loader skips them; the first entry of a name wins.
pub fn parse_ldconfig(text: &str) -> HashMap<String, PathBuf> {
    let arch = if cfg!(target_arch = "x86_64") {
        Some("x86-64")
    } else if cfg!(target_arch = "aarch64") {
        Some("AArch64")
    } else {
        None
    };
    let mut cache = HashMap::new();
    for line in text.lines() {
        let Some((left, path)) = line.split_once(" => ") else {
            continue;
        };
        let Some((name, flags)) = left.trim().split_once(' ') else {
            continue;
        };
        if arch.is_some_and(|a| !flags.contains(a)) {
            continue;
        }
        cache
            .entry(name.to_string())
            .or_insert_with(|| PathBuf::from(path.trim()));
    }
    cache
}

/// How one needed name was (or was not) resolved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Dependency {
    /// The `DT_NEEDED` name, e.g. `libcublasLt.so.13`.
    pub name: String,
    /// The library that needs it.
    pub needed_by: PathBuf,
    /// Where the loader would take it from; `None`: missing.
    pub found: Option<PathBuf>,
    /// `loaded`, `rpath`, `LD_LIBRARY_PATH`, `runpath`, `ld.so.cache`, `default` or `path`.
    pub via: Option<&'static str>,
}

/// Every library `library` pulls in, transitively, each name resolved once (the loader shares
/// a soname across the process, whoever needs it).
pub fn resolve(library: &Path, search: &SearchPath) -> Result<Vec<Dependency>, ElfError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([library.to_path_buf()]);
    let mut first = true;
    while let Some(object) = queue.pop_front() {
        let dynamic = match read_dynamic(&object) {
            Ok(d) => d,
            // The library asked about must be readable; a dependency that is not (a linker
            // script named like a library) is reported as found and not walked.
            Err(e) if first => return Err(e),
            Err(_) => continue,
        };
        first = false;
        for name in &dynamic.needed {
            if !seen.insert(name.clone()) {
                continue;
            }
            let found = find(name, &object, &dynamic, search);
            if let Some((path, _)) = &found {
                queue.push_back(path.clone());
            }
            out.push(Dependency {
                name: name.clone(),
                needed_by: object.clone(),
                via: found.as_ref().map(|(_, via)| *via),
                found: found.map(|(path, _)| path),
            });
        }
    }
    Ok(out)
}

/// Where the loader would find `name` for a program with no RPATH/RUNPATH of its own.
pub fn find_library(name: &str, search: &SearchPath) -> Option<PathBuf> {
    find(name, Path::new("/"), &ElfDynamic::default(), search).map(|(path, _)| path)
}

/// The loader's search for `name`, needed by `object`.
fn find(
    name: &str,
    object: &Path,
    dynamic: &ElfDynamic,
    search: &SearchPath,
) -> Option<(PathBuf, &'static str)> {
    if name.contains('/') {
        let path = PathBuf::from(name);
        return path.exists().then_some((path, "path"));
    }
    if let Some(path) = search.loaded.get(name) {
        return Some((path.clone(), "loaded"));
    }
    let origin = object.parent().unwrap_or(Path::new("."));
    let expand = |entries: &[String]| -> Vec<PathBuf> {
        entries
            .iter()
            .map(|e| {
                PathBuf::from(
                    e.replace("${ORIGIN}", &origin.to_string_lossy())
                        .replace("$ORIGIN", &origin.to_string_lossy()),
                )
            })
            .collect()
    };
    let in_dirs = |dirs: &[PathBuf]| dirs.iter().map(|d| d.join(name)).find(|p| p.exists());
    // DT_RPATH counts only when there is no DT_RUNPATH.
    if dynamic.runpath.is_empty() {
        if let Some(p) = in_dirs(&expand(&dynamic.rpath)) {
            return Some((p, "rpath"));
        }
    }
    if let Some(p) = in_dirs(&search.ld_library_path) {
        return Some((p, "LD_LIBRARY_PATH"));
    }
    if let Some(p) = in_dirs(&expand(&dynamic.runpath)) {
        return Some((p, "runpath"));
    }
    if let Some(p) = search.cache.get(name).filter(|p| p.exists()) {
        return Some((p.clone(), "ld.so.cache"));
    }
    in_dirs(&search.defaults).map(|p| (p, "default"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldconfig_lines_of_this_architecture_are_kept() {
        let text = "3 libs found in cache `/etc/ld.so.cache'\n\
            \tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n\
            \tlibcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1\n\
            \tlibfoo.so (libc6,AArch64) => /usr/lib/aarch64-linux-gnu/libfoo.so\n";
        let cache = parse_ldconfig(text);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                cache.get("libcuda.so.1"),
                Some(&PathBuf::from("/usr/lib/x86_64-linux-gnu/libcuda.so.1"))
            );
            assert!(!cache.contains_key("libfoo.so"));
        }
    }

    #[test]
    fn a_non_elf_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("libfake.so");
        std::fs::write(&path, b"INPUT(-lfoo)").unwrap();
        let err = read_dynamic(&path).unwrap_err().to_string();
        assert!(err.contains("libfake.so"), "{err}");
    }

    #[test]
    fn runpath_origin_and_missing_names_resolve_as_the_loader_would() {
        // `cc` is on every machine that builds this crate (libjpeg-turbo is compiled C).
        let cc = "cc";
        let dir = tempfile::tempdir().unwrap();
        let (lib_dir, sub) = (dir.path(), dir.path().join("deps"));
        std::fs::create_dir(&sub).unwrap();
        let source = lib_dir.join("empty.c");
        std::fs::write(&source, "int agiqa_stub(void) { return 0; }\n").unwrap();
        let build = |out: &Path, extra: &[&str]| {
            let status = std::process::Command::new(cc)
                .args(["-shared", "-fPIC", "-o"])
                .arg(out)
                .arg(&source)
                .args(extra)
                .status()
                .unwrap();
            assert!(status.success());
        };
        build(
            &sub.join("libpresent.so.1"),
            &["-Wl,-soname,libpresent.so.1"],
        );
        build(&sub.join("libgone.so.2"), &["-Wl,-soname,libgone.so.2"]);
        let top = lib_dir.join("libtop.so");
        let link_dir = format!("-L{}", sub.display());
        build(
            &top,
            &[
                &link_dir,
                "-Wl,--no-as-needed",
                "-l:libpresent.so.1",
                "-l:libgone.so.2",
                "-Wl,--enable-new-dtags,-rpath,$ORIGIN/deps",
            ],
        );
        std::fs::remove_file(sub.join("libgone.so.2")).unwrap();
        let dynamic = read_dynamic(&top).unwrap();
        assert_eq!(dynamic.runpath, vec!["$ORIGIN/deps".to_string()]);
        assert!(dynamic.needed.contains(&"libgone.so.2".to_string()));
        let deps = resolve(&top, &SearchPath::from_system(HashMap::new())).unwrap();
        let by_name = |n: &str| deps.iter().find(|d| d.name == n).unwrap();
        assert_eq!(by_name("libpresent.so.1").via, Some("runpath"));
        assert_eq!(
            by_name("libpresent.so.1").found,
            Some(sub.join("libpresent.so.1"))
        );
        assert_eq!(by_name("libgone.so.2").found, None);
        // A library already loaded under that soname satisfies the need.
        let loaded =
            HashMap::from([("libgone.so.2".to_string(), PathBuf::from("/x/libgone.so.2"))]);
        let deps = resolve(&top, &SearchPath::from_system(loaded)).unwrap();
        assert!(deps.iter().all(|d| d.found.is_some()));
    }
}

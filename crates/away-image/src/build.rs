//! `away image build`: a recipe and its context become an [`Image`].
//!
//! All files a recipe adds go into one new layer on top of the base image's
//! layers. Layers and JSON are written deterministically, so the same context
//! gives the same manifest digest on every build.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use oci_spec::image::{Arch, ImageConfiguration, Os, RootFs};

use crate::archive::{read_image_tar, ArchiveError, Encoded, Image};
use crate::recipe::{Base, Copy, CopySource, Instruction, Recipe, RecipeError};
use crate::tree::{normalize, FileTree, LayerBlob, Node};

/// Build errors; each names the path, line or command that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error("build context {path} has no Containerfile (or Dockerfile)")]
    NoRecipe { path: PathBuf },
    #[error("{recipe}:{line}: {message}")]
    Step { recipe: PathBuf, line: usize, message: String },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("base image {path}")]
    Base {
        path: PathBuf,
        #[source]
        source: ArchiveError,
    },
    #[error("cargo build of {manifest} failed: {message}")]
    Cargo { manifest: PathBuf, message: String },
    #[error(transparent)]
    Write(#[from] ArchiveError),
}

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Image reference, e.g. `away/counter:latest`; default `away/<context dir name>:latest`.
    pub tag: Option<String>,
    /// Target triple for `COPY --from=cargo` binaries.
    pub cargo_target: String,
    /// The cargo executable (`$CARGO` when set, else `cargo`).
    pub cargo: PathBuf,
    /// Pass `--quiet` to cargo (its output goes to stderr otherwise).
    pub cargo_quiet: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            tag: None,
            cargo_target: format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
            cargo: std::env::var_os("CARGO").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("cargo")),
            cargo_quiet: false,
        }
    }
}

/// A built image and the names it came from.
#[derive(Debug, Clone)]
pub struct Built {
    /// The context's directory name ("counter").
    pub app: String,
    pub image: Image,
    /// Files the new layer holds.
    pub layer_files: usize,
}

/// Find the recipe file of a context.
pub fn recipe_path(context: &Path) -> Result<PathBuf, BuildError> {
    ["Containerfile", "Dockerfile"]
        .iter()
        .map(|n| context.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| BuildError::NoRecipe { path: context.to_path_buf() })
}

/// App name of a context: its directory name.
pub fn app_name(context: &Path) -> String {
    let abs = std::fs::canonicalize(context).unwrap_or_else(|_| context.to_path_buf());
    abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "app".into())
}

/// Build the image of `context` in memory. `progress` receives one line per long step.
pub fn build(context: &Path, opts: &BuildOptions, progress: &dyn Fn(&str)) -> Result<Built, BuildError> {
    let recipe_file = recipe_path(context)?;
    let recipe = Recipe::from_file(&recipe_file)?;
    let app = app_name(context);
    let step = |line: usize, message: String| BuildError::Step { recipe: recipe_file.clone(), line, message };

    let (mut config, mut layers) = match &recipe.base {
        Base::Scratch => {
            let mut c = ImageConfiguration::default();
            c.set_architecture(Arch::Amd64);
            c.set_os(Os::Linux);
            (c, Vec::new())
        }
        Base::Tar(p) => {
            let path = context.join(p);
            progress(&format!("reading base image {}", path.display()));
            let base = read_image_tar(&path).map_err(|source| BuildError::Base { path: path.clone(), source })?;
            (base.image.config, base.image.layers)
        }
    };
    // Same inputs, same digest: no wall-clock time in the config.
    config.set_created(Some("1970-01-01T00:00:00Z".into()));
    config.set_history(None);
    let mut run = config.config().clone().unwrap_or_default();

    // Cargo binaries are built once, only if some COPY asks for them.
    let mut cargo_bins: Option<HashMap<String, PathBuf>> = None;
    let mut tree = FileTree::default();
    let mut workdir = run.working_dir().clone().unwrap_or_else(|| "/".into());
    for (line, ins) in &recipe.instructions {
        match ins {
            Instruction::Copy(c) => {
                if c.from == CopySource::Cargo && cargo_bins.is_none() {
                    cargo_bins = Some(cargo_build(context, opts, progress)?);
                }
                copy(&mut tree, context, c, &workdir, cargo_bins.as_ref()).map_err(|m| step(*line, m))?;
            }
            Instruction::Env(pairs) => {
                let mut env = run.env().clone().unwrap_or_default();
                for (k, v) in pairs {
                    env.retain(|e| e.split_once('=').map(|(ek, _)| ek) != Some(k.as_str()));
                    env.push(format!("{k}={v}"));
                }
                run.set_env(Some(env));
            }
            Instruction::Workdir(dir) => {
                workdir = format!(
                    "/{}",
                    normalize(&if dir.starts_with('/') { dir.clone() } else { format!("{workdir}/{dir}") })
                );
                if !matches!(tree.entries.get(&normalize(&workdir)), Some(Node::Dir { .. })) && workdir != "/" {
                    tree.insert(&workdir, Node::Dir { mode: 0o755, uid: 0, gid: 0 });
                }
                run.set_working_dir(Some(workdir.clone()));
            }
            Instruction::User(u) => {
                run.set_user(Some(u.clone()));
            }
            Instruction::Expose(ports) => {
                let mut all = run.exposed_ports().clone().unwrap_or_default();
                for p in ports {
                    if !all.contains(p) {
                        all.push(p.clone());
                    }
                }
                all.sort();
                run.set_exposed_ports(Some(all));
            }
            Instruction::Label(pairs) => {
                let mut labels = run.labels().clone().unwrap_or_default();
                labels.extend(pairs.iter().cloned());
                run.set_labels(Some(labels));
            }
            Instruction::Entrypoint(args) => {
                run.set_entrypoint(Some(args.clone()));
                // As in Docker: a new ENTRYPOINT drops the CMD inherited from the base.
                if !recipe.instructions.iter().any(|(l, i)| matches!(i, Instruction::Cmd(_)) && l < line) {
                    run.set_cmd(None);
                }
            }
            Instruction::Cmd(args) => {
                run.set_cmd(Some(args.clone()));
            }
        }
    }
    config.set_config(Some(run));

    let layer_files = tree.entries.values().filter(|n| matches!(n, Node::File { .. })).count();
    if !tree.entries.is_empty() {
        progress(&format!("writing layer: {} files, {} bytes", layer_files, tree.file_bytes()));
        layers.push(LayerBlob::from_tar(&tree.to_tar()));
    }
    let mut rootfs = RootFs::default();
    rootfs.set_diff_ids(layers.iter().map(|l| l.diff_id.clone()).collect());
    config.set_rootfs(rootfs);
    let tag = opts.tag.clone().unwrap_or_else(|| format!("away/{app}:latest"));
    Ok(Built { app, image: Image { config, layers, tags: vec![tag] }, layer_files })
}

/// Build and write `<out_dir>/<app>.tar`. Returns the path and the encoded blobs.
pub fn build_to_dir(
    context: &Path,
    out_dir: &Path,
    opts: &BuildOptions,
    progress: &dyn Fn(&str),
) -> Result<(Built, PathBuf, Encoded), BuildError> {
    let built = build(context, opts, progress)?;
    std::fs::create_dir_all(out_dir).map_err(|source| ArchiveError::Io {
        action: "create",
        path: out_dir.to_path_buf(),
        source,
    })?;
    let path = out_dir.join(format!("{}.tar", built.app));
    progress(&format!("writing {}", path.display()));
    let enc = built.image.write_tar(&path)?;
    Ok((built, path, enc))
}

/// `cargo build --release` of the context's Cargo.toml as static binaries.
/// Returns binary name -> path.
///
/// `+crt-static` goes in RUSTFLAGS together with an explicit `--target`: cargo
/// then applies it to the target artifacts only, not to build scripts or
/// proc-macros, and keeps them apart from normal builds in `target/<triple>/`.
fn cargo_build(
    context: &Path,
    opts: &BuildOptions,
    progress: &dyn Fn(&str),
) -> Result<HashMap<String, PathBuf>, BuildError> {
    let manifest = context.join("Cargo.toml");
    let cargo_err = |message: String| BuildError::Cargo { manifest: manifest.clone(), message };
    if !manifest.is_file() {
        return Err(cargo_err("COPY --from=cargo needs a Cargo.toml in the build context".into()));
    }
    progress(&format!("cargo build --release --target {} ({}, static)", opts.cargo_target, manifest.display()));
    let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    flags.push_str(" -C target-feature=+crt-static");
    let mut cmd = Command::new(&opts.cargo);
    if opts.cargo_quiet {
        cmd.arg("--quiet");
    }
    let mut child = cmd
        .args([
            "build",
            "--release",
            "--bins",
            "--message-format=json-render-diagnostics",
            "--target",
            &opts.cargo_target,
            "--manifest-path",
        ])
        .arg(&manifest)
        .env("RUSTFLAGS", flags.trim())
        // Small images: no debug info in the shipped binary (symbols stay for backtraces).
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| cargo_err(format!("cannot run {}: {e}", opts.cargo.display())))?;
    let mut bins = HashMap::new();
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line.map_err(|e| cargo_err(e.to_string()))?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" {
            if let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str()) {
                bins.insert(name.to_string(), PathBuf::from(exe));
            }
        }
    }
    let status = child.wait().map_err(|e| cargo_err(e.to_string()))?;
    if !status.success() {
        return Err(cargo_err(format!("cargo exited with {status} (see its output above)")));
    }
    Ok(bins)
}

/// Where a copied file lands: `dest` as given, or inside it when it names a directory.
fn target_path(dest: &str, workdir: &str, name: &str, into_dir: bool) -> String {
    let dest_abs = if dest.starts_with('/') { dest.to_string() } else { format!("{workdir}/{dest}") };
    if into_dir {
        format!("{}/{name}", normalize(&dest_abs))
    } else {
        normalize(&dest_abs)
    }
}

fn file_mode(c: &Copy, meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    // Normalised, so a checkout's umask does not change the digest.
    c.chmod.unwrap_or(if meta.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 })
}

fn copy(
    tree: &mut FileTree,
    context: &Path,
    c: &Copy,
    workdir: &str,
    cargo: Option<&HashMap<String, PathBuf>>,
) -> Result<(), String> {
    let (uid, gid) = c.chown.unwrap_or((0, 0));
    let dest_is_dir = c.dest.ends_with('/') || c.sources.len() > 1;
    for src in &c.sources {
        let path = match (&c.from, cargo) {
            (CopySource::Cargo, Some(bins)) => bins.get(src).cloned().ok_or_else(|| {
                let mut names: Vec<_> = bins.keys().cloned().collect();
                names.sort();
                format!("cargo built no binary named {src:?} (built: {})", names.join(", "))
            })?,
            _ => context.join(src),
        };
        let meta = std::fs::symlink_metadata(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let is_archive = [".tar", ".tar.gz", ".tgz"].iter().any(|s| name.ends_with(s));
        if c.unpack && meta.is_file() && is_archive {
            let blob = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let mut sub = FileTree::default();
            sub.apply_layer(&blob, &path.display().to_string()).map_err(|e| format!("{e}: {}", e.source))?;
            let base = target_path(&c.dest, workdir, "", false);
            for (p, node) in sub.entries {
                tree.insert(&format!("{base}/{p}"), node);
            }
        } else if meta.is_dir() {
            let base = target_path(&c.dest, workdir, "", false);
            copy_dir(tree, &path, &base, c, (uid, gid))?;
        } else {
            let into_dir = dest_is_dir
                || matches!(
                    tree.entries.get(&normalize(&target_path(&c.dest, workdir, "", false))),
                    Some(Node::Dir { .. })
                );
            let target = target_path(&c.dest, workdir, &name, into_dir);
            tree.insert(&target, read_node(&path, &meta, c, (uid, gid))?);
        }
    }
    Ok(())
}

fn read_node(path: &Path, meta: &std::fs::Metadata, c: &Copy, (uid, gid): (u64, u64)) -> Result<Node, String> {
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path).map_err(|e| format!("cannot read link {}: {e}", path.display()))?;
        return Ok(Node::Symlink { target: target.to_string_lossy().into_owned(), uid, gid });
    }
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(Node::File { data, mode: file_mode(c, meta), uid, gid })
}

fn copy_dir(tree: &mut FileTree, dir: &Path, base: &str, c: &Copy, owner: (u64, u64)) -> Result<(), String> {
    if !base.is_empty() {
        tree.insert(base, Node::Dir { mode: 0o755, uid: owner.0, gid: owner.1 });
    }
    // Sorted, so the walk (and the error, if any) is the same every time.
    let mut children: BTreeMap<String, PathBuf> = BTreeMap::new();
    for e in std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))? {
        let e = e.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        children.insert(e.file_name().to_string_lossy().into_owned(), e.path());
    }
    for (name, path) in children {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let target = if base.is_empty() { name.clone() } else { format!("{base}/{name}") };
        if meta.is_dir() {
            copy_dir(tree, &path, &target, c, owner)?;
        } else {
            tree.insert(&target, read_node(&path, &meta, c, owner)?);
        }
    }
    Ok(())
}

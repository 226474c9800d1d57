//! The recipe: a subset of the Containerfile (Dockerfile) syntax.
//!
//! Supported: `FROM scratch` or `FROM <local image tar>`, `COPY`, `ADD`, `ENV`,
//! `WORKDIR`, `USER`, `EXPOSE`, `LABEL`, `ENTRYPOINT`, `CMD`, comments and
//! backslash line continuations. `RUN` is refused on purpose: away builds without
//! a container runtime, so nothing can run inside the image while it is built.

use std::path::{Path, PathBuf};

/// A parse error, always naming the file and the line.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read recipe {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}{}", hint.as_ref().map(|h| format!(" (hint: {h})")).unwrap_or_default())]
    Syntax { path: PathBuf, line: usize, message: String, hint: Option<String> },
}

/// Where the image starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// An empty root filesystem.
    Scratch,
    /// A local image tar (OCI layout or docker-archive), relative to the context.
    Tar(PathBuf),
}

/// Where the sources of a COPY come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopySource {
    /// Files of the build context.
    Context,
    /// `--from=cargo`: executables that away builds from the context's Cargo.toml
    /// as static binaries (sources are binary names).
    Cargo,
}

/// One COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub from: CopySource,
    pub sources: Vec<String>,
    pub dest: String,
    /// `--chmod=755`: permission bits for the copied files.
    pub chmod: Option<u32>,
    /// `--chown=uid:gid` (numeric only: scratch images have no /etc/passwd).
    pub chown: Option<(u64, u64)>,
    /// ADD: unpack local tar archives (.tar, .tar.gz, .tgz) instead of copying them.
    pub unpack: bool,
}

/// An instruction after FROM, with the line it started on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    Copy(Copy),
    Env(Vec<(String, String)>),
    Workdir(String),
    User(String),
    Expose(Vec<String>),
    Label(Vec<(String, String)>),
    Entrypoint(Vec<String>),
    Cmd(Vec<String>),
}

/// A parsed recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    pub base: Base,
    /// (line number, instruction)
    pub instructions: Vec<(usize, Instruction)>,
}

impl Recipe {
    /// Read and parse a Containerfile.
    pub fn from_file(path: &Path) -> Result<Recipe, RecipeError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| RecipeError::Read { path: path.to_path_buf(), source })?;
        Recipe::parse(&text, path)
    }

    /// Parse recipe text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Recipe, RecipeError> {
        let err = |line: usize, message: String, hint: Option<&str>| RecipeError::Syntax {
            path: path.to_path_buf(),
            line,
            message,
            hint: hint.map(str::to_string),
        };
        let mut base = None;
        let mut instructions = Vec::new();
        for (line, logical) in logical_lines(text) {
            let (word, rest) = match logical.split_once(char::is_whitespace) {
                Some((w, r)) => (w, r.trim()),
                None => (logical.as_str(), ""),
            };
            let keyword = word.to_ascii_uppercase();
            if keyword != "FROM" && base.is_none() {
                return Err(err(
                    line,
                    format!("{keyword} before FROM"),
                    Some("the first instruction must be FROM scratch or FROM <image.tar>"),
                ));
            }
            let needs_arg = |what: &str| -> Result<(), RecipeError> {
                if rest.is_empty() {
                    Err(err(line, format!("{keyword} needs {what}"), None))
                } else {
                    Ok(())
                }
            };
            let ins = match keyword.as_str() {
                "FROM" => {
                    needs_arg("an image: scratch or a local image tar")?;
                    if base.is_some() {
                        return Err(err(line, "a second FROM (multi-stage builds are not supported)".into(), Some("use COPY --from=cargo to build Rust binaries")));
                    }
                    let name = rest.split_whitespace().next().unwrap_or_default();
                    if rest.split_whitespace().count() > 1 {
                        return Err(err(line, "FROM takes one argument (no AS stage names)".into(), None));
                    }
                    base = Some(if name == "scratch" {
                        Base::Scratch
                    } else if name.ends_with(".tar") || name.ends_with(".tar.gz") || name.ends_with(".tgz") {
                        Base::Tar(PathBuf::from(name))
                    } else {
                        return Err(err(
                            line,
                            format!("FROM {name}: only scratch or a local image tar can be a base"),
                            Some("pulling from a registry is not supported; `docker save IMAGE -o base.tar` into the context and write FROM base.tar"),
                        ));
                    });
                    continue;
                }
                "COPY" | "ADD" => {
                    needs_arg("sources and a destination")?;
                    Instruction::Copy(parse_copy(rest, keyword == "ADD").map_err(|(m, h)| err(line, format!("{keyword}: {m}"), h))?)
                }
                "ENV" => {
                    needs_arg("NAME=value")?;
                    Instruction::Env(parse_pairs(rest, true).map_err(|m| err(line, format!("ENV: {m}"), None))?)
                }
                "LABEL" => {
                    needs_arg("key=value")?;
                    Instruction::Label(parse_pairs(rest, false).map_err(|m| err(line, format!("LABEL: {m}"), None))?)
                }
                "WORKDIR" => {
                    needs_arg("a directory")?;
                    Instruction::Workdir(unquote(rest))
                }
                "USER" => {
                    needs_arg("a user (uid or uid:gid)")?;
                    Instruction::User(rest.to_string())
                }
                "EXPOSE" => {
                    needs_arg("a port, e.g. 8080 or 8080/tcp")?;
                    let mut ports = Vec::new();
                    for p in rest.split_whitespace() {
                        let (num, proto) = p.split_once('/').unwrap_or((p, "tcp"));
                        if num.parse::<u16>().is_err() || !matches!(proto, "tcp" | "udp" | "sctp") {
                            return Err(err(line, format!("EXPOSE: bad port {p:?}"), Some("write PORT or PORT/tcp, PORT/udp")));
                        }
                        ports.push(format!("{num}/{proto}"));
                    }
                    Instruction::Expose(ports)
                }
                "ENTRYPOINT" | "CMD" => {
                    needs_arg("a command")?;
                    let args = parse_command(rest).map_err(|m| err(line, format!("{keyword}: {m}"), Some(r#"use the exec form, e.g. ["/app", "--port", "8080"]"#)))?;
                    if keyword == "CMD" {
                        Instruction::Cmd(args)
                    } else {
                        Instruction::Entrypoint(args)
                    }
                }
                "RUN" => {
                    return Err(err(
                        line,
                        "RUN is not supported: away builds images without running anything inside them".into(),
                        Some("build programs on the host and COPY them in; for a Rust app in the context use COPY --from=cargo <binary> /<binary>"),
                    ))
                }
                other => {
                    return Err(err(
                        line,
                        format!("unknown or unsupported instruction {other}"),
                        Some("supported: FROM, COPY, ADD, ENV, WORKDIR, USER, EXPOSE, LABEL, ENTRYPOINT, CMD"),
                    ))
                }
            };
            instructions.push((line, ins));
        }
        let base =
            base.ok_or_else(|| err(1, "no FROM instruction".into(), Some("start the recipe with FROM scratch")))?;
        Ok(Recipe { base, instructions })
    }
}

/// Join continuation lines, drop comments and blanks; yields (first line number, text).
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_none()) {
            continue;
        }
        let (start, mut buf) = current.take().unwrap_or((i + 1, String::new()));
        if let Some(body) = line.strip_suffix('\\') {
            buf.push_str(body);
            buf.push(' ');
            current = Some((start, buf));
        } else {
            buf.push_str(line);
            out.push((start, buf.trim().to_string()));
        }
    }
    if let Some((start, buf)) = current {
        out.push((start, buf.trim().to_string()));
    }
    out
}

type CopyError = (String, Option<&'static str>);

fn parse_copy(rest: &str, unpack: bool) -> Result<Copy, CopyError> {
    let mut from = CopySource::Context;
    let mut chmod = None;
    let mut chown = None;
    let mut rest = rest.trim();
    while let Some(flag) = rest.strip_prefix("--") {
        let (flag, tail) = flag.split_once(char::is_whitespace).unwrap_or((flag, ""));
        rest = tail.trim_start();
        let (name, value) = flag.split_once('=').unwrap_or((flag, ""));
        match name {
            "from" if value == "cargo" => from = CopySource::Cargo,
            "from" => {
                return Err((
                    format!("--from={value} is not supported"),
                    Some("only --from=cargo (binaries built from the context's Cargo.toml)"),
                ))
            }
            "chmod" => {
                chmod = Some(
                    u32::from_str_radix(value, 8)
                        .map_err(|_| (format!("--chmod={value} is not an octal mode"), Some("e.g. --chmod=755")))?,
                )
            }
            "chown" => {
                let (u, g) = value.split_once(':').unwrap_or((value, value));
                match (u.parse(), g.parse()) {
                    (Ok(u), Ok(g)) => chown = Some((u, g)),
                    _ => {
                        return Err((
                            format!("--chown={value} must be numeric"),
                            Some("e.g. --chown=1000:1000 (scratch images have no user names)"),
                        ))
                    }
                }
            }
            _ => {
                return Err((
                    format!("unknown flag --{name}"),
                    Some("supported: --from=cargo, --chmod=MODE, --chown=UID:GID"),
                ))
            }
        }
    }
    let words = if rest.starts_with('[') {
        serde_json::from_str::<Vec<String>>(rest).map_err(|e| (format!("bad JSON array: {e}"), None))?
    } else {
        rest.split_whitespace().map(str::to_string).collect()
    };
    if words.len() < 2 {
        return Err(("needs at least one source and a destination".into(), None));
    }
    let (dest, sources) = words.split_last().expect("two words");
    if sources.len() > 1 && !dest.ends_with('/') {
        return Err((format!("with several sources the destination {dest:?} must end with /"), None));
    }
    for s in sources {
        if s.contains("://") {
            return Err((
                format!("remote source {s} is not supported"),
                Some("download it into the context and COPY it"),
            ));
        }
        if from == CopySource::Context && Path::new(s).components().any(|c| c == std::path::Component::ParentDir) {
            return Err((format!("source {s} leaves the build context"), None));
        }
    }
    Ok(Copy { from, sources: sources.to_vec(), dest: dest.clone(), chmod, chown, unpack })
}

/// `K=V K2="v 2"`; with `legacy_space`, also `ENV K some value`.
fn parse_pairs(rest: &str, legacy_space: bool) -> Result<Vec<(String, String)>, String> {
    let words = shell_words(rest)?;
    if legacy_space && !words[0].contains('=') {
        let (k, v) = rest.split_once(char::is_whitespace).ok_or_else(|| format!("{rest:?} needs a value"))?;
        return Ok(vec![(k.to_string(), unquote(v.trim()))]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("{w:?} is not key=value")),
        })
        .collect()
}

/// Exec form (JSON array) or shell form (wrapped in /bin/sh -c, as Docker does).
fn parse_command(rest: &str) -> Result<Vec<String>, String> {
    if rest.starts_with('[') {
        let args: Vec<String> = serde_json::from_str(rest).map_err(|e| format!("bad JSON array: {e}"))?;
        if args.is_empty() {
            return Err("empty command".into());
        }
        Ok(args)
    } else {
        Ok(vec!["/bin/sh".into(), "-c".into(), rest.to_string()])
    }
}

/// Split on whitespace, honouring double and single quotes and backslash escapes.
fn shell_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => cur.push(chars.next().unwrap_or('\\')),
            (Some(_), c) => cur.push(c),
            (None, '"') | (None, '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err("unterminated quote".into());
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

fn unquote(s: &str) -> String {
    shell_words(s).ok().filter(|w| w.len() == 1).map(|mut w| w.remove(0)).unwrap_or_else(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Recipe, RecipeError> {
        Recipe::parse(text, Path::new("images/x/Containerfile"))
    }

    #[test]
    fn parses_every_supported_instruction() {
        let r = parse(
            "# a comment\nFROM scratch\n\nCOPY --from=cargo --chmod=755 app /app\nADD files.tar.gz /data/\n\
             ENV A=1 B=\"two words\"\nENV LEGACY some value\nWORKDIR /data\nUSER 1000:1000\nEXPOSE 8080 9000/udp\n\
             LABEL org.example.x=\"y z\"\nENTRYPOINT [\"/app\"]\nCMD [\"--port\", \\\n  \"8080\"]\n",
        )
        .unwrap();
        assert_eq!(r.base, Base::Scratch);
        let lines: Vec<usize> = r.instructions.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, vec![4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
        let Instruction::Copy(c) = &r.instructions[0].1 else { panic!() };
        assert_eq!((c.from.clone(), c.chmod, c.dest.as_str()), (CopySource::Cargo, Some(0o755), "/app"));
        let Instruction::Copy(a) = &r.instructions[1].1 else { panic!() };
        assert!(a.unpack);
        assert_eq!(
            r.instructions[2].1,
            Instruction::Env(vec![("A".into(), "1".into()), ("B".into(), "two words".into())])
        );
        assert_eq!(r.instructions[3].1, Instruction::Env(vec![("LEGACY".into(), "some value".into())]));
        assert_eq!(r.instructions[6].1, Instruction::Expose(vec!["8080/tcp".into(), "9000/udp".into()]));
        assert_eq!(r.instructions[7].1, Instruction::Label(vec![("org.example.x".into(), "y z".into())]));
        assert_eq!(r.instructions[9].1, Instruction::Cmd(vec!["--port".into(), "8080".into()]));
    }

    #[test]
    fn shell_form_becomes_sh_c() {
        let r = parse("FROM scratch\nCMD echo hi\n").unwrap();
        assert_eq!(r.instructions[0].1, Instruction::Cmd(vec!["/bin/sh".into(), "-c".into(), "echo hi".into()]));
    }

    #[test]
    fn from_local_tar() {
        assert_eq!(parse("FROM base.tar\n").unwrap().base, Base::Tar("base.tar".into()));
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn run_is_refused_with_line_and_hint() {
        let e = error("FROM scratch\n\nRUN apt-get install -y curl\n");
        assert!(e.starts_with("images/x/Containerfile:3: RUN is not supported"), "{e}");
        assert!(e.contains("hint: "), "{e}");
    }

    #[test]
    fn bad_recipes_name_the_line() {
        for (text, line, needle) in [
            ("FROM scratch\nHEALTHCHECK CMD true\n", 2, "unknown or unsupported instruction HEALTHCHECK"),
            ("COPY a /a\n", 1, "COPY before FROM"),
            ("", 1, "no FROM"),
            ("FROM ubuntu:22.04\n", 1, "only scratch or a local image tar"),
            ("FROM scratch\nFROM scratch\n", 2, "a second FROM"),
            ("FROM scratch\nEXPOSE http\n", 2, "bad port"),
            ("FROM scratch\nCOPY a b /dest\n", 2, "must end with /"),
            ("FROM scratch\nCOPY ../secret /s\n", 2, "leaves the build context"),
            ("FROM scratch\nCOPY --from=builder /a /a\n", 2, "--from=builder is not supported"),
            ("FROM scratch\nADD https://x/y.tar /\n", 2, "remote source"),
            ("FROM scratch\n\nCMD [\"a\",\n", 3, "bad JSON array"),
            ("FROM scratch\nENV\n", 2, "ENV needs"),
            ("FROM scratch\nLABEL novalue\n", 2, "is not key=value"),
        ] {
            let e = error(text);
            assert!(e.starts_with(&format!("images/x/Containerfile:{line}: ")), "{text:?} -> {e}");
            assert!(e.contains(needle), "{text:?} -> {e}");
        }
    }
}

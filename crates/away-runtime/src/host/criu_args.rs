//! The CRIU and runc command lines away runs, as typed options turned into argv (as
//! `qemu/command.rs` does for QEMU): only the options away uses, each spelled once.
//! The binary itself (its path, an `nsenter` in front, a supervising shell) is the
//! caller's.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

/// `criu dump`: checkpoint process tree `pid` into `images_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuDump {
    /// `-t`: the root of the tree.
    pub pid: u32,
    /// `-D`: where the images go.
    pub images_dir: PathBuf,
    /// `--lazy-pages --address --port`: leave the memory out of the images and serve it
    /// from a page server listening there until a lazy-pages daemon has fetched it.
    pub lazy_pages: Option<SocketAddr>,
    /// `--leave-running`: the process runs on after the dump.
    pub leave_running: bool,
    /// `-o`: the log file, relative to the images (or work) directory.
    pub log_file: Option<PathBuf>,
}

impl CriuDump {
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> =
            vec!["dump".into(), "-t".into(), self.pid.to_string().into(), "-D".into(), self.images_dir.clone().into()];
        if let Some(server) = self.lazy_pages {
            a.extend(["--lazy-pages".into(), "--address".into(), server.ip().to_string().into()]);
            a.extend(["--port".into(), server.port().to_string().into()]);
        }
        if self.leave_running {
            a.push("--leave-running".into());
        }
        if let Some(log) = &self.log_file {
            a.extend(["-o".into(), log.clone().into()]);
        }
        a
    }
}

/// `criu lazy-pages`: the restoring side's page daemon, which fetches the memory of a
/// lazy dump from `page_server` and hands it to the restored process as it faults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuLazyPages {
    /// `--page-server --address --port`: the page server (or a relay to it) to fetch from.
    pub page_server: SocketAddr,
    /// `--images-dir`: the checkpoint's images.
    pub images_dir: PathBuf,
    /// `--work-dir`: where its socket (`lazy-pages.socket`, which the restore connects
    /// to) and its log go.
    pub work_dir: PathBuf,
    /// `--log-file`: relative to `work_dir`.
    pub log_file: PathBuf,
    /// `-vN`: log level (CRIU's default: 2).
    pub verbosity: Option<u8>,
}

impl CriuLazyPages {
    pub fn args(&self) -> Vec<OsString> {
        let server = self.page_server;
        let mut a: Vec<OsString> = vec!["lazy-pages".into(), "--page-server".into()];
        a.extend([
            "--address".into(),
            server.ip().to_string().into(),
            "--port".into(),
            server.port().to_string().into(),
        ]);
        a.extend(["--images-dir".into(), self.images_dir.clone().into()]);
        a.extend(["--work-dir".into(), self.work_dir.clone().into()]);
        a.extend(["--log-file".into(), self.log_file.clone().into()]);
        if let Some(v) = self.verbosity {
            a.push(format!("-v{v}").into());
        }
        a
    }
}

/// `runc [--root] checkpoint … CONTAINER`: runc drives CRIU for a container runc (or a
/// containerd shim) runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncCheckpoint {
    /// Global `--root`: runc's state directory (a shim's is not runc's default).
    pub root: Option<PathBuf>,
    /// `--lazy-pages`: memory stays on the source, served by `page_server`.
    pub lazy_pages: bool,
    /// `--status-fd`: CRIU writes one byte there once the dump is on disk and the page
    /// server listens (the child must have that descriptor open, see
    /// [`super::process::inherit_fd_as`]).
    pub status_fd: Option<i32>,
    /// `--tcp-established`: checkpoint open TCP connections.
    pub tcp_established: bool,
    /// `--file-locks`: checkpoint file locks.
    pub file_locks: bool,
    /// `--page-server ADDRESS:PORT`.
    pub page_server: Option<SocketAddr>,
    /// `--image-path`.
    pub image_path: PathBuf,
    /// `--work-path`: CRIU's logs (`dump.log`) and scratch files.
    pub work_path: Option<PathBuf>,
    /// The container id.
    pub container: String,
}

impl RuncCheckpoint {
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        if let Some(root) = &self.root {
            a.extend(["--root".into(), root.clone().into()]);
        }
        a.push("checkpoint".into());
        if self.lazy_pages {
            a.push("--lazy-pages".into());
        }
        if let Some(fd) = self.status_fd {
            a.extend(["--status-fd".into(), fd.to_string().into()]);
        }
        if self.tcp_established {
            a.push("--tcp-established".into());
        }
        if self.file_locks {
            a.push("--file-locks".into());
        }
        if let Some(server) = self.page_server {
            a.extend(["--page-server".into(), server.to_string().into()]);
        }
        a.extend(["--image-path".into(), self.image_path.clone().into()]);
        if let Some(work) = &self.work_path {
            a.extend(["--work-path".into(), work.clone().into()]);
        }
        a.push(self.container.clone().into());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn strs(a: Vec<OsString>) -> Vec<String> {
        a.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn lazy_dump_that_leaves_the_process_running() {
        let dump = CriuDump {
            pid: 4242,
            images_dir: "/tmp/probe".into(),
            lazy_pages: Some((Ipv4Addr::LOCALHOST, 27000).into()),
            leave_running: true,
            log_file: Some("dump.log".into()),
        };
        #[rustfmt::skip]
        assert_eq!(strs(dump.args()), ["dump", "-t", "4242", "-D", "/tmp/probe", "--lazy-pages", "--address",
            "127.0.0.1", "--port", "27000", "--leave-running", "-o", "dump.log"]);
        let plain = CriuDump { lazy_pages: None, leave_running: false, log_file: None, ..dump };
        assert_eq!(strs(plain.args()), ["dump", "-t", "4242", "-D", "/tmp/probe"]);
    }

    #[test]
    fn lazy_pages_daemon() {
        let daemon = CriuLazyPages {
            page_server: (Ipv4Addr::LOCALHOST, 41000).into(),
            images_dir: "/var/lib/away/in/c1".into(),
            work_dir: "/var/lib/away/in/c1/criu-work".into(),
            log_file: "lazy-pages.log".into(),
            verbosity: Some(4),
        };
        #[rustfmt::skip]
        assert_eq!(strs(daemon.args()), ["lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", "41000",
            "--images-dir", "/var/lib/away/in/c1", "--work-dir", "/var/lib/away/in/c1/criu-work",
            "--log-file", "lazy-pages.log", "-v4"]);
        assert_eq!(strs(CriuLazyPages { verbosity: None, ..daemon }.args()).last().unwrap(), "lazy-pages.log");
    }

    #[test]
    fn runc_lazy_checkpoint_of_a_shim_container() {
        let c = RuncCheckpoint {
            root: Some("/run/containerd/runc/away".into()),
            lazy_pages: true,
            status_fd: Some(3),
            tcp_established: true,
            file_locks: true,
            page_server: Some((Ipv4Addr::LOCALHOST, 27001).into()),
            image_path: "/var/lib/away/out/c1".into(),
            work_path: Some("/var/lib/away/out/c1/criu-work".into()),
            container: "c1".into(),
        };
        #[rustfmt::skip]
        assert_eq!(strs(c.args()), ["--root", "/run/containerd/runc/away", "checkpoint", "--lazy-pages",
            "--status-fd", "3", "--tcp-established", "--file-locks", "--page-server", "127.0.0.1:27001",
            "--image-path", "/var/lib/away/out/c1", "--work-path", "/var/lib/away/out/c1/criu-work", "c1"]);
        let plain = RuncCheckpoint {
            root: None,
            lazy_pages: false,
            status_fd: None,
            tcp_established: false,
            file_locks: false,
            page_server: None,
            work_path: None,
            ..c
        };
        assert_eq!(strs(plain.args()), ["checkpoint", "--image-path", "/var/lib/away/out/c1", "c1"]);
    }
}

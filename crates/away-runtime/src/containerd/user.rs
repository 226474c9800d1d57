//! `USER name[:group]` resolved from the image's own /etc/passwd and /etc/group, with
//! the rules Docker applies (moby/sys/user's `GetExecUser`): a numeric uid needs no
//! entry (its group is then 0); a name must have one; an explicit group replaces the
//! primary group, otherwise the groups that list the user become supplementary groups.
//! Hand-written: the crates that parse these files read the host's, not a rootfs's.

use std::path::{Path, PathBuf};

/// The credentials a container's process starts with (default: root, no entry).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// The home directory of the passwd entry; None without an entry.
    pub home: Option<String>,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        Some(PasswdEntry {
            name: f.first()?,
            uid: f.get(2)?.parse().ok()?,
            gid: f.get(3)?.parse().ok()?,
            home: f.get(5).copied().unwrap_or(""),
        })
    })
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        Some(GroupEntry {
            name: f.first()?,
            gid: f.get(2)?.parse().ok()?,
            members: f.get(3).map(|m| m.split(',').filter(|s| !s.is_empty()).collect()).unwrap_or_default(),
        })
    })
}

/// Resolve `spec` (`""`, `name`, `uid`, `name:group`, `uid:gid`, `name:gid`...) against the
/// image's passwd and group files (None: the image has no such file). The error says
/// what is missing.
pub(super) fn resolve(spec: &str, passwd: Option<&str>, group: Option<&str>) -> Result<ExecUser, String> {
    let (user_arg, group_arg) = spec.split_once(':').unwrap_or((spec, ""));
    let uid_arg: Option<u32> = user_arg.parse().ok();
    let mut out = ExecUser::default();
    let found = passwd.and_then(|text| {
        passwd_entries(text).find(|e| match (user_arg, uid_arg) {
            ("", _) => e.uid == 0,
            (_, Some(uid)) => e.uid == uid,
            (name, None) => e.name == name,
        })
    });
    let matched_name = match (&found, uid_arg) {
        (Some(e), _) => {
            out.uid = e.uid;
            out.gid = e.gid;
            out.home = Some(e.home.to_string());
            Some(e.name)
        }
        (None, Some(uid)) => {
            out.uid = uid;
            None
        }
        (None, None) if user_arg.is_empty() => None,
        (None, None) => {
            return Err(match passwd {
                Some(_) => format!("user {user_arg:?} is not in the image's /etc/passwd"),
                None => format!("user {user_arg:?} cannot be found: the image has no /etc/passwd"),
            })
        }
    };
    if !group_arg.is_empty() {
        let gid_arg: Option<u32> = group_arg.parse().ok();
        let by_entry = group.and_then(|text| {
            group_entries(text)
                .find(|g| match gid_arg {
                    Some(gid) => g.gid == gid,
                    None => g.name == group_arg,
                })
                .map(|g| g.gid)
        });
        out.gid = match (by_entry, gid_arg) {
            (Some(gid), _) | (None, Some(gid)) => gid,
            (None, None) => {
                return Err(match group {
                    Some(_) => format!("group {group_arg:?} is not in the image's /etc/group"),
                    None => format!("group {group_arg:?} cannot be found: the image has no /etc/group"),
                })
            }
        };
    } else if let (Some(name), Some(text)) = (matched_name, group) {
        out.additional_gids = group_entries(text).filter(|g| g.members.contains(&name)).map(|g| g.gid).collect();
    }
    Ok(out)
}

/// The text of `rel` (e.g. `etc/passwd`) in the container's rootfs, read from the
/// snapshot's layer directories, top first: the overlay's upper and lower dirs, or a
/// bind mount's source. An overlay whiteout (a 0:0 character device) hides the file.
pub(super) fn rootfs_file(mounts: &[containerd_client::types::Mount], rel: &str) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut layers: Vec<PathBuf> = Vec::new();
    for m in mounts {
        if m.r#type == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") {
            layers.push(PathBuf::from(&m.source));
        }
        for o in &m.options {
            if let Some(upper) = o.strip_prefix("upperdir=") {
                layers.push(PathBuf::from(upper));
            }
        }
        for o in &m.options {
            if let Some(lower) = o.strip_prefix("lowerdir=") {
                layers.extend(lower.split(':').map(PathBuf::from));
            }
        }
    }
    for layer in layers {
        let path = Path::new(&layer).join(rel);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_char_device() => return None,
            Ok(_) => return std::fs::read_to_string(&path).ok(),
            Err(_) => continue,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nadm:x:4:www-data\nwww-data:x:33:\nstaff:x:50:www-data,other\nnogroup:x:65534:\n";

    fn ok(spec: &str) -> (u32, u32, Vec<u32>, Option<String>) {
        let u = resolve(spec, Some(PASSWD), Some(GROUP)).unwrap();
        (u.uid, u.gid, u.additional_gids, u.home)
    }

    #[test]
    fn names_and_ids_resolve_as_docker_does() {
        assert_eq!(ok(""), (0, 0, vec![], Some("/root".into())));
        assert_eq!(ok("root"), (0, 0, vec![], Some("/root".into())));
        // the groups listing the user become supplementary groups
        assert_eq!(ok("www-data"), (33, 33, vec![4, 50], Some("/var/www".into())));
        assert_eq!(ok("33"), (33, 33, vec![4, 50], Some("/var/www".into())));
        // an explicit group replaces the primary one and brings no supplementary groups
        assert_eq!(ok("www-data:staff"), (33, 50, vec![], Some("/var/www".into())));
        assert_eq!(ok("nobody:nogroup"), (65534, 65534, vec![], Some("/nonexistent".into())));
        assert_eq!(ok("nobody:1234"), (65534, 1234, vec![], Some("/nonexistent".into())));
        // a uid without entry needs none; its group is 0 unless given
        assert_eq!(ok("1000"), (1000, 0, vec![], None));
        assert_eq!(ok("1000:1000"), (1000, 1000, vec![], None));
        assert_eq!(ok("1000:staff"), (1000, 50, vec![], None));
    }

    #[test]
    fn a_missing_user_or_group_is_named() {
        let err = resolve("nginx", Some(PASSWD), Some(GROUP)).unwrap_err();
        assert_eq!(err, "user \"nginx\" is not in the image's /etc/passwd");
        let err = resolve("nobody:wheel", Some(PASSWD), Some(GROUP)).unwrap_err();
        assert_eq!(err, "group \"wheel\" is not in the image's /etc/group");
        let err = resolve("nobody", None, None).unwrap_err();
        assert!(err.contains("no /etc/passwd"), "{err}");
        // a scratch image runs as root or as numeric ids
        assert_eq!(resolve("", None, None).unwrap(), ExecUser::default());
        assert_eq!(resolve("10:20", None, None).unwrap().gid, 20);
    }

    #[test]
    fn files_are_read_from_the_top_layer_down() {
        let dir = tempfile::tempdir().unwrap();
        let (upper, mid, low) = (dir.path().join("u"), dir.path().join("m"), dir.path().join("l"));
        for (d, text) in [(&mid, "mid"), (&low, "low")] {
            std::fs::create_dir_all(d.join("etc")).unwrap();
            std::fs::write(d.join("etc/passwd"), text).unwrap();
        }
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        let mount = |options: Vec<String>| containerd_client::types::Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            options,
            ..Default::default()
        };
        let overlay = mount(vec![
            format!("upperdir={}", upper.display()),
            format!("lowerdir={}:{}", mid.display(), low.display()),
        ]);
        assert_eq!(rootfs_file(std::slice::from_ref(&overlay), "etc/passwd").as_deref(), Some("mid"));
        assert_eq!(rootfs_file(std::slice::from_ref(&overlay), "etc/group"), None);
        let bind = containerd_client::types::Mount {
            r#type: "bind".into(),
            source: low.display().to_string(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        };
        assert_eq!(rootfs_file(&[bind], "etc/passwd").as_deref(), Some("low"));
    }
}

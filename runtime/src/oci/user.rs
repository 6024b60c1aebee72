//! The user and groups a container's process runs as.
//!
//! Follows containerd's CRI plugin: the CRI `run_as_username` or
//! `run_as_user` (plus `run_as_group`) wins over the image's `USER`
//! ("name", "uid", "uid:gid", "name:group", "uid:group", "name:gid"); names
//! are resolved in the image's own `/etc/passwd` and `/etc/group`, read
//! through [`super::inroot`] so that no symlink in the image can make berthd
//! read a host file. The supplementary groups are the primary gid, the groups
//! of `/etc/group` that list the user (policy Merge, the default), then the
//! CRI `supplemental_groups`.

use std::path::Path;

use berth_cri::v1::{LinuxContainerSecurityContext, SupplementalGroupsPolicy};
use oci_spec::runtime::User;

use super::inroot;
use crate::error::{Error, Result};

/// /etc/passwd and /etc/group larger than this are read only this far.
const MAX_DB_BYTES: u64 = 32 << 20;

/// One side of "user[:group]".
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ident {
    Id(u32),
    Name(String),
}

impl Ident {
    fn parse(s: &str) -> Ident {
        match s.parse::<u32>() {
            Ok(id) => Ident::Id(id),
            Err(_) => Ident::Name(s.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?.trim();
            let _password = f.next()?;
            let uid = f.next()?.trim().parse().ok()?;
            let gid = f.next()?.trim().parse().ok()?;
            (!name.is_empty()).then(|| PasswdEntry {
                name: name.to_string(),
                uid,
                gid,
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?.trim();
            let _password = f.next()?;
            let gid = f.next()?.trim().parse().ok()?;
            let members = f
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect();
            (!name.is_empty()).then(|| GroupEntry {
                name: name.to_string(),
                gid,
                members,
            })
        })
        .collect()
}

/// The image's user databases, read on first use.
struct Databases<'a> {
    rootfs: &'a Path,
    passwd: Option<Vec<PasswdEntry>>,
    group: Option<Vec<GroupEntry>>,
}

impl<'a> Databases<'a> {
    fn new(rootfs: &'a Path) -> Self {
        Databases {
            rootfs,
            passwd: None,
            group: None,
        }
    }

    fn read(&self, path: &str) -> Result<String> {
        match inroot::read_file(self.rootfs, path, MAX_DB_BYTES) {
            Ok(Some(bytes)) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
            Ok(None) => Ok(String::new()),
            Err(e) => Err(Error::io(
                format!("read {path} of the image at {}", self.rootfs.display()),
                e,
            )),
        }
    }

    fn passwd(&mut self) -> Result<&[PasswdEntry]> {
        if self.passwd.is_none() {
            self.passwd = Some(parse_passwd(&self.read("/etc/passwd")?));
        }
        Ok(self.passwd.as_deref().unwrap_or_default())
    }

    fn group(&mut self) -> Result<&[GroupEntry]> {
        if self.group.is_none() {
            self.group = Some(parse_group(&self.read("/etc/group")?));
        }
        Ok(self.group.as_deref().unwrap_or_default())
    }
}

/// The largest uid or gid a container may run as: Kubernetes' bound. Above
/// it sit ids the kernel reads specially: (u32)-1 means "unchanged" to
/// setresuid, so a container asking for 4294967295 would stay root.
const MAX_ID: u32 = i32::MAX as u32;

fn id_from_i64(what: &str, v: i64) -> Result<u32> {
    u32::try_from(v)
        .ok()
        .filter(|id| *id <= MAX_ID)
        .ok_or_else(|| {
            Error::InvalidArgument(format!("{what} {v} is out of range (0 to {MAX_ID})"))
        })
}

/// Resolves the process user of a container: `security` is the container's
/// CRI security context, `image_user` the image config's `User` (may be
/// empty, meaning root). Reads `<rootfs>/etc/passwd` and `<rootfs>/etc/group`
/// only when a name must be resolved or groups collected, always inside the
/// rootfs. A missing `/etc/passwd` is fine for numeric ids (gid 0 then); an
/// unknown user or group name is `InvalidArgument`.
pub fn resolve_user(
    rootfs: &Path,
    security: Option<&LinuxContainerSecurityContext>,
    image_user: &str,
) -> Result<User> {
    let run_as_user = security.and_then(|s| s.run_as_user).map(|v| v.value);
    let run_as_group = security.and_then(|s| s.run_as_group).map(|v| v.value);
    let run_as_username = security.map(|s| s.run_as_username.as_str()).unwrap_or("");
    let extra_groups = security
        .map(|s| s.supplemental_groups.as_slice())
        .unwrap_or(&[]);
    let strict = match security.map(|s| s.supplemental_groups_policy) {
        None => false,
        Some(p) => match SupplementalGroupsPolicy::try_from(p) {
            Ok(SupplementalGroupsPolicy::Merge) => false,
            Ok(SupplementalGroupsPolicy::Strict) => true,
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "unknown supplemental_groups_policy {p}"
                )));
            }
        },
    };

    // Which user and group were asked for, and by whom.
    let (user, group) = if !run_as_username.is_empty() || run_as_user.is_some() {
        let user = if !run_as_username.is_empty() {
            Ident::Name(run_as_username.to_string())
        } else {
            Ident::Id(id_from_i64("run_as_user", run_as_user.unwrap_or_default())?)
        };
        let group = run_as_group
            .map(|g| id_from_i64("run_as_group", g))
            .transpose()?
            .map(Ident::Id);
        (user, group)
    } else if let Some(g) = run_as_group {
        return Err(Error::InvalidArgument(format!(
            "run_as_group {g} is specified without run_as_user or run_as_username"
        )));
    } else {
        let image_user = image_user.trim();
        let (u, g) = match image_user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (image_user, None),
        };
        let user = if u.is_empty() {
            Ident::Id(0)
        } else {
            Ident::parse(u)
        };
        let group = g.filter(|g| !g.is_empty()).map(Ident::parse);
        (user, group)
    };

    let mut db = Databases::new(rootfs);

    // uid, primary gid from passwd, and the user's name when known.
    let (uid, passwd_gid, name) = match &user {
        Ident::Name(name) => match db.passwd()?.iter().find(|e| &e.name == name) {
            Some(e) => (e.uid, e.gid, Some(e.name.clone())),
            None => {
                return Err(Error::InvalidArgument(format!(
                    "user {name:?} not found in /etc/passwd of the image"
                )));
            }
        },
        Ident::Id(uid) => {
            // Only read passwd when it can change the answer.
            if group.is_none() || !strict {
                match db.passwd()?.iter().find(|e| e.uid == *uid) {
                    Some(e) => (*uid, e.gid, Some(e.name.clone())),
                    None => (*uid, 0, None),
                }
            } else {
                (*uid, 0, None)
            }
        }
    };

    let gid = match &group {
        None => passwd_gid,
        Some(Ident::Id(g)) => *g,
        Some(Ident::Name(gname)) => match db.group()?.iter().find(|e| &e.name == gname) {
            Some(e) => e.gid,
            None => {
                return Err(Error::InvalidArgument(format!(
                    "group {gname:?} not found in /etc/group of the image"
                )));
            }
        },
    };

    let mut gids = vec![gid];
    if !strict && let Some(name) = &name {
        for g in db.group()? {
            if g.members.iter().any(|m| m == name) && !gids.contains(&g.gid) {
                gids.push(g.gid);
            }
        }
    }
    for g in extra_groups {
        let g = id_from_i64("supplemental group", *g)?;
        if !gids.contains(&g) {
            gids.push(g);
        }
    }

    // Ids from the image (its USER, passwd, group) are bounded too.
    for (what, id) in [("uid", uid), ("gid", gid)]
        .into_iter()
        .chain(gids.iter().map(|g| ("supplemental gid", *g)))
    {
        if id > MAX_ID {
            return Err(Error::InvalidArgument(format!(
                "{what} {id} is out of range (0 to {MAX_ID})"
            )));
        }
    }
    let mut out = User::default();
    out.set_uid(uid);
    out.set_gid(gid);
    out.set_additional_gids(Some(gids));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use berth_cri::v1::Int64Value;

    use super::*;

    #[test]
    fn ids_beyond_kubernetes_bound_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [4_294_967_295_i64, 2_147_483_648, -1] {
            let s = LinuxContainerSecurityContext {
                run_as_user: Some(Int64Value { value: bad }),
                ..Default::default()
            };
            let err = resolve_user(dir.path(), Some(&s), "").unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
            let s = LinuxContainerSecurityContext {
                run_as_user: Some(Int64Value { value: 1000 }),
                run_as_group: Some(Int64Value { value: bad }),
                ..Default::default()
            };
            assert!(
                resolve_user(dir.path(), Some(&s), "").is_err(),
                "group {bad}"
            );
        }
        for image_user in ["4294967295", "1000:4294967295"] {
            let err = resolve_user(dir.path(), None, image_user).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument(_)),
                "{image_user}: {err}"
            );
        }
        let s = LinuxContainerSecurityContext {
            run_as_user: Some(Int64Value {
                value: 2_147_483_647,
            }),
            ..Default::default()
        };
        assert_eq!(
            resolve_user(dir.path(), Some(&s), "").unwrap().uid(),
            2_147_483_647
        );
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
        www-data:x:33:33:www-data:/var/www:/bin/false\n\
        app:x:1000:1000::/home/app:/bin/sh\n\
        broken line\n";
    const GROUP: &str = "root:x:0:\n\
        www-data:x:33:\n\
        app:x:1000:\n\
        audio:x:29:app,www-data\n\
        video:x:44:app\n\
        staff:x:50000:other\n";

    fn rootfs(passwd: Option<&str>, group: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        if let Some(p) = passwd {
            std::fs::write(dir.path().join("etc/passwd"), p).unwrap();
        }
        if let Some(g) = group {
            std::fs::write(dir.path().join("etc/group"), g).unwrap();
        }
        dir
    }

    fn sc(f: impl FnOnce(&mut LinuxContainerSecurityContext)) -> LinuxContainerSecurityContext {
        let mut s = LinuxContainerSecurityContext::default();
        f(&mut s);
        s
    }

    fn ids(u: &User) -> (u32, u32, Vec<u32>) {
        (
            u.uid(),
            u.gid(),
            u.additional_gids().clone().unwrap_or_default(),
        )
    }

    #[test]
    fn image_user_forms() {
        let r = rootfs(Some(PASSWD), Some(GROUP));
        let p = r.path();
        assert_eq!(ids(&resolve_user(p, None, "").unwrap()), (0, 0, vec![0]));
        assert_eq!(
            ids(&resolve_user(p, None, "app").unwrap()),
            (1000, 1000, vec![1000, 29, 44])
        );
        assert_eq!(
            ids(&resolve_user(p, None, "1000").unwrap()),
            (1000, 1000, vec![1000, 29, 44])
        );
        assert_eq!(
            ids(&resolve_user(p, None, "1003:1004").unwrap()),
            (1003, 1004, vec![1004])
        );
        assert_eq!(
            ids(&resolve_user(p, None, "www-data:1004").unwrap()),
            (33, 1004, vec![1004, 29])
        );
        assert_eq!(
            ids(&resolve_user(p, None, "app:video").unwrap()),
            (1000, 44, vec![44, 29])
        );
        assert_eq!(
            ids(&resolve_user(p, None, "4242").unwrap()),
            (4242, 0, vec![0])
        );
        let err = resolve_user(p, None, "app:nogroup").unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(ref m) if m.contains("\"nogroup\"")),
            "{err}"
        );
    }

    #[test]
    fn cri_user_wins_over_the_image() {
        let r = rootfs(Some(PASSWD), Some(GROUP));
        let p = r.path();
        let s = sc(|s| s.run_as_user = Some(Int64Value { value: 1001 }));
        assert_eq!(
            ids(&resolve_user(p, Some(&s), "app:44").unwrap()),
            (1001, 0, vec![0])
        );
        let s = sc(|s| {
            s.run_as_user = Some(Int64Value { value: 1001 });
            s.run_as_group = Some(Int64Value { value: 1002 });
        });
        assert_eq!(
            ids(&resolve_user(p, Some(&s), "app").unwrap()),
            (1001, 1002, vec![1002])
        );
        let s = sc(|s| s.run_as_username = "nobody".into());
        assert_eq!(
            ids(&resolve_user(p, Some(&s), "").unwrap()),
            (65534, 65534, vec![65534])
        );
        let s = sc(|s| {
            s.run_as_username = "www-data".into();
            s.run_as_group = Some(Int64Value { value: 7 });
        });
        assert_eq!(
            ids(&resolve_user(p, Some(&s), "").unwrap()),
            (33, 7, vec![7, 29])
        );
    }

    #[test]
    fn run_as_group_alone_is_refused() {
        let r = rootfs(Some(PASSWD), None);
        let s = sc(|s| s.run_as_group = Some(Int64Value { value: 1002 }));
        let err = resolve_user(r.path(), Some(&s), "app").unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }

    #[test]
    fn out_of_range_ids_are_refused() {
        let r = rootfs(None, None);
        let s = sc(|s| s.run_as_user = Some(Int64Value { value: -1 }));
        assert!(matches!(
            resolve_user(r.path(), Some(&s), ""),
            Err(Error::InvalidArgument(_))
        ));
        let s = sc(|s| s.supplemental_groups = vec![1 << 40]);
        assert!(matches!(
            resolve_user(r.path(), Some(&s), ""),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn supplemental_groups_merge_and_strict() {
        let r = rootfs(Some(PASSWD), Some(GROUP));
        let p = r.path();
        let s = sc(|s| {
            s.run_as_user = Some(Int64Value { value: 1000 });
            s.supplemental_groups = vec![1234, 5678, 29];
        });
        assert_eq!(
            ids(&resolve_user(p, Some(&s), "").unwrap()),
            (1000, 1000, vec![1000, 29, 44, 1234, 5678])
        );
        let s = sc(|s| {
            s.run_as_user = Some(Int64Value { value: 1000 });
            s.supplemental_groups = vec![1234];
            s.supplemental_groups_policy = SupplementalGroupsPolicy::Strict as i32;
        });
        assert_eq!(
            ids(&resolve_user(p, Some(&s), "").unwrap()),
            (1000, 1000, vec![1000, 1234])
        );
    }

    #[test]
    fn numeric_ids_need_no_passwd() {
        let r = rootfs(None, None);
        assert_eq!(
            ids(&resolve_user(r.path(), None, "1234").unwrap()),
            (1234, 0, vec![0])
        );
        assert_eq!(
            ids(&resolve_user(r.path(), None, "1234:5").unwrap()),
            (1234, 5, vec![5])
        );
        let empty = tempfile::tempdir().unwrap(); // not even an /etc
        assert_eq!(
            ids(&resolve_user(empty.path(), None, "7").unwrap()),
            (7, 0, vec![0])
        );
    }

    #[test]
    fn unknown_name_is_an_error() {
        let r = rootfs(Some(PASSWD), Some(GROUP));
        let err = resolve_user(r.path(), None, "ghost").unwrap_err();
        match err {
            Error::InvalidArgument(m) => {
                assert_eq!(m, "user \"ghost\" not found in /etc/passwd of the image")
            }
            other => panic!("{other}"),
        }
        let s = sc(|s| s.run_as_username = "ghost".into());
        assert!(matches!(
            resolve_user(r.path(), Some(&s), ""),
            Err(Error::InvalidArgument(_))
        ));
        let none = rootfs(None, None);
        assert!(matches!(
            resolve_user(none.path(), None, "app"),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn symlinked_passwd_never_reads_the_host() {
        // The host's /etc/passwd has root (uid 0) in it; a rootfs whose
        // /etc/passwd points at it must see nothing.
        let r = rootfs(None, None);
        symlink("/etc/passwd", r.path().join("etc/passwd")).unwrap();
        symlink("/etc/group", r.path().join("etc/group")).unwrap();
        let err = resolve_user(r.path(), None, "root").unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert_eq!(
            ids(&resolve_user(r.path(), None, "0").unwrap()),
            (0, 0, vec![0])
        );

        // The same through a relative link climbing out, and through a
        // symlinked /etc directory.
        let r = rootfs(None, None);
        symlink(
            "../../../../../../../../etc/passwd",
            r.path().join("etc/passwd"),
        )
        .unwrap();
        assert!(resolve_user(r.path(), None, "root").is_err());
        let r = tempfile::tempdir().unwrap();
        symlink("/etc", r.path().join("etc")).unwrap();
        assert!(resolve_user(r.path(), None, "root").is_err());
    }

    #[test]
    fn a_symlink_inside_the_rootfs_is_followed() {
        let r = rootfs(None, Some(GROUP));
        std::fs::create_dir_all(r.path().join("usr/share")).unwrap();
        std::fs::write(r.path().join("usr/share/passwd"), PASSWD).unwrap();
        symlink("/usr/share/passwd", r.path().join("etc/passwd")).unwrap();
        assert_eq!(
            ids(&resolve_user(r.path(), None, "nobody").unwrap()).0,
            65534
        );
    }

    #[test]
    fn parsers_skip_garbage() {
        let p = parse_passwd("a:x:1:2::/:/bin/sh\n:x:3:4\nb:x:notanumber:1\nc:x:5\n");
        assert_eq!(
            p,
            vec![PasswdEntry {
                name: "a".into(),
                uid: 1,
                gid: 2
            }]
        );
        let g = parse_group("g:x:10:a, b ,\nh:x:11\n");
        assert_eq!(g[0].members, vec!["a", "b"]);
        assert_eq!(
            g[1],
            GroupEntry {
                name: "h".into(),
                gid: 11,
                members: vec![]
            }
        );
    }
}

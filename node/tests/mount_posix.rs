//! POSIX behaviour of a read-write mount against the local file system: each case runs
//! the same operations, as root or as another user (setpriv), in a local directory and in
//! a mount, and the two must give the same results and the same errno. Then the mount's
//! tree is committed, exported and compared with the local one (owners, modes, devices,
//! extended attributes).
//!
//! Needs root (CI runs as root), /dev/fuse, fusermount3, setpriv and /usr/bin/python3.
//! Without root it is skipped, saying so; without FUSE it fails unless FORGE_SKIP_FUSE=1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command as StdCommand;

mod common;

/// Runs one case's Python in `base` (the working directory), as root or as `uid`:`gid`
/// with supplementary `groups`; prints one line per operation: its name and `ok`, a
/// value, or the errno's name.
const PROBE: &str = r#"
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class TimeSpec(ctypes.Structure):
    _fields_ = [("seconds", ctypes.c_long), ("nanoseconds", ctypes.c_long)]
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
def check(result):
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
def utimens(path, atime, mtime):
    times = (TimeSpec * 2)(TimeSpec(*atime), TimeSpec(*mtime))
    check(libc.utimensat(-100, path.encode(), times, 0x100))
def renameat2(old, new, flags):
    check(libc.renameat2(-100, old.encode(), -100, new.encode(), flags))
def st(path):
    s = os.lstat(path)
    # (A directory's size is the file system's own business.)
    size = "" if os.path.isdir(path) and not os.path.islink(path) else f" size {s.st_size}"
    return f"mode {s.st_mode:o} owner {s.st_uid}:{s.st_gid} rdev {s.st_rdev}{size}"
def times(path):
    s = os.lstat(path)
    return f"atime {s.st_atime_ns} mtime {s.st_mtime_ns}"
def run(name, operation):
    try:
        result = operation()
        print(name, "ok" if result is None else result)
    except OSError as error:
        print(name, errno.errorcode.get(error.errno, error.errno))
def write(path, data=b"x", flags=os.O_WRONLY | os.O_APPEND):
    fd = os.open(path, flags)
    os.write(fd, data)
    os.close(fd)
os.umask(0o022)
os.chdir(sys.argv[1])
exec(sys.argv[2])
"#;

/// Who runs a case: root, or a user with its group and supplementary groups.
#[derive(Clone, Copy)]
enum As {
    Root,
    User(u32, u32, &'static [u32]),
}

/// The cases, in order (each sees what the ones before it made). Names are unique per
/// case so a difference says which operation it was.
fn cases() -> Vec<(&'static str, As, &'static str)> {
    use As::{Root, User};
    vec![
        (
            "setup",
            Root,
            r#"
os.mkdir("sticky"); os.chmod("sticky", 0o1777)
os.mkdir("private", 0o700); os.chown("private", 1000, 1000)
write("private/f", flags=os.O_WRONLY | os.O_CREAT); os.chown("private/f", 1000, 1000)
os.mkdir("shared"); os.chown("shared", 0, 2000); os.chmod("shared", 0o2775)
os.mkdir("links"); os.chown("links", 1000, 1000)
for name, owner, mode in (("suid", (1000, 1000), 0o4755), ("sgid", (1000, 2000), 0o2755),
                          ("sgid-acl", (1000, 2000), 0o2755), ("sgid-acl-kept", (1000, 2000), 0o2755)):
    write(name, flags=os.O_WRONLY | os.O_CREAT); os.chown(name, *owner); os.chmod(name, mode)
run("stat suid", lambda: st("suid"))
"#,
        ),
        (
            "create in a sticky directory",
            User(1000, 1000, &[]),
            r#"
run("create", lambda: write("sticky/a", b"from 1000", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
run("stat", lambda: st("sticky/a"))
run("mkdir", lambda: os.mkdir("sticky/dir-of-1000"))
run("create inside", lambda: write("sticky/dir-of-1000/f", flags=os.O_WRONLY | os.O_CREAT))
"#,
        ),
        (
            "sticky rules for another user",
            User(1001, 1001, &[]),
            r#"
run("unlink other's", lambda: os.unlink("sticky/a"))
run("rename other's", lambda: os.rename("sticky/a", "sticky/b"))
run("rmdir other's", lambda: os.rmdir("sticky/dir-of-1000"))
run("create own", lambda: write("sticky/c", b"from 1001", os.O_WRONLY | os.O_CREAT))
run("write other's", lambda: write("sticky/a"))
run("read other's", lambda: open("sticky/a").read())
run("list private", lambda: sorted(os.listdir("private")))
run("open in private", lambda: open("private/f").read())
run("chmod other's", lambda: os.chmod("sticky/a", 0o666))
run("chown other's", lambda: os.chown("sticky/a", 1001, 1001))
"#,
        ),
        (
            "owner rules",
            User(1000, 1000, &[]),
            r#"
run("unlink other's in sticky", lambda: os.unlink("sticky/c"))
run("give away", lambda: os.chown("private/f", 1001, -1))
run("chgrp to a group not mine", lambda: os.chown("private/f", -1, 2000))
run("rmdir non-empty", lambda: os.rmdir("sticky/dir-of-1000"))
run("write clears setgid", lambda: write("sgid"))
run("stat sgid", lambda: st("sgid"))
run("mkdir in a group directory not mine", lambda: os.mkdir("shared/no"))
"#,
        ),
        (
            "group rules",
            User(1000, 1000, &[2000]),
            r#"
run("chgrp to my group", lambda: os.chown("private/f", -1, 2000))
run("stat f", lambda: st("private/f"))
run("mkdir in setgid directory", lambda: os.mkdir("shared/d"))
run("stat d", lambda: st("shared/d"))
run("create in setgid directory", lambda: write("shared/f", flags=os.O_WRONLY | os.O_CREAT))
run("stat f in shared", lambda: st("shared/f"))
"#,
        ),
        (
            "root",
            Root,
            r#"
run("chown clears setuid", lambda: os.chown("suid", 1001, 1001))
run("stat suid", lambda: st("suid"))
run("mkfifo", lambda: os.mkfifo("fifo", 0o640))
run("stat fifo", lambda: st("fifo"))
run("mknod char", lambda: os.mknod("null", 0o620 | 0o020000, os.makedev(1, 3)))
run("stat null", lambda: st("null"))
run("mknod block", lambda: os.mknod("block", 0o600 | 0o060000, os.makedev(7, 9)))
run("stat block", lambda: st("block"))
run("mknod regular", lambda: os.mknod("plain", 0o644 | 0o100000))
run("stat plain", lambda: st("plain"))
run("set trusted", lambda: os.setxattr("plain", "trusted.k", b"root's"))
run("chown a symlink itself", lambda: (os.symlink("plain", "link"), os.lchown("link", 1000, 1000)) and None)
run("stat link", lambda: st("link"))
"#,
        ),
        (
            "a user's special files and times",
            User(1000, 1000, &[]),
            r#"
run("mkfifo", lambda: os.mkfifo("sticky/p"))
run("stat p", lambda: st("sticky/p"))
run("mknod device", lambda: os.mknod("sticky/dev", 0o600 | 0o020000, os.makedev(1, 3)))
run("set times", lambda: os.utime("sticky/a", ns=(100_000_000_005, 200_000_000_007)))
run("times", lambda: times("sticky/a"))
run("omit atime", lambda: utimens("sticky/a", (0, UTIME_OMIT), (300, 11)))
run("times after omit", lambda: times("sticky/a"))
run("set times of root's", lambda: os.utime("plain", ns=(1, 1)))
run("times now of root's", lambda: utimens("plain", (0, UTIME_NOW), (0, UTIME_NOW)))
"#,
        ),
        (
            "extended attributes",
            User(1000, 1000, &[]),
            r#"
run("set", lambda: os.setxattr("sticky/a", "user.k", b"v1"))
run("create again", lambda: os.setxattr("sticky/a", "user.k", b"v2", os.XATTR_CREATE))
run("replace missing", lambda: os.setxattr("sticky/a", "user.none", b"v", os.XATTR_REPLACE))
run("replace", lambda: os.setxattr("sticky/a", "user.k", b"v3", os.XATTR_REPLACE))
run("set second", lambda: os.setxattr("sticky/a", "user.second", b""))
run("get", lambda: os.getxattr("sticky/a", "user.k"))
run("list", lambda: sorted(os.listxattr("sticky/a")))
run("remove", lambda: os.removexattr("sticky/a", "user.second"))
run("remove missing", lambda: os.removexattr("sticky/a", "user.second"))
run("get missing", lambda: os.getxattr("sticky/a", "user.none"))
run("set trusted", lambda: os.setxattr("sticky/a", "trusted.k", b"v"))
run("list root's", lambda: sorted(os.listxattr("plain")))
run("get root's trusted", lambda: os.getxattr("plain", "trusted.k"))
run("set on other's", lambda: os.setxattr("plain", "user.k", b"v"))
run("too large", lambda: os.setxattr("sticky/a", "user.big", b"x" * 70000))
"#,
        ),
        (
            "rename flags",
            User(1000, 1000, &[]),
            r#"
write("sticky/e1", b"one", os.O_WRONLY | os.O_CREAT)
write("sticky/e2", b"two", os.O_WRONLY | os.O_CREAT)
run("noreplace onto existing", lambda: renameat2("sticky/e1", "sticky/e2", 1))
run("noreplace onto new", lambda: renameat2("sticky/e1", "sticky/e3", 1))
run("exchange", lambda: renameat2("sticky/e3", "sticky/e2", 2))
run("after exchange", lambda: (open("sticky/e2").read(), open("sticky/e3").read()))
run("exchange with missing", lambda: renameat2("sticky/e2", "sticky/none", 2))
run("exchange file and directory", lambda: renameat2("sticky/e2", "sticky/dir-of-1000", 2))
run("after exchange with directory", lambda: (open("sticky/dir-of-1000").read(), sorted(os.listdir("sticky/e2"))))
"#,
        ),
        (
            "an ACL",
            Root,
            r#"
import struct
write("acl-file", b"for 1001 by ACL", os.O_WRONLY | os.O_CREAT)
os.chmod("acl-file", 0o640)
entries = [(1, 6, 0xFFFFFFFF), (2, 4, 1001), (4, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]
acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)
run("set access ACL", lambda: os.setxattr("acl-file", "system.posix_acl_access", acl))
run("stat acl-file", lambda: st("acl-file"))
"#,
        ),
        (
            "ACL for a named user",
            User(1001, 1001, &[]),
            r#"
run("read through an ACL", lambda: open("acl-file").read())
run("write not granted", lambda: write("acl-file"))
"#,
        ),
        (
            "default ACL",
            Root,
            r#"
import struct
def acl(entries):
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)
os.mkdir("inherit"); os.chmod("inherit", 0o777)
run("set default ACL", lambda: os.setxattr("inherit", "system.posix_acl_default",
    acl([(1, 7, 0xFFFFFFFF), (2, 6, 1001), (4, 5, 0xFFFFFFFF), (0x10, 7, 0xFFFFFFFF), (0x20, 5, 0xFFFFFFFF)])))
run("equivalent access ACL is the mode", lambda: os.setxattr("acl-file", "system.posix_acl_access",
    acl([(1, 6, 0xFFFFFFFF), (4, 0, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)])))
run("stat after", lambda: st("acl-file"))
run("attributes after", lambda: sorted(os.listxattr("acl-file")))
run("garbage ACL", lambda: os.setxattr("acl-file", "system.posix_acl_access", b"junk"))
"#,
        ),
        (
            "inheriting a default ACL",
            User(1000, 1000, &[]),
            r#"
run("create", lambda: write("inherit/new", b"x", os.O_WRONLY | os.O_CREAT))
run("stat new", lambda: st("inherit/new"))
run("new's ACL", lambda: os.getxattr("inherit/new", "system.posix_acl_access"))
run("mkdir", lambda: os.mkdir("inherit/sub", 0o750))
run("stat sub", lambda: st("inherit/sub"))
run("sub's ACLs", lambda: (os.getxattr("inherit/sub", "system.posix_acl_access"), os.getxattr("inherit/sub", "system.posix_acl_default")))
run("mkfifo", lambda: os.mkfifo("inherit/pipe", 0o666))
run("stat pipe", lambda: st("inherit/pipe"))
"#,
        ),
        (
            "ACL after chmod",
            User(1001, 1001, &[]),
            r#"
run("write through inherited ACL", lambda: write("inherit/new"))
"#,
        ),
        (
            "chmod moves the mask",
            User(1000, 1000, &[]),
            r#"
run("chmod", lambda: os.chmod("inherit/new", 0o604))
run("ACL after chmod", lambda: os.getxattr("inherit/new", "system.posix_acl_access"))
run("stat after chmod", lambda: st("inherit/new"))
"#,
        ),
        (
            "mask shut",
            User(1001, 1001, &[]),
            r#"
run("write after the mask shut", lambda: write("inherit/new"))
"#,
        ),
        (
            "hard links",
            User(1000, 1000, &[]),
            r#"
write("links/a", b"one", os.O_WRONLY | os.O_CREAT)
os.mkdir("links/sub")
run("link", lambda: os.link("links/a", "links/b"))
run("link into another directory", lambda: os.link("links/a", "links/sub/c"))
run("nlink", lambda: os.lstat("links/a").st_nlink)
run("one inode", lambda: len({os.lstat(p).st_ino for p in ("links/a", "links/b", "links/sub/c")}))
run("write through one name", lambda: write("links/b", b"two"))
run("read through another", lambda: open("links/sub/c", "rb").read())
run("stat of a link", lambda: st("links/sub/c"))
run("link onto an existing name", lambda: os.link("links/a", "links/b"))
run("link a directory", lambda: os.link("links/sub", "links/sub2"))
run("link a missing file", lambda: os.link("links/none", "links/x"))
run("rename onto its own link", lambda: os.rename("links/a", "links/b"))
run("both names stay", lambda: (os.path.exists("links/a"), os.path.exists("links/b")))
run("unlink one name", lambda: os.unlink("links/b"))
run("nlink after unlink", lambda: os.lstat("links/a").st_nlink)
run("chmod through one name", lambda: os.chmod("links/sub/c", 0o640))
run("mode through the other", lambda: st("links/a"))
os.symlink("a", "links/sym"); os.mkfifo("links/fifo")
run("link a symlink", lambda: os.link("links/sym", "links/sym2", follow_symlinks=False))
run("link a fifo", lambda: os.link("links/fifo", "links/fifo2"))
run("nlink of the fifo", lambda: os.lstat("links/fifo2").st_nlink)
write("links/d", b"replaced", os.O_WRONLY | os.O_CREAT)
run("link to rename over", lambda: os.link("links/d", "links/d2"))
run("rename over a linked name", lambda: os.rename("links/sub/c", "links/d2"))
run("nlink of the replaced", lambda: os.lstat("links/d").st_nlink)
run("nlink of the moved", lambda: os.lstat("links/a").st_nlink)
run("moved name's content", lambda: open("links/d2", "rb").read())
write("links/e", b"open", os.O_WRONLY | os.O_CREAT)
fd = os.open("links/e", os.O_RDONLY)
run("unlink an open file's last name", lambda: os.unlink("links/e"))
run("nlink of an unlinked open file", lambda: os.fstat(fd).st_nlink)
os.close(fd)
run("listing", lambda: sorted(os.listdir("links")))
"#,
        ),
        (
            "hard links by another user",
            User(1001, 1001, &[]),
            r#"
run("link another user's private file", lambda: os.link("links/a", "sticky/stolen"))
run("link into another user's directory", lambda: os.link("sticky/e3", "links/mine"))
"#,
        ),
        (
            "ACL on a setgid file, owner outside its group",
            User(1000, 1000, &[]),
            r#"
import struct
acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in
    [(1, 7, 0xFFFFFFFF), (4, 5, 0xFFFFFFFF), (0x20, 5, 0xFFFFFFFF)])
run("set access ACL", lambda: os.setxattr("sgid-acl", "system.posix_acl_access", acl))
run("setgid cleared", lambda: st("sgid-acl"))
"#,
        ),
        (
            "ACL on a setgid file, owner in its group",
            User(1000, 1000, &[2000]),
            r#"
import struct
acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in
    [(1, 7, 0xFFFFFFFF), (4, 5, 0xFFFFFFFF), (0x20, 5, 0xFFFFFFFF)])
run("set access ACL", lambda: os.setxattr("sgid-acl-kept", "system.posix_acl_access", acl))
run("setgid kept", lambda: st("sgid-acl-kept"))
"#,
        ),
        (
            "known differences",
            User(1000, 1000, &[]),
            r#"
run("tmpfile", lambda: os.close(os.open("sticky", os.O_TMPFILE | os.O_WRONLY, 0o600)))
"#,
        ),
    ]
}

/// Operations whose result on the mount is known to differ from a local file system,
/// with the mount's result and the reason (asserted, so a change is noticed).
const KNOWN_DIFFERENCES: &[(&str, &str, &str)] = &[(
    "tmpfile ",
    "tmpfile ENOTSUP",
    "fuser has no tmpfile request (ENOTSUP is EOPNOTSUPP on Linux)",
)];

fn run_case(base: &Path, who: As, code: &str) -> Vec<String> {
    let mut command = match who {
        As::Root => StdCommand::new("/usr/bin/python3"),
        As::User(uid, gid, groups) => {
            let mut command = StdCommand::new("setpriv");
            let groups = if groups.is_empty() {
                "--clear-groups".to_owned()
            } else {
                format!(
                    "--groups={}",
                    groups
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                )
            };
            command.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                groups,
                "/usr/bin/python3".to_owned(),
            ]);
            command
        }
    };
    let output = command
        .args(["-c", PROBE])
        .arg(base)
        .arg(code)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "probe failed in {}: {}",
        base.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Unmounts on drop, whatever the test did.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = StdCommand::new("fusermount3")
            .arg("-uz")
            .arg(&self.0)
            .output();
    }
}

#[test]
fn syscalls_on_a_mount_match_the_local_file_system_for_every_user() {
    if !common::fuse_available() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to act as other users (CI runs as root)");
        return;
    }
    let vault = common::Vault::new();
    // Other users must reach both directories.
    fs::set_permissions(&vault.root, fs::Permissions::from_mode(0o755)).unwrap();
    vault.ok(&["volume", "create", "v"]);
    let local = vault.path("local");
    let mountpoint = vault.path("mnt");
    fs::create_dir_all(&local).unwrap();
    fs::create_dir_all(&mountpoint).unwrap();
    let _unmount = Unmount(mountpoint.clone());
    let printed = vault.ok(&[
        "volume",
        "mount",
        "v",
        mountpoint.to_str().unwrap(),
        "--background",
    ]);
    assert!(printed.starts_with("mounted"), "{printed}");
    // The root directory of each: open to every user, as the cases need.
    fs::set_permissions(&local, fs::Permissions::from_mode(0o777)).unwrap();
    fs::set_permissions(&mountpoint, fs::Permissions::from_mode(0o777)).unwrap();

    let mut table = Vec::new();
    let mut differences = Vec::new();
    for (case, who, code) in cases() {
        let expected = run_case(&local, who, code);
        let actual = run_case(&mountpoint, who, code);
        assert_eq!(
            expected.len(),
            actual.len(),
            "{case}: {expected:?} vs {actual:?}"
        );
        for (local_line, mount_line) in expected.iter().zip(&actual) {
            let operation = format!("{case}: {}", local_line.split(' ').next().unwrap_or(""));
            table.push(format!("{case:<36} | {local_line:<60} | {mount_line}"));
            if local_line != mount_line {
                let known = KNOWN_DIFFERENCES
                    .iter()
                    .any(|(name, result, _)| local_line.starts_with(name) && mount_line == result);
                if !known {
                    differences.push(format!(
                        "{operation}\n  local: {local_line}\n  mount: {mount_line}"
                    ));
                }
            }
        }
    }
    println!("case | local file system | mount\n{}", table.join("\n"));
    assert!(
        differences.is_empty(),
        "the mount differs from the local file system:\n{}",
        differences.join("\n")
    );

    // What the mount holds survives its commit: export as root and compare.
    vault.ok(&["volume", "unmount", mountpoint.to_str().unwrap()]);
    let exported = vault.path("exported");
    vault.ok(&["volume", "export", "v", exported.to_str().unwrap()]);
    let describe = |root: &Path| {
        run_case(
            root,
            As::Root,
            r#"
for directory, names, files in sorted(os.walk(".")):
    for name in sorted(names + files):
        path = os.path.join(directory, name)
        xattrs = sorted((key, os.getxattr(path, key, follow_symlinks=False)) for key in os.listxattr(path, follow_symlinks=False))
        # Times only where a case set them (the rest were made at different moments).
        when = times(path) if path == "./sticky/a" else ""
        links = "" if os.path.isdir(path) and not os.path.islink(path) else f" nlink {os.lstat(path).st_nlink}"
        print(path, st(path), xattrs, when, links)
"#,
        )
    };
    let local_tree = describe(&local);
    let exported_tree = describe(&exported);
    assert_eq!(
        local_tree.len(),
        exported_tree.len(),
        "{local_tree:#?}\n{exported_tree:#?}"
    );
    for (local_line, exported_line) in local_tree.iter().zip(&exported_tree) {
        assert_eq!(local_line, exported_line);
    }
}

/// `tar -cpf` of a mounted snapshot is byte-for-byte `tar -cpf` of the source it was
/// imported from: the same members, owners, modes, times, device numbers, extended
/// attributes and ACLs, and hard links (tar writes a second name as a link member).
#[test]
fn tar_of_a_mounted_volume_equals_tar_of_its_source() {
    if !common::fuse_available() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to give files other owners (CI runs as root)");
        return;
    }
    let vault = common::Vault::new();
    vault.ok(&["volume", "create", "v"]);
    let source = vault.path("source");
    fs::create_dir_all(&source).unwrap();
    run_case(
        &source,
        As::Root,
        r#"
import struct
def acl(entries):
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)
UNDEFINED = 0xFFFFFFFF
os.makedirs("etc/app"); os.makedirs("srv/drop"); os.makedirs("home/user")
write("etc/app/config", b"key = value\n", os.O_WRONLY | os.O_CREAT)
os.chmod("etc/app/config", 0o640); os.chown("etc/app/config", 0, 2000)
os.setxattr("etc/app/config", "system.posix_acl_access",
    acl([(1, 6, UNDEFINED), (2, 4, 1001), (4, 4, UNDEFINED), (0x10, 4, UNDEFINED), (0x20, 0, UNDEFINED)]))
os.setxattr("srv/drop", "system.posix_acl_default",
    acl([(1, 7, UNDEFINED), (4, 5, UNDEFINED), (0x20, 0, UNDEFINED)]))
os.chmod("srv/drop", 0o1777)
write("home/user/notes", b"mine" * 1000, os.O_WRONLY | os.O_CREAT)
os.setxattr("home/user/notes", "user.mime_type", b"text/plain")
os.setxattr("home/user/notes", "trusted.scanned", b"2026-12-03")
os.chown("home/user/notes", 1000, 1000); os.chown("home/user", 1000, 1000)
write("home/user/tool", b"\x7fELF", os.O_WRONLY | os.O_CREAT)
os.chown("home/user/tool", 1000, 1000); os.chmod("home/user/tool", 0o4750)
os.symlink("../etc/app/config", "home/user/config"); os.lchown("home/user/config", 1000, 1000)
os.mkfifo("srv/pipe", 0o620)
# A hard-link group across directories, and one within a directory.
os.link("home/user/notes", "etc/app/notes-link"); os.link("etc/app/config", "etc/app/config.bak")
os.mknod("srv/null", 0o666 | 0o020000, os.makedev(1, 3))
os.mknod("srv/loop9", 0o660 | 0o060000, os.makedev(7, 9))
for path in ("etc", "srv", "home", "home/user", "etc/app"):
    os.utime(path, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
"#,
    );
    let imported = vault.json(&["volume", "import", "v", source.to_str().unwrap()]);
    assert_eq!(
        imported["skipped"].as_array().unwrap().len(),
        0,
        "{imported}"
    );
    let mountpoint = vault.path("mnt");
    fs::create_dir_all(&mountpoint).unwrap();
    let _unmount = Unmount(mountpoint.clone());
    vault.ok(&[
        "volume",
        "mount",
        "v",
        mountpoint.to_str().unwrap(),
        "--background",
        "--read-only",
    ]);
    let tar = |root: &Path| {
        let output = StdCommand::new("tar")
            .args([
                "--create",
                "--file=-",
                "--preserve-permissions",
                "--sort=name",
                "--format=posix",
                // Reading changes atimes, and ctimes are the file system's: leave them out.
                "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
                "--xattrs",
                "--xattrs-include=*",
                "--acls",
                "-C",
            ])
            .arg(root)
            .args(["etc", "home", "srv"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "tar of {}: {}",
            root.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    };
    let (of_source, of_mount) = (tar(&source), tar(&mountpoint));
    if of_source != of_mount {
        let list = |archive: &[u8], name: &str| {
            let path = std::env::temp_dir().join(name);
            fs::write(&path, archive).unwrap();
            let listing = StdCommand::new("tar")
                .args([
                    "--list",
                    "--verbose",
                    "--full-time",
                    "--numeric-owner",
                    "--file",
                ])
                .arg(&path)
                .output()
                .unwrap();
            String::from_utf8_lossy(&listing.stdout).into_owned()
        };
        panic!(
            "tar differs:\nsource:\n{}\nmount:\n{}",
            list(&of_source, "source.tar"),
            list(&of_mount, "mount.tar")
        );
    }
}

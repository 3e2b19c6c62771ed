//! Extended attributes of the working tree's inodes.

use super::*;

impl MountedFs {
    /// The value of extended attribute `name` of `ino`.
    pub(super) fn xattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, Errno> {
        let inodes = self.lock();
        let node = inodes.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        node.meta
            .xattrs
            .iter()
            .find(|xattr| xattr.name == name)
            .map(|xattr| xattr.value.clone())
            .ok_or(Errno::ENODATA)
    }

    /// The names of `ino`'s extended attributes, each ended by NUL (listxattr's form);
    /// `trusted.*` only when `privileged`.
    pub(super) fn xattr_names(&self, ino: u64, privileged: bool) -> Result<Vec<u8>, Errno> {
        let inodes = self.lock();
        let node = inodes.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        let mut names = Vec::new();
        // Listed namespace by namespace in ext4's order (user, ACLs, trusted, security),
        // so tools that archive attributes in listing order (tar) see what the source had.
        let rank = |name: &[u8]| {
            [
                &b"user."[..],
                b"system.posix_acl_access",
                b"system.posix_acl_default",
                b"trusted.",
                b"security.",
            ]
            .iter()
            .position(|prefix| name.starts_with(prefix))
            .unwrap_or(usize::MAX)
        };
        let mut xattrs: Vec<&Xattr> = node.meta.xattrs.iter().collect();
        xattrs.sort_by_key(|xattr| rank(&xattr.name));
        for xattr in xattrs {
            if !privileged && xattr.name.starts_with(b"trusted.") {
                continue;
            }
            names.extend_from_slice(&xattr.name);
            names.push(0);
        }
        Ok(names)
    }

    /// Sets (`Some`) or removes (`None`) extended attribute `name` of `ino`. The
    /// attributes of one entry are bounded as a volume stores them: past the bound,
    /// ENOSPC (as ext4 says when an inode's attributes are full).
    ///
    /// `keeps_setgid` says whether the caller may keep a file's setgid bit when it sets
    /// the file's access ACL (given the file's group): Linux clears the bit for a caller
    /// neither in that group nor privileged (`posix_acl_update_mode`). The kernel would
    /// send that as `FUSE_SETXATTR_ACL_KILL_SGID`, which needs the extended setxattr
    /// request fuser does not parse, so the mount decides it itself.
    pub(super) fn change_xattr(
        &self,
        ino: u64,
        (name, value): (&[u8], Option<&[u8]>),
        how: XattrSet,
        keeps_setgid: impl Fn(u32) -> bool,
    ) -> Result<(), Errno> {
        self.writable()?;
        if name.is_empty() || name.len() > 255 {
            return Err(Errno::ERANGE);
        }
        let now = self.vault.now_ns();
        let mut inodes = self.lock();
        let node = inodes.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        let xattrs = &mut node.meta.xattrs;
        let at = xattrs.binary_search_by(|xattr| xattr.name.as_slice().cmp(name));
        match (value, at) {
            (None, Err(_)) => return Err(Errno::ENODATA),
            (None, Ok(index)) => {
                xattrs.remove(index);
            }
            (Some(_), Err(_)) if how == XattrSet::Replace => return Err(Errno::ENODATA),
            (Some(_), Ok(_)) if how == XattrSet::Create => return Err(Errno::EEXIST),
            (Some(value), _) if name == posix::ACL_DEFAULT && posix::parse_acl(value).is_none() => {
                return Err(Errno::EINVAL);
            }
            // An access ACL sets the permission bits; one the bits say all of is not kept.
            (Some(value), found) if name == posix::ACL_ACCESS => {
                let entries = posix::parse_acl(value).ok_or(Errno::EINVAL)?;
                let (bits, extended) = posix::mode_of_acl(&entries);
                node.mode = (node.mode & 0o7000) | bits;
                if !keeps_setgid(node.meta.gid.unwrap_or(self.gid)) {
                    node.mode &= !libc::S_ISGID;
                }
                match (extended, found) {
                    (true, Ok(index)) => xattrs[index].value = value.to_vec(),
                    (true, Err(index)) => xattrs.insert(
                        index,
                        Xattr {
                            name: name.to_vec(),
                            value: value.to_vec(),
                        },
                    ),
                    (false, Ok(index)) => {
                        xattrs.remove(index);
                    }
                    (false, Err(_)) => {}
                }
            }
            (Some(value), found) => {
                let others: usize = xattrs
                    .iter()
                    .filter(|xattr| xattr.name != name)
                    .map(|xattr| xattr.name.len() + xattr.value.len())
                    .sum();
                if others + name.len() + value.len() > XATTR_BYTES_MAX {
                    return Err(Errno::ENOSPC);
                }
                let xattr = Xattr {
                    name: name.to_vec(),
                    value: value.to_vec(),
                };
                match found {
                    Ok(index) => xattrs[index] = xattr,
                    Err(index) => xattrs.insert(index, xattr),
                }
            }
        }
        node.ctime_ns = now;
        // (The root's attributes are in no tree: served until unmount, not committed.)
        if ino != ROOT {
            Self::invalidate_names(&mut inodes, ino);
        }
        Ok(())
    }
}

//! The adapter between the kernel's requests (through `fuser`) and [`MountedFs`]: argument
//! checks, replies, errno mapping, and the metrics of each request.

use super::*;

/// The file system as fuser serves it: the shared state behind an `Arc`, so request
/// handlers can hand work (read-ahead) to other threads.
#[derive(Debug, Clone)]
pub struct FuseAdapter(pub Arc<MountedFs>);

impl FuseAdapter {
    pub(super) fn entry(&self, reply: ReplyEntry, result: Result<(u64, FileAttr), Errno>) {
        match result {
            Ok((ino, attr)) => {
                self.0.remember(ino);
                reply.entry(&TTL, &attr, Generation(0));
            }
            Err(errno) => reply.error(errno),
        }
    }

    pub(super) fn remove(&self, parent: u64, name: &OsStr, directory: bool) -> Result<(), Errno> {
        let fs = &self.0;
        fs.writable()?;
        let name = MountedFs::check_name(name)?;
        if !directory && !fs.append_only {
            self.watch_removal(parent, name, None)?;
        }
        let mut inodes = fs.lock();
        let Some(child) = fs.child(&mut inodes, parent, name)? else {
            return Err(Errno::ENOENT);
        };
        fs.may_remove_names()?;
        match (inodes.nodes.get(&child).map(|node| &node.kind), directory) {
            (Some(NodeKind::Directory(_)), false) => return Err(Errno::EISDIR),
            (Some(NodeKind::Directory(_)), true) => {
                fs.ensure_loaded(&mut inodes, child)?;
                if children(&inodes, child).is_some_and(|entries| !entries.is_empty()) {
                    return Err(Errno::ENOTEMPTY);
                }
            }
            (Some(_), true) => return Err(Errno::ENOTDIR),
            (Some(_), false) => {}
            (None, _) => return Err(Errno::ENOENT),
        }
        if let Some(entries) = children_mut(&mut inodes, parent) {
            entries.remove(name);
        }
        // The inode stays: open handles (and its other names) keep working on it.
        let now = fs.vault.now_ns();
        if let Some(node) = inodes.nodes.get_mut(&child) {
            node.remove_name(parent, name);
            node.ctime_ns = now;
        }
        MountedFs::invalidate_names(&mut inodes, child);
        MountedFs::touch_directory(&mut inodes, parent, now);
        drop(inodes);
        fs.release_unlinked(child);
        Ok(())
    }

    pub(super) fn do_rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let fs = &self.0;
        fs.writable()?;
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        if exchange && flags.contains(RenameFlags::RENAME_NOREPLACE) {
            return Err(Errno::EINVAL);
        }
        let (name, new_name) = (
            MountedFs::check_name(name)?,
            MountedFs::check_name(new_name)?,
        );
        if fs.watch.is_some() && !fs.append_only && !exchange {
            let moving = {
                let mut inodes = fs.lock();
                fs.child(&mut inodes, parent, name)?
            };
            if let Some(moving) = moving {
                self.watch_removal(new_parent, new_name, Some(moving))?;
                self.watch_rename(moving, name, new_name)?;
            }
        }
        let mut inodes = fs.lock();
        let Some(moving) = fs.child(&mut inodes, parent, name)? else {
            return Err(Errno::ENOENT);
        };
        fs.ensure_loaded(&mut inodes, new_parent)?;
        // A directory cannot move under itself.
        let mut ancestor = new_parent;
        while ancestor != ROOT {
            if ancestor == moving {
                return Err(Errno::EINVAL);
            }
            ancestor = inodes.nodes.get(&ancestor).map_or(ROOT, |node| node.parent);
        }
        if exchange {
            fs.may_remove_names()?;
            return fs.exchange(&mut inodes, (parent, name, moving), (new_parent, new_name));
        }
        let moving_is_dir = matches!(
            inodes.nodes.get(&moving).map(|node| &node.kind),
            Some(NodeKind::Directory(_))
        );
        let mut replaced = None;
        if let Some(target) = fs.child(&mut inodes, new_parent, new_name)? {
            if target == moving {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            // Append-only: a rename may add a name, never replace one.
            fs.may_remove_names()?;
            let target_is_dir = matches!(
                inodes.nodes.get(&target).map(|node| &node.kind),
                Some(NodeKind::Directory(_))
            );
            match (moving_is_dir, target_is_dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) => {
                    fs.ensure_loaded(&mut inodes, target)?;
                    if children(&inodes, target).is_some_and(|entries| !entries.is_empty()) {
                        return Err(Errno::ENOTEMPTY);
                    }
                }
                (false, false) => {}
            }
            if let Some(node) = inodes.nodes.get_mut(&target) {
                node.remove_name(new_parent, new_name);
                node.ctime_ns = fs.vault.now_ns();
            }
            MountedFs::invalidate_names(&mut inodes, target);
            replaced = Some(target);
        }
        if let Some(entries) = children_mut(&mut inodes, parent) {
            entries.remove(name);
        }
        if let Some(entries) = children_mut(&mut inodes, new_parent) {
            entries.insert(new_name.to_vec(), moving);
        }
        if let Some(node) = inodes.nodes.get_mut(&moving) {
            node.rename((parent, name), (new_parent, new_name));
            node.ctime_ns = fs.vault.now_ns();
        }
        MountedFs::invalidate_names(&mut inodes, moving);
        let now = fs.vault.now_ns();
        MountedFs::touch_directory(&mut inodes, parent, now);
        MountedFs::touch_directory(&mut inodes, new_parent, now);
        drop(inodes);
        if let Some(replaced) = replaced {
            fs.release_unlinked(replaced);
        }
        Ok(())
    }

    pub(super) fn open_file(
        &self,
        ino: u64,
        flags: OpenFlags,
    ) -> Result<(FileHandle, FopenFlags), Errno> {
        let fs = &self.0;
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        if write {
            fs.writable()?;
            if flags.0 & libc::O_TRUNC != 0 {
                fs.may_change_below(ino, 0)?;
            }
        }
        let keep_cache = {
            let mut inodes = fs.lock();
            let Some(node) = inodes.nodes.get_mut(&ino) else {
                return Err(Errno::ENOENT);
            };
            let NodeKind::File(file) = &mut node.kind else {
                return Err(Errno::EISDIR);
            };
            if write {
                file.writers += 1;
            }
            file.handles += 1;
            // The kernel may keep its cached pages only if the file did not change since
            // they were read.
            let keep = file.cached_version == file.version;
            file.cached_version = file.version;
            keep
        };
        if write && flags.0 & libc::O_TRUNC != 0 {
            fs.change_content(ino, |staged, state, size| {
                state.dirty.truncate(0);
                state.base_limit = 0;
                *size = 0;
                staged.file.set_len(0).map_err(|_| Errno::EIO)
            })?;
        }
        let handle = fs.next_handle.fetch_add(1, Ordering::Relaxed);
        let mut open_flags = FopenFlags::empty();
        if keep_cache {
            open_flags |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        // The handle number's low bit records write access, for release.
        Ok((FileHandle((handle << 1) | u64::from(write)), open_flags))
    }

    /// A change of attributes the kernel has allowed (`default_permissions`: it checks
    /// who may chown, chmod or set times, and asks to clear setuid and setgid as a chown
    /// or a write must, by sending the mode without them).
    pub(super) fn do_setattr(&self, ino: u64, change: &AttrChange) -> Result<FileAttr, Errno> {
        let fs = &self.0;
        let AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = *change;
        let metadata_changes =
            mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some();
        if metadata_changes || size.is_some() {
            fs.writable()?;
        }
        if let Some(new_size) = size {
            if new_size > FILE_BYTES_MAX {
                return Err(Errno::EFBIG);
            }
            fs.may_change_below(ino, new_size)?;
            fs.change_content(ino, |staged, state, file_size| {
                state.dirty.truncate(new_size);
                state.base_limit = state.base_limit.min(new_size);
                *file_size = new_size;
                staged.file.set_len(new_size).map_err(Errno::from)
            })?;
        }
        let mut inodes = fs.lock();
        let Some(node) = inodes.nodes.get_mut(&ino) else {
            return Err(Errno::ENOENT);
        };
        let now = fs.vault.now_ns();
        if let Some(mode) = mode {
            node.mode = mode & 0o7777;
            node.ctime_ns = now;
            // The access ACL follows the new bits (owner, mask, other).
            if let Some(acl) = node
                .meta
                .xattrs
                .iter_mut()
                .find(|xattr| xattr.name == posix::ACL_ACCESS)
                && let Some(updated) = posix::chmod_acl(&acl.value, mode)
            {
                acl.value = updated;
            }
        }
        if let Some(mtime) = mtime {
            node.mtime_ns = time_ns(mtime, now);
            node.ctime_ns = now;
        }
        if let Some(atime) = atime {
            node.meta.atime_ns = Some(time_ns(atime, now));
            node.ctime_ns = now;
        }
        if let Some(uid) = uid {
            node.meta.uid = Some(uid);
            node.meta.user = fs.owner_names.user(uid);
            node.ctime_ns = now;
        }
        if let Some(gid) = gid {
            node.meta.gid = Some(gid);
            node.meta.group = fs.owner_names.group(gid);
            node.ctime_ns = now;
        }
        let attr = fs.attr(ino, node);
        // The root's own attributes are in no tree (a snapshot is its root's entries): a
        // change to them is served until unmount, not committed.
        if metadata_changes && ino != ROOT {
            MountedFs::invalidate_names(&mut inodes, ino);
        }
        Ok(attr)
    }

    /// SEEK_DATA and SEEK_HOLE over the file's extents and its writes since chunking
    /// (other whences the kernel answers itself).
    pub(super) fn do_lseek(&self, ino: u64, offset: i64, whence: i32) -> Result<i64, Errno> {
        let fs = &self.0;
        let (base, staged, file_size) = {
            let inodes = fs.lock();
            match inodes.nodes.get(&ino).map(|node| &node.kind) {
                Some(NodeKind::File(file)) => (file.base.clone(), file.staged.clone(), file.size),
                Some(_) => return Err(Errno::EINVAL),
                None => return Err(Errno::ENOENT),
            }
        };
        let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let state = staged.as_ref().map(|staged| staged.lock());
        let found = match whence {
            libc::SEEK_DATA => seek_data(&base, state.as_deref(), file_size, offset),
            libc::SEEK_HOLE => seek_hole(&base, state.as_deref(), file_size, offset),
            _ => return Err(Errno::EINVAL),
        };
        // Past the end, or only a hole left for SEEK_DATA: ENXIO, as lseek(2) says.
        found
            .filter(|at| *at < file_size || whence == libc::SEEK_HOLE)
            .and_then(|at| i64::try_from(at).ok())
            .ok_or(Errno::ENXIO)
    }

    pub(super) fn do_read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let fs = &self.0;
        let (base, staged, file_size) = {
            let inodes = fs.lock();
            match inodes.nodes.get(&ino).map(|node| &node.kind) {
                Some(NodeKind::File(file)) => (file.base.clone(), file.staged.clone(), file.size),
                Some(_) => return Err(Errno::EISDIR),
                None => return Err(Errno::ENOENT),
            }
        };
        let state = staged.as_ref().map(|staged| staged.lock());
        let overlay = staged.as_deref().zip(state.as_deref());
        let result = read_overlay(
            &fs.vault,
            &fs.cache,
            &base,
            overlay,
            file_size,
            offset,
            size as usize,
        );
        drop(state);
        if staged.is_none() {
            // Sequential readers find the next chunk decrypted by the time they reach it.
            let last = offset + u64::from(size).saturating_sub(1);
            if let Some(index) = base.chunk_at(last.min(file_size.saturating_sub(1))) {
                fs.read_ahead(&base, index);
            }
        }
        result.map_err(|error| log_error(&format!("read of inode {ino}"), &error))
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Large kernel read-ahead and writes: fewer requests per MiB.
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_write(1 << 20);
        // Let the kernel keep more read-ahead requests in flight for the worker threads.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // ACLs enforced by the kernel against what the volume keeps; the file system keeps
        // mode and ACL in step and applies umask or default ACL itself (see `insert`).
        if config
            .add_capabilities(fuser::InitFlags::FUSE_DONT_MASK)
            .is_ok()
        {
            let _ = config.add_capabilities(fuser::InitFlags::FUSE_POSIX_ACL);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = self.0.request("lookup");
        let fs = &self.0;
        let mut inodes = fs.lock();
        let result = fs
            .child(&mut inodes, parent.0, name.as_bytes())
            .and_then(|child| child.ok_or(Errno::ENOENT))
            .and_then(|child| {
                let node = inodes.nodes.get(&child).ok_or(Errno::ENOENT)?;
                Ok((child, fs.attr(child, node)))
            });
        drop(inodes);
        self.entry(reply, result);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _timer = self.0.request("forget");
        self.0.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = self.0.request("getattr");
        let fs = &self.0;
        let inodes = fs.lock();
        match inodes.nodes.get(&ino.0) {
            Some(node) => reply.attr(&TTL, &fs.attr(ino.0, node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _timer = self.0.request("setattr");
        let change = AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        match self.do_setattr(ino.0, &change) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = self.0.request("readlink");
        let inodes = self.0.lock();
        match inodes.nodes.get(&ino.0).map(|node| &node.kind) {
            Some(NodeKind::Symlink(target)) => reply.data(target),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _timer = self.0.request("mkdir");
        let kind = NodeKind::Directory(Directory {
            tree: None,
            children: Some(BTreeMap::new()),
            stored: None,
        });
        self.entry(
            reply,
            self.0.insert(
                parent.0,
                name,
                (mode & 0o7777, umask),
                kind,
                (req.uid(), req.gid()),
            ),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.0.request("unlink");
        match self.remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.0.request("rmdir");
        match self.remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _timer = self.0.request("symlink");
        let kind = NodeKind::Symlink(target.as_os_str().as_bytes().to_vec());
        self.entry(
            reply,
            self.0.insert(
                parent.0,
                link_name,
                (0o777, 0),
                kind,
                (req.uid(), req.gid()),
            ),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.request("rename");
        match self.do_rename(parent.0, name, newparent.0, newname, flags) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _timer = self.0.request("link");
        self.entry(reply, self.0.link(ino.0, newparent.0, newname));
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _timer = self.0.request("lseek");
        match self.do_lseek(ino.0, offset, whence) {
            Ok(at) => reply.offset(at),
            Err(errno) => reply.error(errno),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _timer = self.0.request("mknod");
        // The kernel has checked CAP_MKNOD for devices (and `nodev` keeps them inert).
        let (major, minor) = (
            u32::try_from(nix::sys::stat::major(rdev.into())).unwrap_or(0),
            u32::try_from(nix::sys::stat::minor(rdev.into())).unwrap_or(0),
        );
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => NodeKind::File(file_node(BaseContent::default())),
            libc::S_IFIFO => NodeKind::Special(EntryContent::Fifo),
            libc::S_IFSOCK => NodeKind::Special(EntryContent::Socket),
            libc::S_IFCHR => NodeKind::Special(EntryContent::CharDevice { major, minor }),
            libc::S_IFBLK => NodeKind::Special(EntryContent::BlockDevice { major, minor }),
            _ => return reply.error(Errno::EINVAL),
        };
        self.entry(
            reply,
            self.0.insert(
                parent.0,
                name,
                (mode & 0o7777, umask),
                kind,
                (req.uid(), req.gid()),
            ),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _timer = self.0.request("getxattr");
        match self.0.xattr(ino.0, name.as_bytes()) {
            Ok(value) => reply_xattr(reply, &value, size),
            Err(errno) => reply.error(errno),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = self.0.request("listxattr");
        // As local file systems do, trusted.* names are listed to root only (the kernel
        // already refuses their values to others).
        match self.0.xattr_names(ino.0, req.uid() == 0) {
            Ok(names) => reply_xattr(reply, &names, size),
            Err(errno) => reply.error(errno),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.request("setxattr");
        let how = if flags & libc::XATTR_CREATE != 0 {
            XattrSet::Create
        } else if flags & libc::XATTR_REPLACE != 0 {
            XattrSet::Replace
        } else {
            XattrSet::Any
        };
        match self
            .0
            .change_xattr(ino.0, (name.as_bytes(), Some(value)), how, |group| {
                in_group_or_root(req, group)
            }) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.0.request("removexattr");
        match self
            .0
            .change_xattr(ino.0, (name.as_bytes(), None), XattrSet::Any, |_| true)
        {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.0.request("open");
        match self.open_file(ino.0, flags) {
            Ok((handle, open_flags)) => reply.opened(handle, open_flags),
            Err(errno) => reply.error(errno),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let _timer = self.0.request("read");
        match self.do_read(ino.0, offset, size) {
            Ok(data) => {
                self.0.io.transfer(false, data.len());
                reply.data(&data);
            }
            Err(errno) => reply.error(errno),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let _timer = self.0.request("write");
        self.0.io.transfer(true, data.len());
        let result = self.0.writable().and_then(|()| {
            let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
            if end > FILE_BYTES_MAX {
                return Err(Errno::EFBIG);
            }
            self.0.may_change_below(ino.0, offset)?;
            self.watch_write(ino.0, offset, data)?;
            self.0.change_content(ino.0, |staged, state, size| {
                staged
                    .file
                    .write_all_at(data, offset)
                    .map_err(Errno::from)?;
                let end = offset + data.len() as u64;
                state.dirty.insert(offset, end);
                *size = (*size).max(end);
                Ok(())
            })
        });
        match result {
            Ok(_) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(errno) => reply.error(errno),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.request("flush");
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.request("release");
        let fs = &self.0;
        let (last_writer, unlinked) = {
            let mut inodes = fs.lock();
            match inodes.nodes.get_mut(&ino.0) {
                Some(Inode {
                    parent,
                    kind: NodeKind::File(file),
                    ..
                }) => {
                    file.handles = file.handles.saturating_sub(1);
                    let mut last_writer = false;
                    if fh.0 & 1 == 1 {
                        file.writers = file.writers.saturating_sub(1);
                        last_writer = file.writers == 0;
                    }
                    (last_writer, *parent == 0)
                }
                _ => (false, false),
            }
        };
        if unlinked {
            // Nothing can name it any more: its staged bytes are garbage, and on a full
            // disk they are the space the user is trying to get back.
            fs.release_unlinked(ino.0);
            reply.ok();
            return;
        }
        // Closed files are chunked into the working tree.
        if last_writer && let Err(error) = fs.chunk_file(ino.0) {
            reply.error(log_error("chunking a closed file", &error));
            return;
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.request("fsync");
        let fs = &self.0;
        let result = fs
            .chunk_file(ino.0)
            .and_then(|()| crate::mount::persist_working(fs));
        match result {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(log_error("fsync", &error)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.0.request("opendir");
        let fs = &self.0;
        let mut inodes = fs.lock();
        if let Err(errno) = fs.ensure_loaded(&mut inodes, ino.0) {
            reply.error(errno);
            return;
        }
        let parent = inodes.nodes.get(&ino.0).map_or(ROOT, |node| node.parent);
        let mut listing = vec![
            (ino.0, FileType::Directory, b".".to_vec()),
            (parent.max(ROOT), FileType::Directory, b"..".to_vec()),
        ];
        for (name, child) in children(&inodes, ino.0).into_iter().flatten() {
            let kind = match inodes.nodes.get(child) {
                Some(node) => file_type(&node.kind),
                None => stored_entry(&inodes, ino.0, *child)
                    .map_or(FileType::RegularFile, |entry| {
                        file_type_of_content(&entry.content)
                    }),
            };
            listing.push((*child, kind, name.clone()));
        }
        drop(inodes);
        let handle = fs.next_handle.fetch_add(1, Ordering::Relaxed);
        fs.listings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(handle, Arc::new(listing));
        reply.opened(FileHandle(handle), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timer = self.0.request("readdir");
        let listing = self
            .0
            .listings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&fh.0)
            .cloned();
        let Some(listing) = listing else {
            reply.error(Errno::EBADF);
            return;
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (index, (child, kind, name)) in listing.iter().enumerate().skip(start) {
            if reply.add(
                INodeNo(*child),
                index as u64 + 1,
                *kind,
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.request("releasedir");
        self.0
            .listings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.request("fsyncdir");
        match crate::mount::persist_working(&self.0) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(log_error("fsyncdir", &error)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timer = self.0.request("statfs");
        // The vault's own file system bounds what can be written.
        let path = self.0.staging_dir.clone();
        match statvfs(&path) {
            Some((blocks, free, available, files, files_free, block_size)) => {
                reply.statfs(
                    blocks, free, available, files, files_free, block_size, 255, block_size,
                );
            }
            None => reply.statfs(0, 0, 0, 0, 0, BLOCK_BYTES, 255, BLOCK_BYTES),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _timer = self.0.request("create");
        let kind = NodeKind::File(file_node(BaseContent::default()));
        let created = self.0.insert(
            parent.0,
            name,
            (mode & 0o7777, umask),
            kind,
            (req.uid(), req.gid()),
        );
        match created.and_then(|(ino, attr)| {
            Ok((
                self.open_file(ino, OpenFlags(flags & !libc::O_TRUNC))?,
                attr,
            ))
        }) {
            Ok(((handle, open_flags), attr)) => {
                self.0.remember(attr.ino.0);
                reply.created(&TTL, &attr, Generation(0), handle, open_flags);
            }
            Err(errno) => reply.error(errno),
        }
    }
}

/// getxattr's and listxattr's reply: the size when asked for it (`size` 0), the bytes
/// when they fit, ERANGE when they do not.
pub(super) fn reply_xattr(reply: ReplyXattr, bytes: &[u8], size: u32) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    if size == 0 {
        reply.size(len);
    } else if len <= size {
        reply.data(bytes);
    } else {
        reply.error(Errno::ERANGE);
    }
}

pub(super) fn statvfs(path: &Path) -> Option<(u64, u64, u64, u64, u64, u32)> {
    let stats = nix::sys::statvfs::statvfs(path).ok()?;
    let block_size = u32::try_from(stats.fragment_size()).unwrap_or(BLOCK_BYTES);
    Some((
        stats.blocks(),
        stats.blocks_free(),
        stats.blocks_available(),
        stats.files(),
        stats.files_free(),
        block_size,
    ))
}

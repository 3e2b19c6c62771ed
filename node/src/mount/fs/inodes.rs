//! The inode table: loading directories from the tree lazily, making inodes for the
//! entries looked up, names (insert, link, exchange, unlink) and the kernel's lookup counts.

use super::*;

impl MountedFs {
    /// Loads a directory's entries from its tree if not done yet.
    pub(super) fn ensure_loaded(&self, inodes: &mut Inodes, ino: u64) -> Result<(), Errno> {
        let tree = match inodes.nodes.get(&ino).map(|node| &node.kind) {
            Some(NodeKind::Directory(directory)) => match (&directory.children, directory.tree) {
                (Some(_), _) => return Ok(()),
                (None, tree) => tree,
            },
            Some(_) => return Err(Errno::ENOTDIR),
            None => return Err(Errno::ENOENT),
        };
        let mut children = BTreeMap::new();
        let mut stored = None;
        if let Some(tree) = tree {
            let entries = self
                .vault
                .read_tree(&self.volume, &tree)
                .map_err(|error| log_error(&format!("reading tree {tree}"), &error))?;
            if !inodes.links_loaded && entries.iter().any(|entry| entry.meta.link_group.is_some()) {
                // The first hard link met: load every directory with one (this one too),
                // so each group is one inode with all its names before any is served.
                inodes.links_loaded = true;
                self.load_linked_directories(inodes)?;
                if self::children(inodes, ino).is_some() {
                    return Ok(());
                }
            }
            // Entries get their numbers now and their inodes when first used, but for
            // hard-linked names: all names of a group are one inode from the start.
            // Every linked entry's node first (reading a manifest may fail), then the
            // table: a failure leaves the table as it was.
            let mut linked_kinds = Vec::new();
            for (index, entry) in entries.iter().enumerate() {
                if entry.meta.link_group.is_some() {
                    linked_kinds.push((index, self.node_kind(entry.content.clone())?));
                }
            }
            let first_ino = inodes.next;
            inodes.next += entries.len() as u64;
            let mut linked_kinds = linked_kinds.into_iter().peekable();
            for (index, entry) in entries.iter().enumerate() {
                let child = first_ino + index as u64;
                let Some((_, kind)) = linked_kinds.next_if(|(linked, _)| *linked == index) else {
                    children.insert(entry.name.clone(), child);
                    continue;
                };
                let (group, content) = match entry.meta.link_group {
                    Some(group) => (group, &entry.content),
                    None => continue,
                };
                if let Some((known, known_content)) = inodes.link_groups.get(&group)
                    && known_content == content
                    && let Some(node) = inodes.nodes.get_mut(known)
                    && node.parent != 0
                {
                    // Another name of an inode already in the table.
                    node.more_names.push((ino, entry.name.clone()));
                    children.insert(entry.name.clone(), *known);
                    continue;
                }
                inodes.link_groups.insert(group, (child, content.clone()));
                inodes
                    .nodes
                    .insert(child, inode_of_entry(ino, entry.clone(), kind));
                children.insert(entry.name.clone(), child);
            }
            stored = Some(Arc::new(StoredEntries { first_ino, entries }));
        }
        if let Some(Inode {
            kind: NodeKind::Directory(directory),
            ..
        }) = inodes.nodes.get_mut(&ino)
        {
            directory.children = Some(children);
            directory.stored = stored;
        }
        Ok(())
    }

    /// The node serving an entry's content (a stored manifest is read here).
    pub(super) fn node_kind(&self, content: EntryContent) -> Result<NodeKind, Errno> {
        Ok(match content {
            EntryContent::Directory { tree } => NodeKind::Directory(Directory {
                tree: Some(Cid::from_bytes(tree)),
                children: None,
                stored: None,
            }),
            EntryContent::InlineFile(manifest) => {
                NodeKind::File(file_node(BaseContent::new(manifest)))
            }
            EntryContent::InlineData(data) => NodeKind::File(file_node(BaseContent::inline(data))),
            EntryContent::File { manifest } => {
                let cid = Cid::from_bytes(manifest);
                let manifest = self
                    .vault
                    .read_manifest(&self.volume, &cid)
                    .map_err(|error| log_error(&format!("reading manifest {cid}"), &error))?;
                NodeKind::File(file_node(BaseContent::new(manifest)))
            }
            EntryContent::Symlink { target } => NodeKind::Symlink(target),
            special @ (EntryContent::Fifo
            | EntryContent::Socket
            | EntryContent::CharDevice { .. }
            | EntryContent::BlockDevice { .. }) => NodeKind::Special(special),
        })
    }

    /// Loads every directory of the working tree whose stored tree holds a hard-linked
    /// name (see [`Inodes::links_loaded`]). Reads each stored tree not loaded yet once,
    /// with the table locked: a one-time cost of the first mount that meets a hard link.
    pub(super) fn load_linked_directories(&self, inodes: &mut Inodes) -> Result<(), Errno> {
        let mut has_links = BTreeMap::new();
        let mut pending = vec![ROOT];
        while let Some(ino) = pending.pop() {
            let unloaded_tree = match inodes.nodes.get(&ino).map(|node| &node.kind) {
                Some(NodeKind::Directory(directory)) if directory.children.is_none() => {
                    directory.tree
                }
                Some(NodeKind::Directory(_)) => None,
                _ => continue,
            };
            if let Some(tree) = unloaded_tree {
                if !self.tree_has_links(tree, &mut has_links)? {
                    continue;
                }
                self.ensure_loaded(inodes, ino)?;
            }
            let subdirectories: Vec<u64> = children(inodes, ino)
                .into_iter()
                .flat_map(BTreeMap::values)
                .copied()
                .filter(|child| match inodes.nodes.get(child) {
                    Some(node) => matches!(node.kind, NodeKind::Directory(_)),
                    None => matches!(
                        stored_entry(inodes, ino, *child).map(|entry| &entry.content),
                        Some(EntryContent::Directory { .. })
                    ),
                })
                .collect();
            for child in subdirectories {
                self.materialize(inodes, ino, child)?;
                pending.push(child);
            }
        }
        Ok(())
    }

    /// Whether stored tree `top` or any tree below it has a hard-linked name (`memo` holds
    /// the answers found so far, by tree). Iterative: trees are as deep as the depth limit.
    pub(super) fn tree_has_links(
        &self,
        top: Cid,
        memo: &mut BTreeMap<Cid, bool>,
    ) -> Result<bool, Errno> {
        // (tree, its subtrees once read)
        let mut pending: Vec<(Cid, Option<Vec<Cid>>)> = vec![(top, None)];
        while let Some((tree, subtrees)) = pending.pop() {
            if memo.contains_key(&tree) {
                continue;
            }
            if let Some(subtrees) = subtrees {
                let any = subtrees.iter().any(|sub| memo.get(sub) == Some(&true));
                memo.insert(tree, any);
                continue;
            }
            let entries = self
                .vault
                .read_tree(&self.volume, &tree)
                .map_err(|error| log_error(&format!("reading tree {tree}"), &error))?;
            if entries.iter().any(|entry| entry.meta.link_group.is_some()) {
                memo.insert(tree, true);
                continue;
            }
            let subtrees: Vec<Cid> = entries
                .iter()
                .filter_map(|entry| match entry.content {
                    EntryContent::Directory { tree } => Some(Cid::from_bytes(tree)),
                    _ => None,
                })
                .collect();
            let unknown: Vec<Cid> = subtrees
                .iter()
                .filter(|sub| !memo.contains_key(*sub))
                .copied()
                .collect();
            pending.push((tree, Some(subtrees)));
            pending.extend(unknown.into_iter().map(|sub| (sub, None)));
        }
        Ok(memo.get(&top) == Some(&true))
    }

    /// The inode of `name` in directory `parent`, made from its stored entry if this is
    /// its first use.
    pub(super) fn child(
        &self,
        inodes: &mut Inodes,
        parent: u64,
        name: &[u8],
    ) -> Result<Option<u64>, Errno> {
        self.ensure_loaded(inodes, parent)?;
        let Some(child) = children(inodes, parent).and_then(|children| children.get(name).copied())
        else {
            return Ok(None);
        };
        self.materialize(inodes, parent, child)?;
        Ok(Some(child))
    }

    /// Makes the inode of entry `ino` of directory `parent` from the directory's stored
    /// entries, unless it is in the table already (made before, or not a stored entry).
    pub(super) fn materialize(
        &self,
        inodes: &mut Inodes,
        parent: u64,
        ino: u64,
    ) -> Result<(), Errno> {
        if inodes.nodes.contains_key(&ino) {
            return Ok(());
        }
        let Some(entry) = stored_entry(inodes, parent, ino).cloned() else {
            return Ok(());
        };
        let kind = self.node_kind(entry.content.clone())?;
        inodes
            .nodes
            .insert(ino, inode_of_entry(parent, entry, kind));
        Ok(())
    }

    /// A directory's entries changed: new mtime, and its trees up to the root must be rebuilt.
    pub(super) fn touch_directory(inodes: &mut Inodes, ino: u64, now: i64) {
        if let Some(node) = inodes.nodes.get_mut(&ino) {
            node.mtime_ns = now;
            node.ctime_ns = now;
        }
        Self::invalidate_trees(inodes, ino);
    }

    /// Inode `ino` changed (content, attributes or names): the trees of every directory
    /// naming it, and their ancestors', no longer describe it.
    pub(super) fn invalidate_names(inodes: &mut Inodes, ino: u64) {
        let parents = inodes
            .nodes
            .get(&ino)
            .map(Inode::parents)
            .unwrap_or_default();
        for parent in parents {
            Self::invalidate_trees(inodes, parent);
        }
    }

    /// Something under directory `ino` changed: its stored tree and its ancestors' no longer
    /// describe it.
    pub(super) fn invalidate_trees(inodes: &mut Inodes, mut ino: u64) {
        inodes.generation += 1;
        loop {
            let Some(node) = inodes.nodes.get_mut(&ino) else {
                return;
            };
            if let NodeKind::Directory(directory) = &mut node.kind {
                directory.tree = None;
            }
            if ino == ROOT {
                return;
            }
            ino = node.parent;
        }
    }

    /// Adds a new node under `parent`, owned by `creator` (the request's uid and gid) as
    /// Linux does: the group is the directory's when it has the setgid bit, and a new
    /// directory inherits that bit.
    ///
    /// `mode` is what the request asked for, before its `umask`: under a directory with a
    /// default ACL the ACL decides instead of the umask, and the new entry inherits it
    /// (the kernel leaves both to the file system: `FUSE_POSIX_ACL`, `FUSE_DONT_MASK`).
    pub(super) fn insert(
        &self,
        parent: u64,
        name: &OsStr,
        (mut mode, umask): (u32, u32),
        kind: NodeKind,
        creator: (u32, u32),
    ) -> Result<(u64, FileAttr), Errno> {
        self.writable()?;
        let name = Self::check_name(name)?;
        let mut inodes = self.lock();
        if self.child(&mut inodes, parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let mut xattrs = Vec::new();
        let default_acl = inodes.nodes.get(&parent).and_then(|directory| {
            directory
                .meta
                .xattrs
                .iter()
                .find(|xattr| xattr.name == posix::ACL_DEFAULT)
                .map(|xattr| xattr.value.clone())
        });
        let inherited = default_acl
            .filter(|_| !matches!(kind, NodeKind::Symlink(_)))
            .and_then(|default| Some((posix::inherit_acl(&default, mode)?, default)));
        match inherited {
            Some(((bits, access), default)) => {
                mode = (mode & 0o7000) | bits;
                if let Some(access) = access {
                    xattrs.push(Xattr {
                        name: posix::ACL_ACCESS.to_vec(),
                        value: access,
                    });
                }
                if matches!(kind, NodeKind::Directory(_)) {
                    xattrs.push(Xattr {
                        name: posix::ACL_DEFAULT.to_vec(),
                        value: default,
                    });
                }
            }
            None => mode &= !umask,
        }
        let (uid, mut gid) = creator;
        if let Some(directory) = inodes.nodes.get(&parent)
            && directory.mode & libc::S_ISGID != 0
        {
            gid = directory.meta.gid.unwrap_or(self.gid);
            if matches!(kind, NodeKind::Directory(_)) {
                mode |= libc::S_ISGID;
            }
        }
        let ino = inodes.next;
        inodes.next += 1;
        let now = self.vault.now_ns();
        let node = Inode {
            parent,
            name: name.to_vec(),
            more_names: Vec::new(),
            mode,
            mtime_ns: now,
            ctime_ns: now,
            kind,
            meta: EntryMeta {
                uid: Some(uid),
                gid: Some(gid),
                user: self.owner_names.user(uid),
                group: self.owner_names.group(gid),
                xattrs,
                ..EntryMeta::default()
            },
            lookups: 0,
        };
        let attr = self.attr(ino, &node);
        inodes.nodes.insert(ino, node);
        if let Some(children) = children_mut(&mut inodes, parent) {
            children.insert(name.to_vec(), ino);
        }
        Self::touch_directory(&mut inodes, parent, self.vault.now_ns());
        Ok((ino, attr))
    }

    /// Gives inode `ino` (not a directory) one more name, `name` in directory `parent`.
    /// (The kernel has checked the caller may: write access to `parent`, and with
    /// `fs.protected_hardlinks` ownership or read-write access to the file.)
    pub(super) fn link(
        &self,
        ino: u64,
        parent: u64,
        name: &OsStr,
    ) -> Result<(u64, FileAttr), Errno> {
        self.writable()?;
        let name = Self::check_name(name)?;
        let mut inodes = self.lock();
        match inodes.nodes.get(&ino) {
            None => return Err(Errno::ENOENT),
            Some(node) if matches!(node.kind, NodeKind::Directory(_)) => {
                return Err(Errno::EPERM);
            }
            // An unlinked file cannot be named again (no O_TMPFILE here).
            Some(node) if node.parent == 0 => return Err(Errno::ENOENT),
            Some(node) if node.link_count() >= LINK_COUNT_MAX => return Err(Errno::EMLINK),
            Some(_) => {}
        }
        if self.child(&mut inodes, parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let now = self.vault.now_ns();
        if let Some(children) = children_mut(&mut inodes, parent) {
            children.insert(name.to_vec(), ino);
        }
        let node = inodes.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        node.more_names.push((parent, name.to_vec()));
        node.ctime_ns = now;
        let attr = self.attr(ino, node);
        // Every name's entry gets the link group at the next commit.
        Self::invalidate_names(&mut inodes, ino);
        Self::touch_directory(&mut inodes, parent, now);
        Ok((ino, attr))
    }

    /// The kernel was given one more reference to `ino` (an entry or create reply).
    pub(super) fn remember(&self, ino: u64) {
        if let Some(node) = self.lock().nodes.get_mut(&ino) {
            node.lookups += 1;
        }
    }

    /// The kernel dropped `count` references to `ino`. An inode nobody references leaves
    /// the table when it can be had again: an unlinked file with no open handle (gone for
    /// good), or an entry of a directory unchanged since its tree was stored, once none of
    /// that directory's entries is in use (the listing is dropped and reloaded from the
    /// tree when next needed). So a long mount's memory follows what is in use, not what
    /// was ever touched.
    pub(crate) fn forget(&self, ino: u64, count: u64) {
        let mut inodes = self.lock();
        let Some(node) = inodes.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(count);
        if node.lookups > 0 || ino == ROOT {
            return;
        }
        if node.parent == 0 {
            if let NodeKind::File(file) = &node.kind
                && file.handles == 0
            {
                inodes.nodes.remove(&ino);
            }
            return;
        }
        for parent in node.parents() {
            Self::drop_unused_listing(&mut inodes, parent);
        }
    }

    /// Drops the entries of directory `ino` if it is unchanged since its tree was stored and
    /// none of them is referenced, open, staged or a loaded directory.
    pub(super) fn drop_unused_listing(inodes: &mut Inodes, ino: u64) {
        let Some(Inode {
            kind:
                NodeKind::Directory(Directory {
                    tree: Some(_),
                    children: Some(children),
                    ..
                }),
            ..
        }) = inodes.nodes.get(&ino)
        else {
            return;
        };
        // (A name of a hard-linked inode keeps its directory: all names of a group stay
        // in the table, see `Inodes::links_loaded`.)
        let unused = children.values().all(|child| {
            inodes.nodes.get(child).is_none_or(|node| {
                node.lookups == 0
                    && node.more_names.is_empty()
                    && match &node.kind {
                        NodeKind::File(file) => file.handles == 0 && file.staged.is_none(),
                        NodeKind::Directory(directory) => directory.children.is_none(),
                        NodeKind::Symlink(_) | NodeKind::Special(_) => true,
                    }
            })
        });
        if !unused {
            return;
        }
        let children: Vec<u64> = children.values().copied().collect();
        for child in children {
            inodes.nodes.remove(&child);
        }
        if let Some(Inode {
            kind: NodeKind::Directory(directory),
            ..
        }) = inodes.nodes.get_mut(&ino)
        {
            directory.children = None;
            directory.stored = None;
        }
    }

    /// How many inodes the table holds (for tests and the mount's statistics).
    #[must_use]
    pub fn inode_count(&self) -> usize {
        self.lock().nodes.len()
    }

    /// Drops the staged bytes of file `ino` if it is unlinked and no handle is open: its
    /// space is released at once, not at unmount.
    pub(super) fn release_unlinked(&self, ino: u64) {
        let staged = {
            let mut inodes = self.lock();
            match inodes.nodes.get_mut(&ino) {
                Some(Inode {
                    parent: 0,
                    kind: NodeKind::File(file),
                    lookups,
                    ..
                }) if file.handles == 0 => {
                    let staged = file.staged.take();
                    if *lookups == 0 {
                        // Nothing names it and the kernel forgot it: it is gone.
                        inodes.nodes.remove(&ino);
                    }
                    staged
                }
                _ => None,
            }
        };
        if let Some(staged) = staged {
            // Retired under its own lock, so a concurrent chunking leaves it alone.
            staged.lock().retired = true;
            let _ = std::fs::remove_file(&staged.path);
        }
    }

    /// The path of `ino` in the volume, for messages; a long one keeps its first and last
    /// components around an ellipsis.
    /// `RENAME_EXCHANGE`: `first` (its parent, name and inode) and the entry at `second`
    /// swap places atomically; both must exist, and neither may move under itself.
    pub(super) fn exchange(
        &self,
        inodes: &mut Inodes,
        first: (u64, &[u8], u64),
        second: (u64, &[u8]),
    ) -> Result<(), Errno> {
        let (parent, name, moving) = first;
        let (new_parent, new_name) = second;
        let Some(other) = self.child(inodes, new_parent, new_name)? else {
            return Err(Errno::ENOENT);
        };
        if other == moving {
            return Ok(());
        }
        let mut ancestor = parent;
        while ancestor != ROOT {
            if ancestor == other {
                return Err(Errno::EINVAL);
            }
            ancestor = inodes.nodes.get(&ancestor).map_or(ROOT, |node| node.parent);
        }
        if let Some(entries) = children_mut(inodes, parent) {
            entries.insert(name.to_vec(), other);
        }
        if let Some(entries) = children_mut(inodes, new_parent) {
            entries.insert(new_name.to_vec(), moving);
        }
        let now = self.vault.now_ns();
        for (ino, from, to) in [
            (moving, (parent, name), (new_parent, new_name)),
            (other, (new_parent, new_name), (parent, name)),
        ] {
            if let Some(node) = inodes.nodes.get_mut(&ino) {
                node.rename(from, to);
                node.ctime_ns = now;
            }
            Self::invalidate_names(inodes, ino);
        }
        Self::touch_directory(inodes, parent, now);
        Self::touch_directory(inodes, new_parent, now);
        Ok(())
    }
}

/// What readdir reports an entry as.
pub(super) fn file_type(kind: &NodeKind) -> FileType {
    match kind {
        NodeKind::Directory(_) => FileType::Directory,
        NodeKind::File(_) => FileType::RegularFile,
        NodeKind::Symlink(_) => FileType::Symlink,
        NodeKind::Special(EntryContent::CharDevice { .. }) => FileType::CharDevice,
        NodeKind::Special(EntryContent::BlockDevice { .. }) => FileType::BlockDevice,
        NodeKind::Special(EntryContent::Socket) => FileType::Socket,
        NodeKind::Special(_) => FileType::NamedPipe,
    }
}

pub(super) fn file_node(base: BaseContent) -> FileNode {
    let base = Arc::new(base);
    FileNode {
        size: base.size(),
        base,
        staged: None,
        writers: 0,
        handles: 0,
        version: 1,
        cached_version: 0,
    }
}

/// The inode a tree entry is served as, in directory `parent`.
pub(super) fn inode_of_entry(parent: u64, entry: TreeEntry, kind: NodeKind) -> Inode {
    Inode {
        parent,
        name: entry.name,
        more_names: Vec::new(),
        mode: entry.mode,
        mtime_ns: entry.mtime_ns,
        ctime_ns: entry.meta.ctime_ns.unwrap_or(entry.mtime_ns),
        kind,
        meta: entry.meta,
        lookups: 0,
    }
}

/// The stored entry numbered `ino` of directory `parent` (see [`Directory::stored`]).
pub(super) fn stored_entry(inodes: &Inodes, parent: u64, ino: u64) -> Option<&TreeEntry> {
    match inodes.nodes.get(&parent).map(|node| &node.kind) {
        Some(NodeKind::Directory(directory)) => directory.stored.as_ref()?.entry(ino),
        _ => None,
    }
}

/// What a listing shows for an entry not made an inode yet.
pub(super) fn file_type_of_content(content: &EntryContent) -> FileType {
    match content {
        EntryContent::Directory { .. } => FileType::Directory,
        EntryContent::Symlink { .. } => FileType::Symlink,
        EntryContent::CharDevice { .. } => FileType::CharDevice,
        EntryContent::BlockDevice { .. } => FileType::BlockDevice,
        EntryContent::Socket => FileType::Socket,
        EntryContent::Fifo => FileType::NamedPipe,
        EntryContent::File { .. } | EntryContent::InlineFile(_) | EntryContent::InlineData(_) => {
            FileType::RegularFile
        }
    }
}

pub(super) fn children(inodes: &Inodes, ino: u64) -> Option<&BTreeMap<Vec<u8>, u64>> {
    match inodes.nodes.get(&ino).map(|node| &node.kind) {
        Some(NodeKind::Directory(directory)) => directory.children.as_ref(),
        _ => None,
    }
}

pub(super) fn children_mut(inodes: &mut Inodes, ino: u64) -> Option<&mut BTreeMap<Vec<u8>, u64>> {
    match inodes.nodes.get_mut(&ino).map(|node| &mut node.kind) {
        Some(NodeKind::Directory(directory)) => directory.children.as_mut(),
        _ => None,
    }
}

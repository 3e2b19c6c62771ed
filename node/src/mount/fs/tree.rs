//! Storing the working tree: each changed directory serialized as a tree object, bottom
//! up, for a commit or an fsync.

use super::*;

impl MountedFs {
    /// Stages the working tree's changed directories (and large manifests) on `importer`
    /// and returns its root with the change generation it captures (taken under the same
    /// lock, so the root holds every change up to it and none after). Staged bytes not yet
    /// chunked are left out.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn store_tree(&self, importer: &Importer<'_>) -> Result<(Cid, u64)> {
        let mut inodes = self.lock();
        let root = self.store_directory(&mut inodes, importer, ROOT)?;
        Ok((root, inodes.generation))
    }

    /// Stores every changed directory under `top` (children before parents, with an
    /// explicit stack: a mount's tree may be as deep as the depth limit, far more than a
    /// FUSE thread's stack would hold recursing) and returns `top`'s tree.
    pub(super) fn store_directory(
        &self,
        inodes: &mut Inodes,
        importer: &Importer<'_>,
        top: u64,
    ) -> Result<Cid> {
        let depth_max = self.vault.limits().tree_depth_max;
        // (inode, depth, whether its changed subdirectories are stored already)
        let mut pending = vec![(top, 0usize, false)];
        while let Some((ino, depth, children_stored)) = pending.pop() {
            let children = match inodes.nodes.get(&ino).map(|node| &node.kind) {
                Some(NodeKind::Directory(directory)) if directory.tree.is_some() => continue,
                Some(NodeKind::Directory(directory)) => {
                    directory.children.clone().unwrap_or_default()
                }
                _ => {
                    return Err(MountFault::Internal {
                        what: format!("storing inode {ino} as a directory, which it is not"),
                    }
                    .into());
                }
            };
            if children_stored {
                self.store_one_directory(inodes, importer, ino, children)?;
                continue;
            }
            if depth > depth_max {
                return Err(too_deep(&self.path_of(inodes, ino), depth_max));
            }
            pending.push((ino, depth, true));
            for child in children.values() {
                if let Some(NodeKind::Directory(directory)) =
                    inodes.nodes.get(child).map(|node| &node.kind)
                    && directory.tree.is_none()
                {
                    pending.push((*child, depth + 1, false));
                }
            }
        }
        match inodes.nodes.get(&top).map(|node| &node.kind) {
            Some(NodeKind::Directory(Directory {
                tree: Some(tree), ..
            })) => Ok(*tree),
            _ => Err(MountFault::Internal {
                what: format!("directory inode {top} has no tree after storing it"),
            }
            .into()),
        }
    }

    /// Stores the tree of directory `ino`, whose changed subdirectories are stored.
    pub(super) fn store_one_directory(
        &self,
        inodes: &mut Inodes,
        importer: &Importer<'_>,
        ino: u64,
        children: BTreeMap<Vec<u8>, u64>,
    ) -> Result<Cid> {
        let mut entries = Vec::with_capacity(children.len());
        let stored = match inodes.nodes.get(&ino).map(|node| &node.kind) {
            Some(NodeKind::Directory(directory)) => directory.stored.clone(),
            _ => None,
        };
        for (name, child) in children {
            if !inodes.nodes.contains_key(&child) {
                // Not used since its tree was loaded: stored again as it was.
                if let Some(entry) = stored.as_ref().and_then(|stored| stored.entry(child)) {
                    debug_assert_eq!(entry.name, name, "a stored entry keeps its name");
                    entries.push(entry.clone());
                }
                continue;
            }
            let content = match inodes.nodes.get(&child).map(|node| &node.kind) {
                Some(NodeKind::Directory(Directory {
                    tree: Some(tree), ..
                })) => EntryContent::Directory {
                    tree: *tree.as_bytes(),
                },
                Some(NodeKind::Directory(_)) => {
                    return Err(MountFault::Internal {
                        what: format!("directory inode {child} is not stored before its parent"),
                    }
                    .into());
                }
                Some(NodeKind::File(file)) => match file.base.inline_data() {
                    Some(data) => EntryContent::InlineData(data.to_vec()),
                    None => importer.file_content(file.base.manifest.clone())?,
                },
                Some(NodeKind::Symlink(target)) => EntryContent::Symlink {
                    target: target.clone(),
                },
                Some(NodeKind::Special(content)) => content.clone(),
                None => continue,
            };
            let link_group = self.link_group_of(inodes, child)?;
            let Some(node) = inodes.nodes.get(&child) else {
                continue;
            };
            let size = match &node.kind {
                NodeKind::File(file) => file.base.size(),
                NodeKind::Symlink(target) => target.len() as u64,
                NodeKind::Directory(_) | NodeKind::Special(_) => 0,
            };
            entries.push(TreeEntry {
                name,
                mode: node.mode & 0o7777,
                mtime_ns: node.mtime_ns,
                size,
                content,
                // A ctime equal to the mtime is what a missing one reads as: leave it out,
                // so an entry nobody touched encodes as it was.
                meta: EntryMeta {
                    ctime_ns: (node.ctime_ns != node.mtime_ns).then_some(node.ctime_ns),
                    link_group,
                    ..node.meta.clone()
                },
            });
        }
        let cid = importer.store_tree(Tree { entries })?;
        debug_assert!(
            inodes.nodes.contains_key(&ino),
            "a stored directory stays in the table"
        );
        if let Some(Inode {
            kind: NodeKind::Directory(directory),
            ..
        }) = inodes.nodes.get_mut(&ino)
        {
            directory.tree = Some(cid);
        }
        Ok(cid)
    }

    /// The hard-link group entry `ino`'s names are stored with: none for a single name;
    /// for several, the group it came with or, for links made through the mount, a new
    /// one from the vault's randomness (kept, so each of its directories stores the same
    /// group and later commits keep it).
    pub(super) fn link_group_of(&self, inodes: &mut Inodes, ino: u64) -> Result<Option<u64>> {
        let Some(node) = inodes.nodes.get_mut(&ino) else {
            return Ok(None);
        };
        if node.link_count() < 2 {
            return Ok(None);
        }
        if let Some(group) = node.meta.link_group {
            return Ok(Some(group));
        }
        let group = u64::from_le_bytes(self.vault.random_array()?);
        node.meta.link_group = Some(group);
        Ok(Some(group))
    }
}

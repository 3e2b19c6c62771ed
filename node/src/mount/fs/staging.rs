//! File contents being written: staging a file on its first write, chunking it into the
//! vault when it is closed or the tree is stored, and reading ahead of sequential readers.

use super::*;

impl MountedFs {
    /// The staging file of file `ino`, created on first need.
    pub(super) fn staged_for(&self, ino: u64) -> Result<Arc<Staged>, Errno> {
        let mut inodes = self.lock();
        let Some(Inode {
            kind: NodeKind::File(file),
            ..
        }) = inodes.nodes.get_mut(&ino)
        else {
            return Err(Errno::EISDIR);
        };
        if let Some(staged) = &file.staged {
            return Ok(staged.clone());
        }
        let path = self.staging_dir.join(format!("{ino}-{}", file.version));
        let staged = Arc::new(
            Staged::create(path, file.base.size()).map_err(|error| log_error("staging", &error))?,
        );
        file.staged = Some(staged.clone());
        Ok(staged)
    }

    /// Runs `change` with the file's staging state locked (retrying if it was retired by a
    /// concurrent chunking), then updates size and times.
    pub(super) fn change_content(
        &self,
        ino: u64,
        change: impl Fn(&Staged, &mut crate::mount::content::StagedState, &mut u64) -> Result<(), Errno>,
    ) -> Result<FileAttr, Errno> {
        loop {
            let staged = self.staged_for(ino)?;
            let mut state = staged.lock();
            if state.retired {
                continue;
            }
            let mut inodes = self.lock();
            let Some(node) = inodes.nodes.get_mut(&ino) else {
                return Err(Errno::ENOENT);
            };
            let NodeKind::File(file) = &mut node.kind else {
                return Err(Errno::EISDIR);
            };
            change(&staged, &mut state, &mut file.size)?;
            file.version += 1;
            let now = self.vault.now_ns();
            node.mtime_ns = now;
            node.ctime_ns = now;
            let attr = self.attr(ino, node);
            Self::invalidate_names(&mut inodes, ino);
            return Ok(attr);
        }
    }

    /// Chunks a file's staged bytes into the working tree (on close, fsync and commit).
    ///
    /// # Errors
    /// Storage errors.
    pub fn chunk_file(&self, ino: u64) -> Result<()> {
        let Some(staged) = ({
            let inodes = self.lock();
            match inodes.nodes.get(&ino).map(|node| &node.kind) {
                Some(NodeKind::File(file)) => file.staged.clone(),
                _ => None,
            }
        }) else {
            return Ok(());
        };
        let mut state = staged.lock();
        if state.retired {
            return Ok(());
        }
        let (base, size) = {
            let inodes = self.lock();
            match inodes.nodes.get(&ino).map(|node| &node.kind) {
                Some(NodeKind::File(file)) => (file.base.clone(), file.size),
                _ => return Ok(()),
            }
        };
        let progress = Progress::new("mount", false);
        let importer = Importer::new(&self.vault, &self.volume, &self.session, &progress)?;
        let content = rechunk(
            &self.vault,
            &self.cache,
            &importer,
            &base,
            &staged,
            &state,
            size,
        )?;
        importer.write_pending()?;
        state.retired = true;
        {
            let mut inodes = self.lock();
            if let Some(Inode {
                kind: NodeKind::File(file),
                ..
            }) = inodes.nodes.get_mut(&ino)
            {
                file.base = Arc::new(content);
                file.staged = None;
                // A tree stored since the write (by an fsync of another file) still names
                // the old content: it must be stored again.
                Self::invalidate_names(&mut inodes, ino);
            }
        }
        drop(state);
        let _ = std::fs::remove_file(&staged.path);
        Ok(())
    }

    /// Chunks every staged file.
    ///
    /// # Errors
    /// Storage errors.
    pub fn chunk_all(&self) -> Result<()> {
        let staged: Vec<u64> = self
            .lock()
            .nodes
            .iter()
            .filter(|(_, node)| matches!(&node.kind, NodeKind::File(file) if file.staged.is_some()))
            .map(|(ino, _)| *ino)
            .collect();
        for ino in staged {
            self.chunk_file(ino)?;
        }
        Ok(())
    }

    /// Prefetches the chunks after `index` of `base` into the cache, off the request
    /// thread, each at most once at a time.
    pub(super) fn read_ahead(self: &Arc<Self>, base: &Arc<BaseContent>, index: usize) {
        let Some(pool) = &self.read_ahead_pool else {
            return;
        };
        for next in index + 1..=index + READ_AHEAD_CHUNKS {
            let Some(extent) = base.manifest.extents.get(next) else {
                return;
            };
            let Extent::Chunk(chunk) = extent else {
                continue;
            };
            let cid = chunk.cid();
            if !self.cache.claim(&cid) {
                continue;
            }
            let (fs, base) = (self.clone(), base.clone());
            pool.spawn(move || {
                let loaded = match &base.manifest.extents[next] {
                    Extent::Chunk(chunk) => fs.vault.read_chunk_plaintext(chunk).ok(),
                    Extent::Hole { .. } => None,
                };
                if loaded.is_some() {
                    fs.metrics.read_ahead_chunks.inc();
                }
                fs.cache.complete(&cid, loaded.map(Arc::new));
            });
        }
    }
}

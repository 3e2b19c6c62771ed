//! A parallel, iterative post-order walk of a directory tree: import (a directory's tree is
//! stored once every entry below it is) and export (a directory's owner, mode and times are
//! set once everything in it is written) are both this walk.
//!
//! Nothing recurses: each directory is a job spawned on the vault's pool, its entries are
//! handled in batches (jobs too), a subdirectory met in a batch becomes a job of its own,
//! and the last entry of a directory to finish completes it, then its parent if that was
//! the parent's last entry, and so on up, in a loop. So the depth of a tree never meets a
//! thread's stack (a 10,000-level chain runs on stacks of a few MiB), and every core works
//! on whichever directories are ready, as the recursive walk's nested `par_iter` did.
//!
//! The depth limit is checked when a directory is opened: a tree deeper than a volume holds
//! fails the walk with the walker's error, and nothing of it is used.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{NodeError, Result};

/// Where a directory of a walk is, as a chain of names up to the walk's root: each level
/// holds its own name and a reference to its parent's, so the directories a walk holds
/// cost their depth, not the sum of their paths' lengths (a 10,000-level chain of 9-byte
/// names held 450 MB of paths: each level's full path). The full path is made only when
/// a message needs it.
#[derive(Debug, Clone)]
pub(crate) struct TreePath(Arc<PathLink>);

#[derive(Debug)]
struct PathLink {
    /// None for the root, whose `name` is the whole root path.
    parent: Option<TreePath>,
    name: OsString,
}

impl TreePath {
    /// The root of a walk.
    pub(crate) fn root(path: &Path) -> Self {
        Self(Arc::new(PathLink {
            parent: None,
            name: path.as_os_str().to_owned(),
        }))
    }

    /// Entry `name` of this directory.
    pub(crate) fn child(&self, name: &OsStr) -> Self {
        Self(Arc::new(PathLink {
            parent: Some(self.clone()),
            name: name.to_owned(),
        }))
    }

    /// The whole path (its length is the depth's: make it only to show it).
    pub(crate) fn to_path(&self) -> PathBuf {
        let mut names = Vec::new();
        let mut link = Some(self);
        while let Some(TreePath(current)) = link {
            names.push(current.name.as_os_str());
            link = current.parent.as_ref();
        }
        names.iter().rev().collect()
    }

    /// The path of entry `name` of this directory.
    pub(crate) fn join(&self, name: &OsStr) -> PathBuf {
        self.to_path().join(name)
    }
}

impl Drop for PathLink {
    /// Unlinks a chain whose last holder this was iteratively: dropping a 10,000-level
    /// chain must not recurse once per level.
    fn drop(&mut self) {
        let mut parent = self.parent.take();
        while let Some(TreePath(link)) = parent {
            parent = match Arc::try_unwrap(link) {
                Ok(mut unique) => unique.parent.take(),
                Err(_) => None,
            };
        }
    }
}

/// Entries of one directory handled by one job, at most: enough to amortize a job, few
/// enough that a large directory spreads over every core.
const ENTRIES_PER_JOB: usize = 32;

/// What one entry of an open directory turned out to be.
pub(crate) enum Visit<D, I> {
    /// Handled: this is its result.
    Done(I),
    /// Left out (unreadable, not restorable): no result, and the walk goes on.
    Skipped,
    /// A subdirectory: walked as its own job; its [`PostOrderWalk::finish`] gives this
    /// entry's result.
    Descend(D),
}

/// The three steps of a post-order walk; the walk runs them on the current rayon pool.
pub(crate) trait PostOrderWalk: Sync {
    /// What it takes to open a directory (its parent's descriptor and its name, say).
    type Directory: Send;
    /// An open directory: what its entries are handled against.
    type Open: Send + Sync;
    /// The result of one entry (import: its tree entry; export: nothing).
    type Item: Send;

    /// Opens `directory`, `depth` levels below the root (the root is 0), and lists it:
    /// its entry count and what the entries are handled against. `None` skips it (its
    /// parent gets no result for it). The depth limit is checked here.
    ///
    /// # Errors
    /// Whatever must end the walk.
    fn open(&self, directory: Self::Directory, depth: usize)
    -> Result<Option<(Self::Open, usize)>>;

    /// Handles entry `index` (below the count `open` returned) of `open`.
    ///
    /// # Errors
    /// Whatever must end the walk.
    fn visit(&self, open: &Self::Open, index: usize) -> Result<Visit<Self::Directory, Self::Item>>;

    /// Called once every entry of `open` was visited (its subdirectories may still be
    /// walking): what only visits needed (the directory's descriptor, say) can go.
    fn visited(&self, _open: &Self::Open) {}

    /// Completes a directory once each of its entries is handled: `items` holds each
    /// entry's result by index (`None` for skipped ones). The result is the directory's
    /// own, for its parent (or what the walk returns, for the root).
    ///
    /// # Errors
    /// Whatever must end the walk.
    fn finish(
        &self,
        open: &Self::Open,
        items: Vec<Option<Self::Item>>,
    ) -> Result<Option<Self::Item>>;
}

/// Walks the tree below `root` with `walker` on the current rayon pool and returns the
/// root's result (`None` when the root was skipped).
///
/// # Errors
/// The first error a step returned (the walk stops starting new work; what had started
/// ends first).
pub(crate) fn walk<W: PostOrderWalk>(walker: &W, root: W::Directory) -> Result<Option<W::Item>> {
    let walk = Walk {
        walker,
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        root: Mutex::new(None),
    };
    rayon::in_place_scope(|scope| walk.directory(scope, root, 0, None));
    if let Some(error) = walk
        .error
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        return Err(error);
    }
    Ok(walk
        .root
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .flatten())
}

/// The shared state of one walk.
struct Walk<'w, W: PostOrderWalk> {
    walker: &'w W,
    /// Set at the first error: no new work starts.
    failed: AtomicBool,
    error: Mutex<Option<NodeError>>,
    /// The root's result, once it finished (`Some(None)`: it was skipped).
    root: Mutex<Option<Option<W::Item>>>,
}

/// A directory whose entries are being handled.
struct Pending<W: PostOrderWalk> {
    open: W::Open,
    items: Mutex<Vec<Option<W::Item>>>,
    /// Entries not handled yet; the one that brings it to zero completes the directory.
    remaining: AtomicUsize,
    /// Entries not visited yet; the one that brings it to zero calls `visited`.
    unvisited: AtomicUsize,
    /// Where its result goes: entry `.1` of directory `.0` (none for the root).
    parent: Option<(Arc<Pending<W>>, usize)>,
    depth: usize,
}

impl<W: PostOrderWalk> Walk<'_, W> {
    fn fail(&self, error: NodeError) {
        self.failed.store(true, Ordering::Relaxed);
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(error);
    }

    /// Opens a directory and spawns the jobs of its entries.
    fn directory<'s>(
        &'s self,
        scope: &rayon::Scope<'s>,
        directory: W::Directory,
        depth: usize,
        parent: Option<(Arc<Pending<W>>, usize)>,
    ) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        let (open, count) = match self.walker.open(directory, depth) {
            Ok(Some(opened)) => opened,
            Ok(None) => return self.deliver(parent, None),
            Err(error) => return self.fail(error),
        };
        let pending = Arc::new(Pending {
            open,
            items: Mutex::new(std::iter::repeat_with(|| None).take(count).collect()),
            remaining: AtomicUsize::new(count),
            unvisited: AtomicUsize::new(count),
            parent,
            depth,
        });
        if count == 0 {
            self.walker.visited(&pending.open);
            return self.complete(pending);
        }
        for start in (0..count).step_by(ENTRIES_PER_JOB) {
            let pending = Arc::clone(&pending);
            let end = (start + ENTRIES_PER_JOB).min(count);
            scope.spawn(move |scope| self.entries(scope, &pending, start..end));
        }
    }

    /// Handles entries `range` of a directory; a subdirectory becomes a job of its own.
    fn entries<'s>(
        &'s self,
        scope: &rayon::Scope<'s>,
        pending: &Arc<Pending<W>>,
        range: std::ops::Range<usize>,
    ) {
        for index in range {
            if self.failed.load(Ordering::Relaxed) {
                return;
            }
            let visit = self.walker.visit(&pending.open, index);
            if pending.unvisited.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.walker.visited(&pending.open);
            }
            match visit {
                Ok(Visit::Done(item)) => {
                    self.deliver(Some((Arc::clone(pending), index)), Some(item))
                }
                Ok(Visit::Skipped) => self.deliver(Some((Arc::clone(pending), index)), None),
                Ok(Visit::Descend(directory)) => {
                    let (parent, depth) = (Arc::clone(pending), pending.depth + 1);
                    scope.spawn(move |scope| {
                        self.directory(scope, directory, depth, Some((parent, index)));
                    });
                }
                Err(error) => return self.fail(error),
            }
        }
    }

    /// Gives `item` to entry `index` of `parent` (or makes it the walk's result) and
    /// completes the parent if this was its last entry.
    fn deliver(&self, parent: Option<(Arc<Pending<W>>, usize)>, item: Option<W::Item>) {
        let Some((parent, index)) = parent else {
            *self.root.lock().unwrap_or_else(PoisonError::into_inner) = Some(item);
            return;
        };
        parent.items.lock().unwrap_or_else(PoisonError::into_inner)[index] = item;
        if parent.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.complete(parent);
        }
    }

    /// Finishes a directory whose entries are all handled, then its parent if that was the
    /// parent's last entry, and so on up: a loop, never a recursion.
    fn complete(&self, mut pending: Arc<Pending<W>>) {
        loop {
            if self.failed.load(Ordering::Relaxed) {
                return;
            }
            debug_assert_eq!(pending.remaining.load(Ordering::Acquire), 0);
            let items =
                std::mem::take(&mut *pending.items.lock().unwrap_or_else(PoisonError::into_inner));
            let item = match self.walker.finish(&pending.open, items) {
                Ok(item) => item,
                Err(error) => return self.fail(error),
            };
            let Some((parent, index)) = pending.parent.clone() else {
                *self.root.lock().unwrap_or_else(PoisonError::into_inner) = Some(item);
                return;
            };
            // This directory is done with: its open state (a descriptor, say) goes now,
            // not when the last job holding it happens to end.
            drop(pending);
            parent.items.lock().unwrap_or_else(PoisonError::into_inner)[index] = item;
            if parent.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
                return;
            }
            pending = parent;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path is made from its chain of names only when asked for, and a chain far deeper
    /// than any tree drops without recursing (on a 64 KiB stack).
    #[test]
    fn tree_paths_hold_one_name_a_level_and_drop_iteratively() {
        let root = TreePath::root(Path::new("/tmp/out"));
        let child = root.child(OsStr::new("a"));
        assert_eq!(child.join(OsStr::new("b")), Path::new("/tmp/out/a/b"));
        assert_eq!(root.to_path(), Path::new("/tmp/out"));
        std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(|| {
                let mut deepest = TreePath::root(Path::new("/"));
                for _ in 0..200_000 {
                    deepest = deepest.child(OsStr::new("d"));
                }
                assert_eq!(deepest.to_path().as_os_str().len(), 1 + 2 * 200_000 - 1);
                drop(deepest);
            })
            .unwrap()
            .join()
            .expect("a deep chain dropped without overflowing the stack");
    }
}

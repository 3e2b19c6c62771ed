//! Wing & Gong's linearizability check of one compare-and-swap register: is there an
//! order of the operations, each placed between its invocation and its response, in
//! which every result is what the register would have answered? An operation whose
//! outcome is unknown (its client gave up) may take effect at any point after its
//! invocation, or never.
//! Used by the consensus tests and the simulator's raft scenario.

use std::collections::BTreeSet;

/// One operation on the register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Compare-and-swap `expected` → `new`; `applied`: None when unknown.
    Swap {
        /// The value it required (None: absent).
        expected: Option<String>,
        /// The value it wrote.
        new: String,
        /// Whether it took effect; None when unknown.
        applied: Option<bool>,
    },
    /// A read that returned this.
    Read(Option<String>),
}

/// An operation and when it ran, in any monotonic unit.
#[derive(Debug, Clone)]
pub struct Event {
    /// What it was, and its result.
    pub op: Op,
    /// When it was invoked.
    pub invoked: u64,
    /// `u64::MAX` when the outcome is unknown.
    pub returned: u64,
}

/// The state after `event` runs on `state`, if its recorded result is possible there.
fn step(state: &Option<String>, event: &Event) -> Option<Option<String>> {
    match &event.op {
        Op::Read(value) => (value == state).then(|| state.clone()),
        Op::Swap {
            expected,
            new,
            applied,
        } => {
            let holds = expected == state;
            match applied {
                Some(true) => holds.then(|| Some(new.clone())),
                Some(false) => (!holds).then(|| state.clone()),
                None => Some(if holds {
                    Some(new.clone())
                } else {
                    state.clone()
                }),
            }
        }
    }
}

/// Whether `history` (starting from an absent register) is linearizable.
#[must_use]
pub fn check(history: &[Event]) -> bool {
    let mut seen = BTreeSet::new();
    search(history, &mut vec![false; history.len()], &None, &mut seen)
}

fn search(
    history: &[Event],
    done: &mut Vec<bool>,
    state: &Option<String>,
    seen: &mut BTreeSet<(Vec<bool>, Option<String>)>,
) -> bool {
    // Finished once every operation with a known outcome is placed.
    if history
        .iter()
        .zip(done.iter())
        .all(|(event, done)| *done || event.returned == u64::MAX)
    {
        return true;
    }
    if !seen.insert((done.clone(), state.clone())) {
        return false;
    }
    // The earliest response among what is left: anything invoked after it cannot
    // come next.
    let horizon = history
        .iter()
        .zip(done.iter())
        .filter(|(_, done)| !**done)
        .map(|(event, _)| event.returned)
        .min()
        .unwrap_or(u64::MAX);
    for index in 0..history.len() {
        if done[index] || history[index].invoked > horizon {
            continue;
        }
        if let Some(next) = step(state, &history[index]) {
            // An unknown operation that changes nothing here is the same as one that
            // never happened: leaving it out keeps the search from branching on it.
            if history[index].returned == u64::MAX && next == *state {
                continue;
            }
            done[index] = true;
            if search(history, done, &next, seen) {
                return true;
            }
            done[index] = false;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_accepts_a_valid_history_and_refuses_a_lost_write() {
        let swap = |expected: Option<&str>, new: &str, applied| Op::Swap {
            expected: expected.map(str::to_owned),
            new: new.to_owned(),
            applied,
        };
        let event = |op, invoked, returned| Event {
            op,
            invoked,
            returned,
        };
        let valid = [
            event(swap(None, "a", Some(true)), 0, 10),
            event(Op::Read(Some("a".into())), 5, 15),
            event(swap(Some("a"), "b", None), 20, u64::MAX),
            event(Op::Read(Some("b".into())), 30, 40),
        ];
        assert!(check(&valid));
        // An acknowledged write that a later read does not see.
        let lost = [
            event(swap(None, "a", Some(true)), 0, 10),
            event(Op::Read(None), 20, 30),
        ];
        assert!(!check(&lost));
        // Applied twice: the same expectation cannot succeed twice in a row.
        let twice = [
            event(swap(None, "a", Some(true)), 0, 10),
            event(swap(None, "b", Some(true)), 20, 30),
        ];
        assert!(!check(&twice));
    }
}

//! Cluster membership: how the layout changes and how every node follows it.
//!
//! - [`meta`]: the authoritative layout in the meta group — linearizable read, compare-and-set.
//! - [`reconcile`]: a node adopts a newer layout — starts the groups it now hosts, stops and
//!   deletes those it no longer hosts, learns new peers, persists the layout.
//! - [`placement`]: the placement rules, as a pure function from the cluster's state to the next
//!   action (move a replica, transfer a leadership, retire a drained node).
//! - [`driver`]: the placement driver loop on the meta leader: surveys the nodes (pushing the
//!   layout to them), asks [`placement`] what to do, and does it, one step at a time.
//! - [`follow`]: every member asks its peers in turn for a newer layout, so a node removed while
//!   it was down learns that it was removed; and at start, a node checks that it runs at the
//!   addresses the cluster records for it (`node update` may have moved it while it was down).
//! - [`admin`]: the operator's `node add` / `node remove` / `node update` requests, validated
//!   against the layout and the survey before anything is written.
//!
//! A replica move is three steps, each safe to repeat after a crash or a meta-leader change:
//! (1) the layout records the move, so the target starts an empty group; (2) the shard's leader
//! adds the target as a learner, waits for it to catch up (log or snapshot), and replaces the
//! voter set in one joint-consensus change; (3) the layout records the new replica set, so the
//! source stops its group and deletes its data.

pub mod admin;
pub mod driver;
pub mod follow;
pub mod meta;
pub mod placement;
pub mod reconcile;

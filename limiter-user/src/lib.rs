//! The agent and CLI of the fleet-wide XDP rate limiter, as a library so the integration
//! tests drive the same code the `limiter` binary runs.

pub mod agent;
pub mod batch;
pub mod control;
pub mod datapath;
pub mod reconcile;
pub mod rule_table;
pub mod rules;
pub mod stats;
pub mod store;

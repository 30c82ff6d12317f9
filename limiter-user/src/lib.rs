//! The agent and CLI of the fleet-wide XDP rate limiter, as a library so the integration
//! tests drive the same code the `limiter` binary runs.

pub mod acl;
pub mod agent;
pub mod batch;
pub mod config;
pub mod control;
pub mod datapath;
pub mod explain;
pub mod manual;
pub mod metrics;
pub mod packet;
pub mod reconcile;
pub mod rule_sync;
pub mod rule_table;
pub mod rules;
pub mod stats;
pub mod store;
pub mod top;

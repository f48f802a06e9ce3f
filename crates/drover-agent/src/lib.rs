//! wip
pub mod app;
pub mod archive;
pub mod client;
pub mod config;
pub mod crash;
pub mod duration;
pub mod fsutil;
pub mod layout;
pub mod outbox;
pub mod process;
pub mod schedule;
pub mod script;
#[cfg(test)]
mod testutil;

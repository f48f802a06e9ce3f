//! The data cloud at the hub: energy arithmetic, and (as it lands) the ingest path, the
//! time-series store and reports. See docs/data-cloud.md.

pub mod chunk;
pub mod energy;
pub mod fold;
pub mod folder;
pub mod queue;
pub mod report;
pub mod retention;
pub mod rollup;

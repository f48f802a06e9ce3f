//! stub
use std::time::Duration;
#[derive(Debug, Clone)]
pub struct Options {
    pub batches: usize,
    pub gap: Duration,
}
#[derive(Debug)]
pub struct Report {
    pub options: Options,
}
pub async fn run(options: Options) -> anyhow::Result<Report> {
    anyhow::bail!("not yet {options:?}")
}

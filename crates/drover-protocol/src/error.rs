//! The JSON body every Drover HTTP API sends with a 4xx or 5xx status.

use serde::{Deserialize, Serialize};

/// `{"error": "<code>", "message": "<what was wrong and how to fix it>"}`.
///
/// `error` is a stable, machine-readable code (such as `invalid_json`, `device_pending`,
/// `not_found`); `message` is a sentence for people. Clients show `message` and branch on
/// `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable code.
    pub error: String,
    /// What was wrong, and what to do about it.
    pub message: String,
}

//! `eventpipe bench ...`: workloads on the local stack, each measured next to a baseline in the
//! same run so the result is a ratio; prints a table and one JSON line per result.

pub mod aggregate;
pub mod broker;
pub mod dispatch;
pub mod measure;

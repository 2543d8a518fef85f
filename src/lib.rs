//! session-gateway: a reverse proxy that gives any web app server-side
//! sessions. See README.md for the protocol and the configuration.

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod drain;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod session;
mod sharded_lru;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod yaml;

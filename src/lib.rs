//! session-gateway: a reverse proxy that gives any web app server-side
//! sessions. See README.md for the protocol and the configuration.

pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod drain;
pub mod proxy;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod yaml;

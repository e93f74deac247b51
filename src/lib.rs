//! cliqgate: a rate-limiting reverse proxy in front of the Zoho Cliq REST API.
//!
//! The request path reads top to bottom in [`proxy`]; the window guarantee lives in [`limit`];
//! everything that touches sockets is in [`app`], [`upstream`] and [`admin`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod body;
pub mod config;
pub mod error;
pub mod headers;
pub mod identity;
pub mod limit;
pub mod metrics;
pub mod proxy;
pub mod resolve;
pub mod route;
pub mod server;
pub mod state;
pub mod throttle;
pub mod upstream;
pub mod validate;

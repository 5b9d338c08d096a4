//! What a client connection carries through every stage: who the client
//! is, which listener took it, and its slot under the connection caps.
use std::net::SocketAddr;
use std::sync::Arc;

use crate::metrics::ListenerKind;
use crate::policy::Who;

/// What is known about the client of a flow.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub addr: SocketAddr,
    /// The authenticated user, with proxy authentication.
    pub user: Option<Arc<str>>,
    /// The user's directory groups, when an exception names groups.
    pub groups: Option<crate::directory::Groups>,
}

impl ClientInfo {
    pub fn who(&self) -> Who {
        Who::new(self.addr.ip(), self.user.clone()).with_groups(self.groups.clone())
    }
}

/// One client connection's context.
#[derive(Debug, Clone)]
pub struct ConnCtx {
    pub client: ClientInfo,
    pub listener: ListenerKind,
    /// The client connection's slot under the connection caps, shared by
    /// everything the connection carries (a tunnel outlives the HTTP
    /// server's part of it).
    pub slot: Option<Arc<super::ConnGuard>>,
}

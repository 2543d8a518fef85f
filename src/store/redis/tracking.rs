//! Keeps the near cache coherent with Redis: one RESP3 connection per
//! Redis node with `CLIENT TRACKING ON BCAST PREFIX <session.key_prefix>`,
//! so every node pushes `invalidate <key>` whenever any client changes,
//! touches, expires or deletes a session key (`invalidate null` on a
//! FLUSHALL). Pushes are applied to the cache inside the connection's own
//! reader, the moment they are parsed; no queue sits in between.
//!
//! Why broadcast mode rather than Redis' default (per-key) tracking: the
//! sessions are read on the store's ordinary connections (the manager or
//! the cluster client, which reconnect and reroute by themselves); in
//! default mode only reads made on a tracking connection are tracked, so
//! every cache fill would need its own routed, tracked connection. With
//! BCAST, tracking does not depend on who read the key, Redis keeps no
//! per-key table, and the only cost is that every gateway hears about every
//! session write (one hash lookup each).
//!
//! A tracking round: find the nodes (the URL, or every node `CLUSTER NODES`
//! lists that is not failed), connect to each and enable tracking, then
//! let the cache serve ([`NearCache::go_live`]). The round ends, emptying
//! the cache and bypassing it until the next round is live, when any
//! connection closes (the reader reports it at once), a heartbeat `PING`
//! gets no answer within [`HEARTBEAT_TIMEOUT`] (a silent network loss), or
//! the cluster's node set changes (a node that joined may hold keys whose
//! changes we have not been told about). A new round starts after a short
//! backoff.

use super::{map_err, CONNECT_TIMEOUT};
use crate::session::StoreError;
use crate::store::near::{NearCache, Notifier, Status, HEARTBEAT, HEARTBEAT_TIMEOUT};
use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, ProtocolVersion, PushInfo,
    PushKind, RedisResult, TlsCertificates, Value,
};
use std::sync::Arc;
use tokio::sync::mpsc;

/// `CLIENT SETNAME` of every tracking connection, so operators (and
/// tests) can find them in `CLIENT LIST`.
pub const CLIENT_NAME: &str = "session-gateway-tracking";

/// Where the nodes to track come from.
pub(super) enum Nodes {
    Single(ConnectionInfo),
    /// Every node of the cluster, as `CLUSTER NODES` lists them (asked
    /// through the store's cluster connection), reached with the seed
    /// URL's scheme and credentials.
    Cluster {
        template: ConnectionInfo,
        pool: std::sync::Arc<super::cluster::ClusterPool>,
    },
}

pub(super) struct Tracker {
    pub cache: Arc<NearCache>,
    pub nodes: Nodes,
    pub tls: Option<TlsCertificates>,
    /// `session.key_prefix`; empty tracks every key.
    pub prefix: String,
    pub status: Arc<Status>,
}

#[async_trait]
impl Notifier for Tracker {
    fn label(&self) -> &'static str {
        "redis near cache"
    }

    async fn round(&self, generation: u64) -> StoreError {
        let (lost_tx, mut lost_rx) = mpsc::unbounded_channel::<String>();
        let targets = match self.targets().await {
            Ok(t) => t,
            Err(e) => return e,
        };
        let mut conns = Vec::with_capacity(targets.len());
        for info in &targets {
            match self
                .connect(info.clone(), generation, lost_tx.clone())
                .await
            {
                Ok(c) => conns.push(c),
                Err(e) => return near_err(&label(info), e),
            }
        }
        if !self.cache.go_live(generation) {
            let why = lost_rx.recv().await.unwrap_or_default();
            return StoreError::Unavailable(why);
        }
        self.status.clear();
        tracing::info!(
            nodes = %targets.iter().map(label).collect::<Vec<_>>().join(", "),
            "redis near cache: live (invalidations tracked)"
        );
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                why = lost_rx.recv() => {
                    return StoreError::Unavailable(why.unwrap_or_default());
                }
                _ = tick.tick() => {
                    for (conn, info) in conns.iter_mut().zip(&targets) {
                        let pong: RedisResult<String> = redis::cmd("PING").query_async(conn).await;
                        if let Err(e) = pong {
                            return near_err(&label(info), e);
                        }
                    }
                    if let Nodes::Cluster { .. } = self.nodes {
                        match self.targets().await {
                            Ok(now) if same_nodes(&now, &targets) => {}
                            Ok(_) => {
                                return StoreError::Unavailable(
                                    "redis near cache: the cluster's nodes changed; tracking them anew".into(),
                                )
                            }
                            Err(e) => return e,
                        }
                    }
                }
            }
        }
    }
}

impl Tracker {
    /// The nodes to track now.
    async fn targets(&self) -> Result<Vec<ConnectionInfo>, StoreError> {
        match &self.nodes {
            Nodes::Single(info) => Ok(vec![info.clone()]),
            Nodes::Cluster { template, pool } => {
                let text: String = pool
                    .query(&redis::cmd("CLUSTER").arg("NODES").clone())
                    .await
                    .map_err(|e| near_err("cluster", e))?;
                let addrs = cluster_nodes(&text).map_err(StoreError::Backend)?;
                Ok(addrs
                    .into_iter()
                    .map(|(host, port)| node_info(template, host, port))
                    .collect())
            }
        }
    }

    /// A RESP3 connection to one node whose pushes go straight to the
    /// cache, with tracking on.
    async fn connect(
        &self,
        mut info: ConnectionInfo,
        generation: u64,
        lost: mpsc::UnboundedSender<String>,
    ) -> RedisResult<MultiplexedConnection> {
        info.redis.protocol = ProtocolVersion::RESP3;
        let node = label(&info);
        let client = match &self.tls {
            Some(certs) => Client::build_with_tls(info, certs.clone())?,
            None => Client::open(info)?,
        };
        let cache = self.cache.clone();
        let on_push = move |push: PushInfo| -> Result<(), ()> {
            match push.kind {
                PushKind::Invalidate => invalidate(&cache, push.data),
                PushKind::Disconnection => {
                    // Before anything else can read the cache: the reader
                    // runs this the moment it sees the connection end.
                    cache.lost(generation);
                    let _ = lost.send(format!(
                        "redis near cache: tracking connection to {node} closed"
                    ));
                }
                _ => {}
            }
            Ok(())
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(HEARTBEAT_TIMEOUT)
            .set_push_sender(on_push);
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let () = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(CLIENT_NAME)
            .query_async(&mut conn)
            .await?;
        let mut tracking = redis::cmd("CLIENT");
        tracking.arg("TRACKING").arg("ON").arg("BCAST");
        if !self.prefix.is_empty() {
            tracking.arg("PREFIX").arg(&self.prefix);
        }
        let () = tracking.query_async(&mut conn).await?;
        Ok(conn)
    }
}

/// Apply one `invalidate` push: an array of keys, or null for "everything"
/// (FLUSHALL / FLUSHDB). Anything unexpected empties the cache: doubt is
/// never resolved in favour of keeping an entry.
fn invalidate(cache: &NearCache, data: Vec<Value>) {
    for item in data {
        match item {
            Value::Array(keys) => {
                for key in keys {
                    match key {
                        Value::BulkString(bytes) => {
                            // Our keys are UTF-8; others are not ours.
                            if let Ok(k) = std::str::from_utf8(&bytes) {
                                cache.invalidate(k);
                            }
                        }
                        Value::SimpleString(k) => cache.invalidate(&k),
                        _ => cache.invalidate_all(),
                    }
                }
            }
            _ => cache.invalidate_all(),
        }
    }
}

/// A tracking failure as a store error, naming the node.
fn near_err(node: &str, e: redis::RedisError) -> StoreError {
    match map_err(e) {
        StoreError::Unavailable(m) => {
            StoreError::Unavailable(format!("near cache tracking on {node}: {m}"))
        }
        StoreError::Backend(m) => StoreError::Backend(format!(
            "near cache tracking on {node}: {m} (the near cache needs Redis 6 or later with \
             RESP3 and CLIENT TRACKING; or set store.near_cache.enabled: false)"
        )),
        other => other,
    }
}

/// `host:port` of a connection, for logs and errors (no credentials).
fn label(info: &ConnectionInfo) -> String {
    match &info.addr {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        ConnectionAddr::Unix(path) => path.display().to_string(),
    }
}

fn same_nodes(a: &[ConnectionInfo], b: &[ConnectionInfo]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| label(x) == label(y))
}

/// The seed's connection settings, pointed at another node.
fn node_info(template: &ConnectionInfo, host: String, port: u16) -> ConnectionInfo {
    let addr = match &template.addr {
        ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: None,
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    ConnectionInfo {
        addr,
        redis: template.redis.clone(),
    }
}

/// The `host:port` of every node in a `CLUSTER NODES` reply that may
/// execute a change of a key, sorted: primaries, and replicas (they push
/// invalidations for the writes they replicate, and tracking them already
/// covers a failover). Left out: nodes in handshake or without an address
/// (not part of the cluster yet), and failed nodes that own no slots (a
/// failed replica, or a primary whose slots went to its replica). A failed
/// primary that still owns slots stays in: it may come back and accept
/// writes before the cluster clears its flag, so the cache is bypassed
/// until it can be tracked again. A node listed with an empty host is an
/// error: it might hold keys we could not track.
pub fn cluster_nodes(text: &str) -> Result<Vec<(String, u16)>, String> {
    let mut nodes = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.split(' ');
        let (Some(id), Some(addr), Some(flags)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(format!(
                "redis near cache: unexpected CLUSTER NODES line `{line}`"
            ));
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if flags.iter().any(|f| matches!(*f, "handshake" | "noaddr")) {
            continue;
        }
        // Fields 4-8: master, ping-sent, pong-recv, config-epoch,
        // link-state; slots follow.
        let owns_slots = fields.nth(5).is_some();
        if flags.contains(&"fail") && !owns_slots {
            continue;
        }
        // ip:port@cport[,hostname]
        let host_port = addr.split(['@', ',']).next().unwrap_or("");
        let parsed = host_port
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)));
        match parsed {
            Some((host, port)) if !host.is_empty() && port != 0 => {
                nodes.push((host.to_string(), port))
            }
            _ => {
                return Err(format!(
                    "redis near cache: cluster node {id} has no usable address (`{addr}`)"
                ))
            }
        }
    }
    nodes.sort();
    nodes.dedup();
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lists_live_nodes_with_addresses() {
        let text = "\
07c3 127.0.0.1:30004@31004,host-a slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@31003 master,fail - 1426238316232 0 3 disconnected 10923-16383
3a1b 127.0.0.1:30006@31006 master,fail - 1426238316232 0 3 disconnected
5c2d 127.0.0.1:30007@31007 slave,fail 67ed 1426238316232 0 3 disconnected
6ec2 127.0.0.1:30005@31005 handshake - 0 0 0 connected
e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
824f :0@0 noaddr - 0 0 0 disconnected
";
        assert_eq!(
            cluster_nodes(text).unwrap(),
            vec![
                ("127.0.0.1".to_string(), 30001),
                ("127.0.0.1".to_string(), 30002),
                ("127.0.0.1".to_string(), 30003),
                ("127.0.0.1".to_string(), 30004),
            ]
        );
        assert!(cluster_nodes("abc :7000@17000 master - 0 0 1 connected").is_err());
        assert!(cluster_nodes("garbage").is_err());
    }

    #[test]
    fn invalidations_drop_keys_and_null_drops_everything() {
        use crate::store::near::{Fetched, Lookup};
        use std::time::{Duration, Instant};
        let cache = NearCache::new(std::num::NonZeroUsize::new(10).unwrap());
        let g = cache.begin_round();
        assert!(cache.go_live(g));
        let fill = |k: &str| {
            let Lookup::Miss(Some(t)) = cache.lookup(k) else {
                panic!("{k}")
            };
            let at = Fetched {
                sent: Instant::now(),
                sent_wall: std::time::SystemTime::now(),
            };
            cache.fill(k, t, bytes::Bytes::new(), at, Duration::from_secs(60));
        };
        fill("s:a");
        fill("s:b");
        invalidate(
            &cache,
            vec![Value::Array(vec![Value::BulkString(b"s:a".to_vec())])],
        );
        assert_eq!(cache.stats().entries, 1);
        invalidate(&cache, vec![Value::Nil]);
        assert_eq!(cache.stats().entries, 0);
        assert!(cache.is_live(), "a FLUSHALL does not stop tracking");
    }
}

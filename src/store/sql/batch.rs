//! Reads of one store folded into one query while the previous one is
//! out ("natural batching", as group commit does for writes).
//!
//! A load hands its key to the store's reader task and waits. The reader
//! sends the first key alone, at once; keys that arrive while that query
//! is out wait for it and then go together, as one `WHERE id = ANY(...)`,
//! and so on. A lone request therefore costs the same single query as
//! before (plus a hand-over to the reader), and under load the database
//! and the gateway each pay one round trip, one statement execution and
//! one wake-up per batch instead of per request: a round trip is most of
//! what a session read costs against PostgreSQL on the same machine.
//!
//! Every key in a batch gets the answer of the same query, a snapshot
//! taken after the key was handed over, so a read still sees every write
//! completed before the request began. A caller that gave up (its
//! `store.timeout` ran out, or the client went away) is left out of the
//! next batch; a failed query fails every load of its batch with the same
//! error.

use crate::session::{Loaded, StoreError};
use std::future::Future;
use tokio::sync::{mpsc, oneshot};

/// Most keys in one query. Batches this large only form when that many
/// loads arrive during one round trip; the limit bounds the statement and
/// the time one batch holds the others back.
pub const MAX_BATCH: usize = 64;

type Reply = Result<Option<Loaded>, StoreError>;

struct Waiter {
    key: String,
    reply: oneshot::Sender<Reply>,
}

/// The handle loads go through; dropping it ends the reader task.
pub struct Batcher {
    tx: mpsc::UnboundedSender<Waiter>,
}

impl Batcher {
    /// Start the reader on the caller's runtime. `fetch` answers a batch
    /// of keys (distinct or not) with the live `(key, session)` pairs among
    /// them, in any order.
    pub fn start<F, Fut>(fetch: F) -> Batcher
    where
        F: Fn(Vec<String>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<(String, Loaded)>, StoreError>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(read(rx, fetch));
        Batcher { tx }
    }

    /// The live session under `key`, read in the next batch.
    pub async fn load(&self, key: &str) -> Reply {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the store's reader has stopped".to_string());
        self.tx
            .send(Waiter {
                key: key.to_string(),
                reply,
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn read<F, Fut>(mut rx: mpsc::UnboundedReceiver<Waiter>, fetch: F)
where
    F: Fn(Vec<String>) -> Fut,
    Fut: Future<Output = Result<Vec<(String, Loaded)>, StoreError>>,
{
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        batch.retain(|w: &Waiter| !w.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let keys = batch.iter().map(|w| w.key.clone()).collect();
        match fetch(keys).await {
            Ok(rows) => {
                for w in batch.drain(..) {
                    let found = rows.iter().find(|(k, _)| *k == w.key);
                    let _ = w.reply.send(Ok(found.map(|(_, l)| l.clone())));
                }
            }
            Err(e) => {
                for w in batch.drain(..) {
                    let _ = w.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, SystemTime};

    fn session(v: &str) -> Loaded {
        Loaded {
            value: Bytes::from(v.to_string()),
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 32),
        }
    }

    type Answer =
        std::pin::Pin<Box<dyn Future<Output = Result<Vec<(String, Loaded)>, StoreError>> + Send>>;
    type Batches = Arc<Mutex<Vec<Vec<String>>>>;

    /// A fetch that records each batch and answers keys starting with
    /// `live` (after `delay`).
    fn recording(delay: Duration) -> (Batches, impl Fn(Vec<String>) -> Answer + Send + 'static) {
        let batches = Batches::default();
        let seen = batches.clone();
        let fetch = move |keys: Vec<String>| -> Answer {
            seen.lock().unwrap().push(keys.clone());
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(keys
                    .into_iter()
                    .filter(|k| k.starts_with("live"))
                    .map(|k| {
                        let l = session(&format!("data of {k}"));
                        (k, l)
                    })
                    .collect())
            })
        };
        (batches, fetch)
    }

    /// A batcher whose queries take 50 ms, with `live-0`'s under way.
    async fn with_a_query_out() -> (Batches, Arc<Batcher>, tokio::task::JoinHandle<Reply>) {
        let (batches, fetch) = recording(Duration::from_millis(50));
        let b = Arc::new(Batcher::start(fetch));
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.load("live-0").await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        (batches, b, first)
    }

    #[tokio::test]
    async fn a_lone_load_is_one_query_of_its_own_key() {
        let (batches, fetch) = recording(Duration::ZERO);
        let b = Batcher::start(fetch);
        assert_eq!(
            b.load("live-1").await.unwrap(),
            Some(session("data of live-1"))
        );
        assert_eq!(b.load("gone").await.unwrap(), None);
        assert_eq!(*batches.lock().unwrap(), vec![vec!["live-1"], vec!["gone"]]);
    }

    #[tokio::test]
    async fn loads_arriving_during_a_query_go_together_each_with_its_own_answer() {
        let (batches, b, first) = with_a_query_out().await;
        let keys = ["live-a", "gone-b", "live-a", "live-c"];
        let rest: Vec<_> = keys
            .into_iter()
            .map(|k| {
                let b = b.clone();
                tokio::spawn(async move { b.load(k).await })
            })
            .collect();
        assert_eq!(
            first.await.unwrap().unwrap(),
            Some(session("data of live-0"))
        );
        for (k, t) in keys.iter().zip(rest) {
            let want = k
                .starts_with("live")
                .then(|| session(&format!("data of {k}")));
            assert_eq!(t.await.unwrap().unwrap(), want, "{k}");
        }
        let batches = batches.lock().unwrap();
        assert_eq!(batches.len(), 2, "{batches:?}");
        assert_eq!(batches[0], vec!["live-0"]);
        assert_eq!(batches[1], keys);
    }

    #[tokio::test]
    async fn a_failed_query_fails_its_batch_and_the_next_one_runs() {
        let calls = Arc::new(Mutex::new(0));
        let counted = calls.clone();
        let b = Batcher::start(move |keys: Vec<String>| {
            let n = {
                let mut c = counted.lock().unwrap();
                *c += 1;
                *c
            };
            async move {
                if n == 1 {
                    Err(StoreError::Unavailable("down".into()))
                } else {
                    Ok(keys.into_iter().map(|k| (k, session("back"))).collect())
                }
            }
        });
        assert!(matches!(b.load("k").await, Err(StoreError::Unavailable(m)) if m == "down"));
        assert_eq!(b.load("k").await.unwrap(), Some(session("back")));
    }

    #[tokio::test]
    async fn a_caller_that_gave_up_is_left_out_of_the_next_batch() {
        let (batches, b, first) = with_a_query_out().await;
        // Times out while the first query is out: never queried.
        let quitter = tokio::time::timeout(Duration::from_millis(5), b.load("live-quit")).await;
        assert!(quitter.is_err());
        let stayer = b.load("live-stay").await.unwrap();
        assert_eq!(stayer, Some(session("data of live-stay")));
        first.await.unwrap().unwrap();
        let batches = batches.lock().unwrap();
        assert!(
            batches
                .iter()
                .all(|b| !b.contains(&"live-quit".to_string())),
            "{batches:?}"
        );
    }
}

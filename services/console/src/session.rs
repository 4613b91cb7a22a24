//! Signed-in sessions, in memory and bounded: at most `console.max_sessions` at once, each ended
//! after `console.session_idle_s` without a request. A session holds the person's NATS
//! connection and a CSRF token; ending it (sign-out, expiry) closes the connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::person::Person;

/// One signed-in person.
#[derive(Debug)]
pub struct Session {
    /// Their NATS connection.
    pub person: Person,
    /// The token every POST of this session must carry.
    pub csrf: String,
    /// Cancelled when the session ends: live streams of this session stop.
    pub ended: CancellationToken,
    last_seen: Mutex<Instant>,
    /// Live streams open now ([`Session::open_stream`]).
    streams: std::sync::atomic::AtomicUsize,
}

/// Live streams one session may hold open at once: each costs requests every refresh.
pub const MAX_STREAMS: usize = 8;
/// Sessions one NATS user may hold at once; a further sign-in ends that user's most idle one,
/// so nobody can fill the console's sessions with one password.
pub const MAX_PER_USER: usize = 4;

/// One open live stream of a session, counted until dropped.
pub struct StreamGuard(Arc<Session>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0
            .streams
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Session {
    /// Counts one more live stream; `None` when the session holds [`MAX_STREAMS`] already.
    pub fn open_stream(self: &Arc<Self>) -> Option<StreamGuard> {
        use std::sync::atomic::Ordering;
        self.streams
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_STREAMS).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamGuard(self.clone()))
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_seen.lock() {
            *t = Instant::now();
        }
    }

    fn idle(&self) -> Duration {
        self.last_seen
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }
}

/// The sessions of one console.
#[derive(Debug)]
pub struct Sessions {
    by_token: Mutex<HashMap<String, Arc<Session>>>,
    max: usize,
    idle: Duration,
}

/// A random token, 256 bits in hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // getrandom fails only on platforms without an entropy source; a fixed token would be worse
    // than none, so fall back to two UUIDv7s (74 random bits each).
    if getrandom::fill(&mut bytes).is_err() {
        return format!(
            "{}{}",
            uuid::Uuid::now_v7().simple(),
            uuid::Uuid::now_v7().simple()
        );
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    /// At most `max` sessions, each ended after `idle` without a request.
    pub fn new(max: usize, idle: Duration) -> Self {
        Self {
            by_token: Mutex::new(HashMap::new()),
            max,
            idle,
        }
    }

    /// Opens a session for `person`; `None` when the console holds `max` sessions already.
    pub fn open(&self, person: Person) -> Option<(String, Arc<Session>)> {
        let mut map = self.by_token.lock().ok()?;
        // A user at its own cap gives up its most idle session first.
        let mine: Vec<(String, Duration)> = map
            .iter()
            .filter(|(_, s)| s.person.user == person.user)
            .map(|(k, s)| (k.clone(), s.idle()))
            .collect();
        if mine.len() >= MAX_PER_USER
            && let Some((oldest, _)) = mine.into_iter().max_by_key(|(_, idle)| *idle)
            && let Some(ended) = map.remove(&oldest)
        {
            close(ended);
        }
        if map.len() >= self.max {
            return None;
        }
        let token = random_token();
        let session = Arc::new(Session {
            person,
            csrf: random_token(),
            ended: CancellationToken::new(),
            last_seen: Mutex::new(Instant::now()),
            streams: std::sync::atomic::AtomicUsize::new(0),
        });
        map.insert(token.clone(), session.clone());
        Some((token, session))
    }

    /// The live session of `token`, refreshed; an idle one is ended instead.
    pub fn get(&self, token: &str) -> Option<Arc<Session>> {
        let session = self.by_token.lock().ok()?.get(token).cloned()?;
        if session.idle() > self.idle {
            self.end(token);
            return None;
        }
        session.touch();
        Some(session)
    }

    /// Ends the session of `token` (sign-out): its streams stop and its connection closes.
    pub fn end(&self, token: &str) {
        let removed = self.by_token.lock().ok().and_then(|mut m| m.remove(token));
        if let Some(session) = removed {
            close(session);
        }
    }

    /// Ends every idle session; returns how many.
    pub fn sweep(&self) -> usize {
        let idle: Vec<Arc<Session>> = match self.by_token.lock() {
            Ok(mut map) => {
                let keys: Vec<String> = map
                    .iter()
                    .filter(|(_, s)| s.idle() > self.idle)
                    .map(|(k, _)| k.clone())
                    .collect();
                keys.iter().filter_map(|k| map.remove(k)).collect()
            }
            Err(_) => Vec::new(),
        };
        let n = idle.len();
        for session in idle {
            close(session);
        }
        n
    }

    /// Ends every session (the console stops).
    pub fn end_all(&self) {
        let all: Vec<Arc<Session>> = match self.by_token.lock() {
            Ok(mut map) => map.drain().map(|(_, s)| s).collect(),
            Err(_) => Vec::new(),
        };
        for session in all {
            close(session);
        }
    }

    /// Sessions held now.
    pub fn len(&self) -> usize {
        self.by_token.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True when nobody is signed in.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn close(session: Arc<Session>) {
    session.ended.cancel();
    tokio::spawn(async move { session.person.close().await });
}

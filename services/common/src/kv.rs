//! Compare-and-set updates of JSON values in a KV bucket, so that concurrent replicas never
//! overwrite each other's changes (each update names the revision it read).

use async_nats::jetstream::kv;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How many times an update is retried when another writer got there first.
const MAX_CAS_ATTEMPTS: usize = 16;

/// Why a KV operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The key has no value.
    #[error("no entry for key {0}")]
    NotFound(String),
    /// The stored value is not the expected JSON.
    #[error("entry {key} is not valid: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// The decoding error.
        reason: String,
    },
    /// Too many concurrent writers in a row.
    #[error("entry {0} kept changing under us; gave up after {MAX_CAS_ATTEMPTS} attempts")]
    Contended(String),
    /// JetStream did not answer or refused.
    #[error("KV store unavailable: {0}")]
    Unavailable(String),
}

/// A value with the revision it was read at.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    /// The decoded value.
    pub value: T,
    /// The revision to name in a compare-and-set update.
    pub revision: u64,
}

/// Reads and decodes `key`; `None` when absent or deleted.
pub async fn read<T: DeserializeOwned>(
    store: &kv::Store,
    key: &str,
) -> Result<Option<Versioned<T>>, KvError> {
    let entry = store
        .entry(key)
        .await
        .map_err(|e| KvError::Unavailable(e.to_string()))?;
    let Some(entry) = entry else { return Ok(None) };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    let value = serde_json::from_slice(&entry.value).map_err(|e| KvError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Some(Versioned {
        value,
        revision: entry.revision,
    }))
}

/// Creates `key` with `value` only if it does not exist. `Ok(None)` means it was created;
/// `Ok(Some(existing))` returns what was already there (the first writer wins).
pub async fn create_or_get<T: Serialize + DeserializeOwned>(
    store: &kv::Store,
    key: &str,
    value: &T,
) -> Result<Option<Versioned<T>>, KvError> {
    let bytes = serde_json::to_vec(value).map_err(|e| KvError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    for _ in 0..MAX_CAS_ATTEMPTS {
        match store.create(key, bytes.clone().into()).await {
            Ok(_) => return Ok(None),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                // Deleted keys also report AlreadyExists; then read returns None and we retry.
                if let Some(existing) = read(store, key).await? {
                    return Ok(Some(existing));
                }
            }
            Err(err) => return Err(KvError::Unavailable(err.to_string())),
        }
    }
    Err(KvError::Contended(key.to_owned()))
}

/// What an update function decided.
pub enum Change<R> {
    /// Write the modified value and return `R`.
    Write(R),
    /// Leave the entry as it is and return `R`.
    Keep(R),
}

/// Reads `key`, lets `change` modify it, and writes it back only if nobody wrote in between;
/// otherwise reads again and retries. Returns what `change` returned and the value as stored.
pub async fn update<T, R, E>(
    store: &kv::Store,
    key: &str,
    mut change: impl FnMut(&mut T) -> Result<Change<R>, E>,
) -> Result<Result<(R, T), E>, KvError>
where
    T: Serialize + DeserializeOwned,
{
    for _ in 0..MAX_CAS_ATTEMPTS {
        let Some(Versioned {
            mut value,
            revision,
        }) = read::<T>(store, key).await?
        else {
            return Err(KvError::NotFound(key.to_owned()));
        };
        let outcome = match change(&mut value) {
            Ok(Change::Keep(r)) => return Ok(Ok((r, value))),
            Ok(Change::Write(r)) => r,
            Err(e) => return Ok(Err(e)),
        };
        let bytes = serde_json::to_vec(&value).map_err(|e| KvError::Corrupt {
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
        match store.update(key, bytes.into(), revision).await {
            Ok(_) => return Ok(Ok((outcome, value))),
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(err) => return Err(KvError::Unavailable(err.to_string())),
        }
    }
    Err(KvError::Contended(key.to_owned()))
}

/// Every live key of the bucket.
pub async fn keys(store: &kv::Store) -> Result<Vec<String>, KvError> {
    use futures::TryStreamExt;
    let keys = store
        .keys()
        .await
        .map_err(|e| KvError::Unavailable(e.to_string()))?;
    keys.try_collect()
        .await
        .map_err(|e| KvError::Unavailable(e.to_string()))
}

/// An entry as stored, whether or not it decodes.
#[derive(Debug, Clone)]
pub enum Raw<T> {
    /// No value: never written, deleted or purged (`revision` of the marker, 0 for none).
    Missing {
        /// The revision to name when writing it again.
        revision: u64,
    },
    /// A value that decodes.
    Readable(Versioned<T>),
    /// A value that does not decode (junk written by someone else, or another format).
    Unreadable {
        /// Its revision.
        revision: u64,
        /// Why it does not decode.
        reason: String,
        /// Its first bytes, for logs and narratives.
        excerpt: String,
    },
}

/// Reads `key` without failing on a value that does not decode, so a writer can replace junk
/// (a compare-and-set that parses first would fail on it for ever).
pub async fn read_raw<T: DeserializeOwned>(
    store: &kv::Store,
    key: &str,
) -> Result<Raw<T>, KvError> {
    let entry = store
        .entry(key)
        .await
        .map_err(|e| KvError::Unavailable(e.to_string()))?;
    let Some(entry) = entry else {
        return Ok(Raw::Missing { revision: 0 });
    };
    if entry.operation != kv::Operation::Put {
        return Ok(Raw::Missing {
            revision: entry.revision,
        });
    }
    Ok(match serde_json::from_slice(&entry.value) {
        Ok(value) => Raw::Readable(Versioned {
            value,
            revision: entry.revision,
        }),
        Err(err) => Raw::Unreadable {
            revision: entry.revision,
            reason: err.to_string(),
            excerpt: crate::api::excerpt(&String::from_utf8_lossy(&entry.value), 64),
        },
    })
}

/// Writes `value` over the entry last seen at `revision` (0: never written), whatever that
/// entry held. `Ok(false)` when someone wrote in between (read it again).
pub async fn overwrite<T: Serialize>(
    store: &kv::Store,
    key: &str,
    value: &T,
    revision: u64,
) -> Result<bool, KvError> {
    let bytes = serde_json::to_vec(value).map_err(|e| KvError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    let written = if revision == 0 {
        store
            .create(key, bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| {
                (
                    e.kind() == kv::CreateErrorKind::AlreadyExists,
                    e.to_string(),
                )
            })
    } else {
        store
            .update(key, bytes.into(), revision)
            .await
            .map(|_| ())
            .map_err(|e| {
                (
                    e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                    e.to_string(),
                )
            })
    };
    match written {
        Ok(()) => Ok(true),
        Err((true, _)) => Ok(false),
        Err((false, err)) => Err(KvError::Unavailable(err)),
    }
}

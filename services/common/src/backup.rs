//! Backup and restore of bulwark's durable state: every JetStream stream named `BULWARK_*` and
//! every KV bucket `bulwark_*` (the stream `KV_bulwark_*`), with the JetStream snapshot API.
//!
//! **Backup** ([`backup`]): for each stream, a request to `$JS.API.STREAM.SNAPSHOT.<stream>`
//! with a private deliver subject; the server streams the snapshot (an S2-compressed tar of the
//! stream's store and its consumers) in chunks, each acknowledged on its reply subject (the
//! server's flow control), and ends with an empty message. Each stream becomes one file
//! `<stream>.snap`; the server's answer (stream config and state) goes into the manifest. The
//! backup is written into `<dir>/<timestamp>.partial` and renamed to `<dir>/<timestamp>` once the
//! manifest is written, so a backup directory without `.partial` is complete.
//!
//! **Manifest** (`manifest.json`): format, creation time, and per stream the file name, its size
//! and SHA-256, the message count, first and last sequence, and the config and state to restore.
//!
//! **Restore** ([`restore`]): [`verify`] first (every file present, of the recorded size and
//! SHA-256; the error names the file), and nothing is touched when it fails. Then per stream a
//! request to `$JS.API.STREAM.RESTORE.<stream>` with the config and state, the file sent in
//! chunks to the deliver subject the server names (each chunk is a request the server
//! acknowledges), an empty message to finish, and the server's stream info checked against the
//! manifest (messages and last sequence). A stream that already exists is refused unless
//! `replace` is set, in which case it is deleted first. Sequences are the snapshot's, so the
//! clarity audit chain (whose record `seq` is the audit stream sequence) verifies after restore.
//!
//! [`latest_good`] picks the newest backup that verifies and lists the newer ones it skipped.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The manifest's file name inside a backup directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The manifest format this module writes and reads.
pub const FORMAT: &str = "bulwark-backup/1";
/// Snapshot chunk size asked of the server and used when restoring.
const CHUNK_SIZE: usize = 128 * 1024;
/// How long to wait for the next snapshot chunk or a restore acknowledgement.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// One stream in a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamEntry {
    /// The stream's name (`BULWARK_AUDIT`, `KV_bulwark_intents`, ...).
    pub stream: String,
    /// The snapshot file, relative to the backup directory.
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// Messages in the stream when the snapshot was taken.
    pub messages: u64,
    /// First sequence in the stream.
    pub first_seq: u64,
    /// Last sequence in the stream.
    pub last_seq: u64,
    /// The stream config the server reported (sent back when restoring).
    pub config: Value,
    /// The stream state the server reported (sent back when restoring).
    pub state: Value,
}

/// A backup's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// When the backup was taken, RFC 3339 UTC.
    pub created_at: String,
    /// The streams, in the order they were taken.
    pub streams: Vec<StreamEntry>,
}

impl Manifest {
    /// The entry of `stream`.
    pub fn stream(&self, stream: &str) -> Option<&StreamEntry> {
        self.streams.iter().find(|s| s.stream == stream)
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's explanation.
        reason: String,
    },
    /// The backup does not verify: a missing, truncated or corrupted file, or a bad manifest.
    #[error("backup {dir} is corrupt: {file}: {reason}")]
    Corrupt {
        /// The backup directory.
        dir: PathBuf,
        /// The file that does not verify.
        file: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server refused or did not answer.
    #[error("stream {stream}: {reason}")]
    Server {
        /// The stream.
        stream: String,
        /// The server's or client's explanation.
        reason: String,
    },
    /// No backup to restore.
    #[error("{0}")]
    NoBackup(String),
    /// The backup is older than what the server holds: restoring it would roll streams back.
    #[error("restoring would roll back {}: refused (restore with --allow-rollback to accept the loss)", .0.join(", "))]
    Rollback(Vec<String>),
}

fn io_err(path: &Path, err: impl std::fmt::Display) -> BackupError {
    BackupError::Io {
        path: path.to_owned(),
        reason: err.to_string(),
    }
}

fn server_err(stream: &str, err: impl std::fmt::Display) -> BackupError {
    BackupError::Server {
        stream: stream.to_owned(),
        reason: err.to_string(),
    }
}

/// True for the streams bulwark owns: `BULWARK_*` and the KV buckets `KV_bulwark_*`.
pub fn is_bulwark_stream(name: &str) -> bool {
    name.starts_with("BULWARK_") || name.starts_with("KV_bulwark_")
}

/// The names of bulwark's streams on the server, sorted.
pub async fn bulwark_streams(js: &jetstream::Context) -> Result<Vec<String>, BackupError> {
    let mut names = Vec::new();
    let mut list = js.stream_names();
    while let Some(name) = list.next().await {
        let name = name.map_err(|e| server_err("*", e))?;
        if is_bulwark_stream(&name) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (hex) and size of a file.
pub fn file_digest(path: &Path) -> Result<(String, u64), BackupError> {
    let mut file = fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| io_err(path, e))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex(&hasher.finalize()), size))
}

/// A JetStream API reply: the error object when the server refused.
fn api_error(reply: &Value) -> Option<String> {
    reply.get("error").map(|e| {
        let code = e.get("err_code").and_then(Value::as_u64).unwrap_or(0);
        let desc = e
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        format!("{desc} (err_code {code})")
    })
}

async fn api_request(
    client: &async_nats::Client,
    subject: String,
    body: Bytes,
    stream: &str,
) -> Result<Value, BackupError> {
    let request = async_nats::Request::new()
        .payload(body)
        .timeout(Some(CHUNK_TIMEOUT));
    let reply = client
        .send_request(subject.clone(), request)
        .await
        .map_err(|e| server_err(stream, format!("{subject}: {e}")))?;
    let value: Value = serde_json::from_slice(&reply.payload)
        .map_err(|e| server_err(stream, format!("{subject}: reply is not JSON: {e}")))?;
    if let Some(err) = api_error(&value) {
        return Err(server_err(stream, err));
    }
    Ok(value)
}

/// Takes the snapshot of `stream` into `path`; returns its manifest entry.
pub async fn snapshot_stream(
    client: &async_nats::Client,
    stream: &str,
    path: &Path,
) -> Result<StreamEntry, BackupError> {
    let inbox = client.new_inbox();
    let mut chunks = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| server_err(stream, e))?;
    let body = json!({"deliver_subject": inbox, "chunk_size": CHUNK_SIZE});
    let reply = api_request(
        client,
        format!("$JS.API.STREAM.SNAPSHOT.{stream}"),
        Bytes::from(body.to_string()),
        stream,
    )
    .await?;
    let mut file = fs::File::create(path).map_err(|e| io_err(path, e))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    loop {
        let msg = match tokio::time::timeout(CHUNK_TIMEOUT, chunks.next()).await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Err(server_err(stream, "snapshot subscription closed")),
            Err(_) => {
                return Err(server_err(
                    stream,
                    format!("no snapshot chunk within {CHUNK_TIMEOUT:?}"),
                ));
            }
        };
        if let Some(status) = msg.status
            && status.as_u16() >= 400
        {
            return Err(server_err(
                stream,
                format!(
                    "snapshot failed: {} {}",
                    status.as_u16(),
                    msg.description.unwrap_or_default()
                ),
            ));
        }
        if msg.payload.is_empty() {
            break;
        }
        file.write_all(&msg.payload).map_err(|e| io_err(path, e))?;
        hasher.update(&msg.payload);
        size += msg.payload.len() as u64;
        if let Some(ack) = msg.reply {
            client
                .publish(ack, Bytes::new())
                .await
                .map_err(|e| server_err(stream, e))?;
        }
    }
    file.sync_all().map_err(|e| io_err(path, e))?;
    let state = reply.get("state").cloned().unwrap_or(Value::Null);
    let num = |key: &str| state.get(key).and_then(Value::as_u64).unwrap_or(0);
    Ok(StreamEntry {
        stream: stream.to_owned(),
        file: path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes: size,
        sha256: hex(&hasher.finalize()),
        messages: num("messages"),
        first_seq: num("first_seq"),
        last_seq: num("last_seq"),
        config: reply.get("config").cloned().unwrap_or(Value::Null),
        state,
    })
}

/// Backs up every bulwark stream and bucket into a new directory under `root`; returns it
/// with its manifest.
pub async fn backup(
    client: &async_nats::Client,
    root: &Path,
) -> Result<(PathBuf, Manifest), BackupError> {
    let js = jetstream::new(client.clone());
    let mut streams = bulwark_streams(&js).await?;
    // Each stream is snapshotted on its own, so a backup of a running system is consistent per
    // stream, not across them. The audit head goes first: it may then lag the audit stream
    // (clarity catches up) but never point past it (which clarity would report as truncation).
    let head = format!("KV_{}", crate::streams::AUDIT_HEAD_BUCKET);
    streams.sort_by_key(|s| *s != head);
    if streams.is_empty() {
        return Err(BackupError::NoBackup(
            "the server holds no bulwark streams to back up".into(),
        ));
    }
    fs::create_dir_all(root).map_err(|e| io_err(root, e))?;
    let now = jiff::Timestamp::now();
    let name = now.strftime("%Y%m%dT%H%M%S%.3fZ").to_string();
    let partial = root.join(format!("{name}.partial"));
    fs::create_dir_all(&partial).map_err(|e| io_err(&partial, e))?;
    let mut entries = Vec::new();
    for stream in &streams {
        let path = partial.join(format!("{stream}.snap"));
        entries.push(snapshot_stream(client, stream, &path).await?);
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        created_at: crate::time::format(now),
        streams: entries,
    };
    let manifest_path = partial.join(MANIFEST_FILE);
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| io_err(&manifest_path, e))?;
    fs::write(&manifest_path, text).map_err(|e| io_err(&manifest_path, e))?;
    let done = root.join(&name);
    fs::rename(&partial, &done).map_err(|e| io_err(&done, e))?;
    Ok((done, manifest))
}

/// Verifies the backup in `dir`: a readable manifest of the known format, and every file present
/// with the recorded size and SHA-256. The error names the first file that does not verify.
pub fn verify(dir: &Path) -> Result<Manifest, BackupError> {
    let corrupt = |file: &str, reason: String| BackupError::Corrupt {
        dir: dir.to_owned(),
        file: file.to_owned(),
        reason,
    };
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = fs::read(&manifest_path)
        .map_err(|e| corrupt(MANIFEST_FILE, format!("cannot read: {e}")))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| corrupt(MANIFEST_FILE, format!("not a valid manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(corrupt(
            MANIFEST_FILE,
            format!("format {:?}, expected {FORMAT:?}", manifest.format),
        ));
    }
    for entry in &manifest.streams {
        if entry.file.contains('/') || entry.file.contains("..") || entry.file.is_empty() {
            return Err(corrupt(&entry.file, "file name outside the backup".into()));
        }
        let path = dir.join(&entry.file);
        let (sha, size) = match file_digest(&path) {
            Ok(d) => d,
            Err(e) => return Err(corrupt(&entry.file, format!("cannot read: {e}"))),
        };
        if size != entry.bytes {
            return Err(corrupt(
                &entry.file,
                format!(
                    "truncated or extended: {size} bytes, the manifest says {}",
                    entry.bytes
                ),
            ));
        }
        if sha != entry.sha256 {
            return Err(corrupt(
                &entry.file,
                format!(
                    "SHA-256 {sha} does not match the manifest's {}",
                    entry.sha256
                ),
            ));
        }
    }
    Ok(manifest)
}

/// The complete backup directories under `root` (those with a manifest name, not `.partial`),
/// newest first.
pub fn list(root: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let mut dirs = Vec::new();
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(dirs),
        Err(e) => return Err(io_err(root, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err(root, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() && !name.ends_with(".partial") && !name.starts_with('.') {
            dirs.push(path);
        }
    }
    dirs.sort();
    dirs.reverse();
    Ok(dirs)
}

/// The newest backup under `root` that verifies, with the newer ones skipped and why.
pub fn latest_good(root: &Path) -> Result<(PathBuf, Manifest, Vec<BackupError>), BackupError> {
    let mut skipped = Vec::new();
    for dir in list(root)? {
        match verify(&dir) {
            Ok(manifest) => return Ok((dir, manifest, skipped)),
            Err(err) => skipped.push(err),
        }
    }
    let mut why = format!("no backup under {} verifies", root.display());
    for err in &skipped {
        why.push_str(&format!("; {err}"));
    }
    if skipped.is_empty() {
        why = format!("no backup under {}", root.display());
    }
    Err(BackupError::NoBackup(why))
}

/// What a restore did for one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Restored {
    /// The stream.
    pub stream: String,
    /// Messages after the restore.
    pub messages: u64,
    /// Last sequence after the restore.
    pub last_seq: u64,
    /// True when an existing stream was deleted first.
    pub replaced: bool,
    /// Messages the manifest recorded. The server reports the state with the snapshot; a
    /// stream that changed while it was taken (a running system) may differ from it slightly.
    /// The files' integrity is what the SHA-256 checks.
    pub manifest_messages: u64,
    /// Last sequence the manifest recorded (same caveat).
    pub manifest_last_seq: u64,
}

/// Restores the backup in `dir` (verified first; nothing is touched when it does not verify).
/// An existing stream is refused unless `replace`, which deletes it first; a rollback (an
/// existing stream further on than the backup) is refused: see [`restore_with`].
pub async fn restore(
    client: &async_nats::Client,
    dir: &Path,
    replace: bool,
) -> Result<Vec<Restored>, BackupError> {
    Ok(restore_with(client, dir, replace, false).await?.streams)
}

/// What a restore did.
#[derive(Debug)]
pub struct RestoreOutcome {
    /// Each stream restored.
    pub streams: Vec<Restored>,
    /// The streams that went back (`<stream> from sequence <a> to <b>`), when a rollback was
    /// accepted.
    pub regressions: Vec<String>,
    /// What reconciling the intent records did, when a rollback of them was accepted.
    pub reconciliation: Option<crate::rollback::Reconciliation>,
}

/// [`restore`], and with `allow_rollback` a backup older than the server's streams replaces
/// them. Without it, when any existing stream's last sequence is beyond the backup's, nothing
/// is touched and [`BackupError::Rollback`] names each such stream with both sequences
/// (the rollback is detected by sequence regression). An accepted rollback of the intent
/// records is reconciled ([`crate::rollback`]): they are read before and carried forward after,
/// so no intent runs twice and none acknowledged is lost.
pub async fn restore_with(
    client: &async_nats::Client,
    dir: &Path,
    replace: bool,
    allow_rollback: bool,
) -> Result<RestoreOutcome, BackupError> {
    let manifest = verify(dir)?;
    let js = jetstream::new(client.clone());
    let existing = bulwark_streams(&js).await?;
    if !replace
        && let Some(clash) = manifest
            .streams
            .iter()
            .find(|e| existing.contains(&e.stream))
    {
        return Err(server_err(
            &clash.stream,
            "exists on the server; restore with --replace to overwrite it",
        ));
    }
    let mut regressions = Vec::new();
    for entry in manifest
        .streams
        .iter()
        .filter(|e| existing.contains(&e.stream))
    {
        let mut stream = js
            .get_stream(&entry.stream)
            .await
            .map_err(|e| server_err(&entry.stream, e))?;
        let last = stream
            .info()
            .await
            .map_err(|e| server_err(&entry.stream, e))?
            .state
            .last_sequence;
        if last > entry.last_seq {
            regressions.push(format!(
                "{} from sequence {last} to {}",
                entry.stream, entry.last_seq
            ));
        }
    }
    if !regressions.is_empty() && !allow_rollback {
        return Err(BackupError::Rollback(regressions));
    }
    let intents_stream = format!("KV_{}", crate::streams::INTENTS_BUCKET);
    let ledger = if !regressions.is_empty()
        && existing.contains(&intents_stream)
        && manifest.stream(&intents_stream).is_some()
    {
        Some(crate::rollback::read_ledger(&js).await?)
    } else {
        None
    };
    let mut done = Vec::new();
    for entry in &manifest.streams {
        let replaced = existing.contains(&entry.stream);
        if replaced {
            js.delete_stream(&entry.stream)
                .await
                .map_err(|e| server_err(&entry.stream, format!("cannot delete: {e}")))?;
        }
        let (messages, last_seq) = restore_stream(client, dir, entry).await?;
        done.push(Restored {
            stream: entry.stream.clone(),
            messages,
            last_seq,
            replaced,
            manifest_messages: entry.messages,
            manifest_last_seq: entry.last_seq,
        });
    }
    let reconciliation = match ledger {
        Some(ledger) => Some(crate::rollback::reconcile(&js, ledger).await?),
        None => None,
    };
    Ok(RestoreOutcome {
        streams: done,
        regressions,
        reconciliation,
    })
}

async fn restore_stream(
    client: &async_nats::Client,
    dir: &Path,
    entry: &StreamEntry,
) -> Result<(u64, u64), BackupError> {
    let stream = &entry.stream;
    let path = dir.join(&entry.file);
    let data = fs::read(&path).map_err(|e| io_err(&path, e))?;
    let body = json!({"config": entry.config, "state": entry.state});
    let reply = api_request(
        client,
        format!("$JS.API.STREAM.RESTORE.{stream}"),
        Bytes::from(body.to_string()),
        stream,
    )
    .await?;
    let deliver = reply
        .get("deliver_subject")
        .and_then(Value::as_str)
        .ok_or_else(|| server_err(stream, "restore reply has no deliver_subject"))?
        .to_owned();
    for chunk in data.chunks(CHUNK_SIZE) {
        let request = async_nats::Request::new()
            .payload(Bytes::copy_from_slice(chunk))
            .timeout(Some(CHUNK_TIMEOUT));
        let ack = client
            .send_request(deliver.clone(), request)
            .await
            .map_err(|e| server_err(stream, format!("restore chunk: {e}")))?;
        if !ack.payload.is_empty()
            && let Ok(value) = serde_json::from_slice::<Value>(&ack.payload)
            && let Some(err) = api_error(&value)
        {
            return Err(server_err(stream, format!("restore refused: {err}")));
        }
    }
    let info = api_request(client, deliver, Bytes::new(), stream).await?;
    let state = info.get("state").cloned().unwrap_or(Value::Null);
    let num = |key: &str| state.get(key).and_then(Value::as_u64).unwrap_or(0);
    Ok((num("messages"), num("last_seq")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulwark_streams_are_recognised() {
        assert!(is_bulwark_stream("BULWARK_AUDIT"));
        assert!(is_bulwark_stream("KV_bulwark_intents"));
        assert!(!is_bulwark_stream("KV_other"));
        assert!(!is_bulwark_stream("ORDERS"));
    }

    #[test]
    fn hex_is_lowercase_two_digits() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
    }
}

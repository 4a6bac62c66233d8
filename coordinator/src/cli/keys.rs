//! `cairn keys`: the coordinator's master key and the repository's key
//! slots. A recovery key is generated here, on the operator's machine, and
//! written to its file before the coordinator adds its slot, so a slot
//! never exists without its key having reached a file.

use std::path::Path;

use anyhow::Context;
use cairn_common::config::write_new_file_atomic;
use cairn_common::crypto::SecretKey;
use cairn_common::model::time_from_unix_ms;
use cairn_common::proto;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tonic::transport::Channel;

use super::client::explain;
use super::output::{print_json, table};

type Client = proto::admin_client::AdminClient<Channel>;

/// A key slot as `keys list` shows it: ids, never keys.
#[derive(Debug, Serialize)]
pub struct KeySlotView {
    pub id: String,
    pub purpose: String,
    pub created_at: Option<DateTime<Utc>>,
    /// The coordinator's own master key: `keys remove` refuses it.
    pub in_use: bool,
}

impl From<proto::KeySlot> for KeySlotView {
    fn from(slot: proto::KeySlot) -> Self {
        KeySlotView {
            id: slot.id,
            purpose: slot.purpose,
            created_at: time_from_unix_ms(slot.created_at_unix_ms),
            in_use: slot.in_use,
        }
    }
}

pub async fn rotate(client: &mut Client, json: bool) -> anyhow::Result<i32> {
    let response = client
        .rotate_master_key(proto::RotateMasterKeyRequest {})
        .await
        .map_err(explain)?
        .into_inner();
    let resolved = (!response.resolved.is_empty()).then_some(response.resolved);
    if json {
        print_json(&serde_json::json!({
            "old_key_id": response.old_key_id,
            "new_key_id": response.new_key_id,
            "resolved": resolved,
        }))?;
    } else {
        if let Some(resolved) = &resolved {
            println!("First {resolved}.");
        }
        println!(
            "Rotated the master key: slot {} -> slot {}. The repository keys are wrapped anew; no data was rewritten. Back up the new master key file, or keep a recovery key (cairn keys add).",
            response.old_key_id, response.new_key_id
        );
    }
    Ok(0)
}

pub async fn list(client: &mut Client, json: bool) -> anyhow::Result<i32> {
    let response = client
        .list_key_slots(proto::ListKeySlotsRequest {})
        .await
        .map_err(explain)?
        .into_inner();
    let views: Vec<KeySlotView> = response.slots.into_iter().map(Into::into).collect();
    if json {
        print_json(&views)?;
        return Ok(0);
    }
    let mut rows = table(&["SLOT", "PURPOSE", "CREATED", "IN USE"]);
    for view in &views {
        rows.add_row(vec![
            view.id.clone(),
            view.purpose.clone(),
            view.created_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_else(|| "-".into()),
            if view.in_use {
                "yes (the coordinator's master key)".into()
            } else {
                "no".into()
            },
        ]);
    }
    println!("{rows}");
    if views.len() == 1 {
        println!(
            "Only one key opens this repository: if it is lost, every backup is lost. Keep a recovery key: cairn keys add --out FILE"
        );
    }
    Ok(0)
}

pub async fn add(client: &mut Client, out: &Path, json: bool) -> anyhow::Result<i32> {
    let key = SecretKey::generate()?;
    write_new_file_atomic(out, format!("{}\n", key.expose_hex()).as_bytes(), 0o600)
        .map_err(|e| anyhow::anyhow!("--out: {e}"))?;
    let answer = client
        .add_key_slot(proto::AddKeySlotRequest {
            key: key.expose_bytes().to_vec(),
        })
        .await;
    let slot = match answer {
        Ok(response) => response.into_inner().slot.unwrap_or_default(),
        Err(status) => {
            // No slot, no key file: a file must never pass for a recovery
            // key that opens nothing.
            let _ = std::fs::remove_file(out);
            return Err(explain(status).context(format!(
                "no recovery key was added and {} was removed (should cairn keys list show slot {} anyway, remove it: cairn keys remove {})",
                out.display(),
                key.key_id(),
                key.key_id()
            )));
        }
    };
    if json {
        print_json(&serde_json::json!({
            "id": slot.id,
            "purpose": slot.purpose,
            "file": out,
        }))?;
    } else {
        println!(
            "Added recovery key slot {}; the key is in {} (mode 0600).",
            slot.id,
            out.display()
        );
        println!(
            "Move it off the coordinator host and keep it safe: with it and the repository, anyone can read every backup; without any key, no one can."
        );
    }
    Ok(0)
}

pub async fn remove(client: &mut Client, id: String, json: bool) -> anyhow::Result<i32> {
    client
        .remove_key_slot(proto::RemoveKeySlotRequest { id: id.clone() })
        .await
        .map_err(explain)?;
    if json {
        print_json(&serde_json::json!({ "removed": id }))?;
    } else {
        println!("Removed key slot {id}: its key no longer opens the repository.");
    }
    Ok(0)
}

/// Reads a key file given on the command line (`--master-key`), which must
/// be readable by its owner only, like the master key file.
pub fn read_key_file(path: &Path) -> anyhow::Result<SecretKey> {
    cairn_coordinator::config::check_secret_file(path)
        .map_err(|e| anyhow::anyhow!("--master-key: {e}"))?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--master-key: cannot read {}", path.display()))?;
    SecretKey::from_hex(&text).map_err(|_| {
        anyhow::anyhow!(
            "--master-key: {} must hold 64 hex digits (a file as cairn init or cairn keys add writes it)",
            path.display()
        )
    })
}

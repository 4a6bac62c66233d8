//! The chunk format: content-defined chunks of a dump stream, each named by a
//! keyed hash of its plaintext, compressed with zstd and sealed.
//!
//! A sealed chunk is `FORMAT_VERSION (1 byte) || COMPRESSION (1 byte) ||
//! seal(data key, Chunk, chunk id, compressed bytes)`; the two header bytes
//! are authenticated too (they are part of the associated binding).
//! Opening checks the seal, decompresses, and recomputes the keyed hash: a
//! chunk whose bytes do not hash to its name is refused, whatever its seal.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::crypto::{Domain, RepositoryKeys, SealError, open, seal};

/// FastCDC sizes. 2 MiB on average keeps per-chunk overhead (a request, a
/// catalog row) small while a change to one table still rewrites only a few
/// chunks; the benchmark justifies the choice.
pub const CHUNK_MIN_BYTES: usize = 512 * 1024;
pub const CHUNK_AVG_BYTES: usize = 2 * 1024 * 1024;
pub const CHUNK_MAX_BYTES: usize = 8 * 1024 * 1024;

/// The largest gRPC message that carries one sealed chunk: a chunk of
/// [`CHUNK_MAX_BYTES`] that does not compress, its seal, and room for the
/// message around it. Both ends of `UploadBackup` and `DownloadBackup` set
/// it (tonic's default of 4 MiB would refuse incompressible chunks).
pub const MAX_CHUNK_MESSAGE_BYTES: usize = CHUNK_MAX_BYTES + 1024 * 1024;

const FORMAT_VERSION: u8 = 1;

/// How a chunk's payload was compressed before sealing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

/// A chunk's name: BLAKE3 keyed with the repository's chunk-id key, over
/// the plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    pub fn of(keys: &RepositoryKeys, plaintext: &[u8]) -> ChunkId {
        ChunkId(keys.chunk_id.keyed_hash(plaintext))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<ChunkId, Error> {
        let id: [u8; 32] = bytes
            .try_into()
            .map_err(|_| Error::protocol("chunk_id", "must be 32 bytes"))?;
        Ok(ChunkId(id))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Result<ChunkId, Error> {
        let bytes = hex::decode(text).map_err(|_| Error::invalid("chunk id", "not hex"))?;
        ChunkId::from_bytes(&bytes)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        ChunkId::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

/// A chunk ready to store.
#[derive(Debug, Clone)]
pub struct SealedChunk {
    pub id: ChunkId,
    pub plaintext_len: usize,
    pub bytes: Vec<u8>,
}

fn binding(id: &ChunkId, compression: Compression) -> Vec<u8> {
    let mut binding = vec![FORMAT_VERSION, compression as u8];
    binding.extend_from_slice(id.as_bytes());
    binding
}

/// Names, compresses (zstd at `zstd_level`; 0 means no compression) and
/// seals one chunk.
pub fn seal_chunk(
    keys: &RepositoryKeys,
    plaintext: &[u8],
    zstd_level: i32,
) -> Result<SealedChunk, Error> {
    let id = ChunkId::of(keys, plaintext);
    let (compression, payload) = if zstd_level == 0 {
        (Compression::None, plaintext.to_vec())
    } else {
        let compressed = zstd::bulk::compress(plaintext, zstd_level)
            .map_err(|e| Error::io("zstd compression", e))?;
        // Incompressible data is stored as it is.
        if compressed.len() >= plaintext.len() {
            (Compression::None, plaintext.to_vec())
        } else {
            (Compression::Zstd, compressed)
        }
    };
    let sealed = seal(
        &keys.data,
        Domain::Chunk,
        &binding(&id, compression),
        &payload,
    )?;
    let mut bytes = Vec::with_capacity(2 + sealed.len());
    bytes.push(FORMAT_VERSION);
    bytes.push(compression as u8);
    bytes.extend_from_slice(&sealed);
    Ok(SealedChunk {
        id,
        plaintext_len: plaintext.len(),
        bytes,
    })
}

/// Why a stored chunk was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {id}: unknown format")]
    Format { id: ChunkId },
    #[error("chunk {id}: {source}")]
    Seal { id: ChunkId, source: SealError },
    #[error("chunk {id}: cannot decompress: {reason}")]
    Decompress { id: ChunkId, reason: String },
    #[error("chunk {id}: its content does not hash to its name")]
    HashMismatch { id: ChunkId },
}

/// Opens a stored chunk and checks that it is what its name says.
pub fn open_chunk(
    keys: &RepositoryKeys,
    id: &ChunkId,
    bytes: &[u8],
) -> Result<Vec<u8>, ChunkError> {
    let [version, compression, sealed @ ..] = bytes else {
        return Err(ChunkError::Format { id: *id });
    };
    let compression = match (*version, *compression) {
        (FORMAT_VERSION, 0) => Compression::None,
        (FORMAT_VERSION, 1) => Compression::Zstd,
        _ => return Err(ChunkError::Format { id: *id }),
    };
    let payload = open(&keys.data, Domain::Chunk, &binding(id, compression), sealed)
        .map_err(|source| ChunkError::Seal { id: *id, source })?;
    let plaintext = match compression {
        Compression::None => payload,
        Compression::Zstd => {
            // The frame records its size: allocate that, not the largest a
            // chunk may be (8 MiB for every 2 MiB chunk adds up when a few
            // are in flight). A size above the limit fails below.
            let capacity = match zstd::zstd_safe::get_frame_content_size(&payload) {
                Ok(Some(size)) => usize::try_from(size)
                    .unwrap_or(CHUNK_MAX_BYTES)
                    .min(CHUNK_MAX_BYTES),
                _ => CHUNK_MAX_BYTES,
            };
            zstd::bulk::decompress(&payload, capacity).map_err(|e| ChunkError::Decompress {
                id: *id,
                reason: e.to_string(),
            })?
        }
    };
    if ChunkId::of(keys, &plaintext) != *id {
        return Err(ChunkError::HashMismatch { id: *id });
    }
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> RepositoryKeys {
        RepositoryKeys::generate().unwrap()
    }

    #[test]
    fn an_opened_chunk_holds_only_its_own_size() {
        let keys = keys();
        let plaintext = b"row,row,row your boat ".repeat(50_000);
        let sealed = seal_chunk(&keys, &plaintext, 1).unwrap();
        let opened = open_chunk(&keys, &sealed.id, &sealed.bytes).unwrap();
        assert_eq!(opened, plaintext);
        assert!(
            opened.capacity() < 2 * plaintext.len(),
            "{}",
            opened.capacity()
        );
    }

    #[test]
    fn the_largest_incompressible_chunk_fits_in_one_message() {
        let keys = keys();
        let random = crate::pki::random_bytes(CHUNK_MAX_BYTES).unwrap();
        let sealed = seal_chunk(&keys, &random, 1).unwrap();
        // Above tonic's 4 MiB default, inside our limit with room for the
        // message's other fields.
        assert!(sealed.bytes.len() > 4 * 1024 * 1024);
        assert!(sealed.bytes.len() + 1024 < MAX_CHUNK_MESSAGE_BYTES);
    }

    #[test]
    fn chunks_round_trip_compressed_or_not() {
        let keys = keys();
        let compressible = b"row,row,row your boat ".repeat(10_000);
        let random = crate::pki::random_bytes(100_000).unwrap();
        for (data, level) in [
            (&compressible[..], 1),
            (&compressible[..], 0),
            (&random[..], 3),
        ] {
            let sealed = seal_chunk(&keys, data, level).unwrap();
            assert_eq!(sealed.plaintext_len, data.len());
            assert_eq!(open_chunk(&keys, &sealed.id, &sealed.bytes).unwrap(), data);
        }
        let sealed = seal_chunk(&keys, &compressible, 1).unwrap();
        assert!(sealed.bytes.len() < compressible.len() / 10);
    }

    #[test]
    fn ids_are_keyed_and_deterministic() {
        let (a, b) = (keys(), keys());
        assert_eq!(ChunkId::of(&a, b"x"), ChunkId::of(&a, b"x"));
        assert_ne!(ChunkId::of(&a, b"x"), ChunkId::of(&b, b"x"));
        assert_ne!(ChunkId::of(&a, b"x"), ChunkId::of(&a, b"y"));
        let id = ChunkId::of(&a, b"x");
        assert_eq!(ChunkId::from_hex(&id.to_hex()).unwrap(), id);
    }

    #[test]
    fn altered_or_misnamed_chunks_are_refused() {
        let keys = keys();
        let sealed = seal_chunk(&keys, &b"payload ".repeat(1000), 1).unwrap();
        let other = seal_chunk(&keys, b"other", 1).unwrap();
        for position in [0, 1, 2, sealed.bytes.len() / 2, sealed.bytes.len() - 1] {
            let mut altered = sealed.bytes.clone();
            altered[position] ^= 0x40;
            assert!(
                open_chunk(&keys, &sealed.id, &altered).is_err(),
                "byte {position}"
            );
        }
        // The right bytes under another chunk's name.
        assert!(matches!(
            open_chunk(&keys, &other.id, &sealed.bytes),
            Err(ChunkError::Seal { .. })
        ));
        assert!(open_chunk(&keys, &sealed.id, &[]).is_err());
        let stranger = RepositoryKeys::generate().unwrap();
        assert!(open_chunk(&stranger, &sealed.id, &sealed.bytes).is_err());
    }
}

//! The chunk format: content-defined chunks of a dump stream.
//!
//! Agents hold no repository key. An agent names each chunk by its
//! [`ContentHash`] (an unkeyed BLAKE3 of the plaintext) and packs it
//! ([`pack_chunk`]: zstd, or as it is when it does not compress). The
//! coordinator unpacks what it receives ([`unpack_chunk`]: decompress,
//! check the length and the hash), seals the packed bytes with the
//! repository data key ([`seal_packed`]) and stores them under a keyed
//! name, [`ChunkId::for_content`], so that the storage reveals nothing
//! about what a chunk holds. A restore goes the other way: the coordinator
//! authenticates the object ([`open_sealed`]) and sends the packed bytes;
//! the agent unpacks them against the hash the manifest lists.
//!
//! A sealed chunk is `FORMAT (1 byte) || COMPRESSION (1 byte) ||
//! seal(data key, Chunk, FORMAT || COMPRESSION || chunk id, packed bytes)`.
//! Format 2 is named by the keyed hash of the content hash; format 1
//! (written before agents gave up the keys) by the keyed hash of the
//! plaintext itself. Both open; only format 2 is written.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::crypto::{Domain, NONCE_BYTES, RepositoryKeys, SealError, TAG_BYTES, open, seal};
use crate::proto;

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

/// Chunks named by the keyed hash of their plaintext (no longer written).
const FORMAT_V1: u8 = 1;
/// Chunks named by the keyed hash of their [`ContentHash`].
const FORMAT_V2: u8 = 2;

/// Domain separation for [`ChunkId::for_content`], so a format-2 name can
/// never equal a format-1 name of some 32-byte plaintext.
const NAME_V2_LABEL: &[u8] = b"cairn chunk name v2\0";

/// How a chunk's payload was compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

impl Compression {
    pub fn from_byte(byte: u8) -> Option<Compression> {
        match byte {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// The wire value (`ChunkCompression`).
    pub fn to_proto(self) -> i32 {
        match self {
            Compression::None => proto::ChunkCompression::None as i32,
            Compression::Zstd => proto::ChunkCompression::Zstd as i32,
        }
    }

    /// From the wire; an unknown value is a protocol error naming `field`.
    pub fn from_proto(value: i32, field: &'static str) -> Result<Compression, Error> {
        match proto::ChunkCompression::try_from(value) {
            Ok(proto::ChunkCompression::None) => Ok(Compression::None),
            Ok(proto::ChunkCompression::Zstd) => Ok(Compression::Zstd),
            Err(_) => Err(Error::protocol(
                field,
                format!("unknown compression {value}"),
            )),
        }
    }
}

/// A 32-byte hash newtype: bytes, hex (its `Display` and serde form) and a
/// short `Debug`. `$field` and `$what` name it in errors.
macro_rules! hash_newtype {
    ($name:ident, $field:literal, $what:literal) => {
        impl $name {
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            pub fn from_bytes(bytes: &[u8]) -> Result<$name, Error> {
                let hash: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| Error::protocol($field, "must be 32 bytes"))?;
                Ok($name(hash))
            }

            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            pub fn from_hex(text: &str) -> Result<$name, Error> {
                let bytes = hex::decode(text).map_err(|_| Error::invalid($what, "not hex"))?;
                $name::from_bytes(&bytes)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.to_hex()[..16])
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                $name::from_hex(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// An unkeyed BLAKE3 hash of a chunk's plaintext: how agents name chunks
/// (they hold no key) and how a manifest lists them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash([u8; 32]);

hash_newtype!(ContentHash, "hash", "content hash");

impl ContentHash {
    pub fn of(plaintext: &[u8]) -> ContentHash {
        ContentHash(*blake3::hash(plaintext).as_bytes())
    }
}

/// A stored chunk's name: BLAKE3 keyed with the repository's chunk-id key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId([u8; 32]);

hash_newtype!(ChunkId, "chunk_id", "chunk id");

impl ChunkId {
    /// The name of a format-2 chunk whose plaintext hashes to `hash`.
    pub fn for_content(keys: &RepositoryKeys, hash: &ContentHash) -> ChunkId {
        let mut input = Vec::with_capacity(NAME_V2_LABEL.len() + 32);
        input.extend_from_slice(NAME_V2_LABEL);
        input.extend_from_slice(hash.as_bytes());
        ChunkId(keys.chunk_id.keyed_hash(&input))
    }

    /// The name a format-1 chunk had: the keyed hash of the plaintext.
    pub fn legacy_of(keys: &RepositoryKeys, plaintext: &[u8]) -> ChunkId {
        ChunkId(keys.chunk_id.keyed_hash(plaintext))
    }
}

/// A chunk as an agent sends it: named by its content, compressed, not
/// sealed.
#[derive(Debug, Clone)]
pub struct PackedChunk {
    pub hash: ContentHash,
    pub plaintext_len: usize,
    pub compression: Compression,
    pub payload: Vec<u8>,
}

/// Names and compresses one chunk (zstd at `zstd_level`; 0 means no
/// compression, and data that does not shrink is kept as it is).
pub fn pack_chunk(plaintext: &[u8], zstd_level: i32) -> Result<PackedChunk, Error> {
    let hash = ContentHash::of(plaintext);
    let (compression, payload) = if zstd_level == 0 {
        (Compression::None, plaintext.to_vec())
    } else {
        let compressed = zstd::bulk::compress(plaintext, zstd_level)
            .map_err(|e| Error::io("zstd compression", e))?;
        if compressed.len() >= plaintext.len() {
            (Compression::None, plaintext.to_vec())
        } else {
            (Compression::Zstd, compressed)
        }
    };
    Ok(PackedChunk {
        hash,
        plaintext_len: plaintext.len(),
        compression,
        payload,
    })
}

/// Why packed bytes are not the chunk they claim to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnpackError {
    #[error("plaintext_bytes {announced} is above the largest chunk ({limit} bytes)")]
    TooLarge { announced: u64, limit: usize },
    #[error("cannot be decompressed: {0}")]
    Decompress(String),
    #[error("holds {actual} bytes, but {expected} were announced")]
    Length { expected: u64, actual: u64 },
    #[error("does not hash to its name: its content is not what was announced")]
    HashMismatch,
}

/// The first bytes of a zstd frame (skippable frames have others).
const ZSTD_FRAME_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// A packed payload must be exactly one zstd frame that records its
/// content size, as [`pack_chunk`] makes them: several frames, skippable
/// frames or trailing bytes would be accepted by a decoder here and
/// refused by another reader later, and they are sealed as sent.
fn check_single_frame(payload: &[u8], announced: u64) -> Result<(), UnpackError> {
    if !payload.starts_with(&ZSTD_FRAME_MAGIC) {
        return Err(UnpackError::Decompress("not a zstd frame".into()));
    }
    match zstd::zstd_safe::find_frame_compressed_size(payload) {
        Ok(size) if size == payload.len() => {}
        _ => {
            return Err(UnpackError::Decompress(
                "must be exactly one zstd frame".into(),
            ));
        }
    }
    match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(size)) if size == announced => Ok(()),
        Ok(Some(size)) => Err(UnpackError::Length {
            expected: announced,
            actual: size,
        }),
        _ => Err(UnpackError::Decompress(
            "the zstd frame does not record its content size".into(),
        )),
    }
}

/// Unpacks `payload` and checks that it is `plaintext_len` bytes hashing
/// to `hash`. Never allocates more than the announced length (at most
/// `limit`), so a payload that inflates beyond it fails without memory to
/// match.
pub fn unpack_chunk(
    hash: &ContentHash,
    plaintext_len: u64,
    compression: Compression,
    payload: &[u8],
    limit: usize,
) -> Result<Vec<u8>, UnpackError> {
    let announced = match usize::try_from(plaintext_len) {
        Ok(announced) if announced <= limit => announced,
        _ => {
            return Err(UnpackError::TooLarge {
                announced: plaintext_len,
                limit,
            });
        }
    };
    let plaintext = match compression {
        Compression::None => payload.to_vec(),
        Compression::Zstd => {
            check_single_frame(payload, plaintext_len)?;
            zstd::bulk::decompress(payload, announced)
                .map_err(|e| UnpackError::Decompress(e.to_string()))?
        }
    };
    if plaintext.len() as u64 != plaintext_len {
        return Err(UnpackError::Length {
            expected: plaintext_len,
            actual: plaintext.len() as u64,
        });
    }
    if ContentHash::of(&plaintext) != *hash {
        return Err(UnpackError::HashMismatch);
    }
    Ok(plaintext)
}

/// A chunk ready to store.
#[derive(Debug, Clone)]
pub struct SealedChunk {
    pub id: ChunkId,
    pub bytes: Vec<u8>,
}

fn binding(format: u8, id: &ChunkId, compression: Compression) -> Vec<u8> {
    let mut binding = vec![format, compression as u8];
    binding.extend_from_slice(id.as_bytes());
    binding
}

fn seal_bytes(
    keys: &RepositoryKeys,
    format: u8,
    id: ChunkId,
    compression: Compression,
    payload: &[u8],
) -> Result<SealedChunk, Error> {
    let sealed = seal(
        &keys.data,
        Domain::Chunk,
        &binding(format, &id, compression),
        payload,
    )?;
    let mut bytes = Vec::with_capacity(2 + sealed.len());
    bytes.push(format);
    bytes.push(compression as u8);
    bytes.extend_from_slice(&sealed);
    Ok(SealedChunk { id, bytes })
}

/// The size of the stored object for `payload_len` packed bytes: the two
/// header bytes, the nonce, the ciphertext and the tag.
pub fn sealed_len(payload_len: usize) -> u64 {
    (2 + NONCE_BYTES + payload_len + TAG_BYTES) as u64
}

/// Seals a packed chunk under its keyed name. The caller has checked it
/// with [`unpack_chunk`]: sealing vouches for the content.
pub fn seal_packed(keys: &RepositoryKeys, packed: &PackedChunk) -> Result<SealedChunk, Error> {
    let id = ChunkId::for_content(keys, &packed.hash);
    seal_bytes(keys, FORMAT_V2, id, packed.compression, &packed.payload)
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

/// A stored chunk whose seal authenticated, still packed.
#[derive(Debug)]
pub struct UnsealedChunk {
    pub compression: Compression,
    pub payload: Vec<u8>,
    /// Format 1: named by the keyed hash of its plaintext, so its content
    /// hash is not known until it is unpacked.
    pub legacy: bool,
}

/// Authenticates a stored chunk under its name and returns its packed
/// bytes. The seal proves that the coordinator wrote them under `id`,
/// after checking them; it does not decompress.
pub fn open_sealed(
    keys: &RepositoryKeys,
    id: &ChunkId,
    bytes: &[u8],
) -> Result<UnsealedChunk, ChunkError> {
    let [format, compression, sealed @ ..] = bytes else {
        return Err(ChunkError::Format { id: *id });
    };
    let (Some(compression), FORMAT_V1 | FORMAT_V2) =
        (Compression::from_byte(*compression), *format)
    else {
        return Err(ChunkError::Format { id: *id });
    };
    let payload = open(
        &keys.data,
        Domain::Chunk,
        &binding(*format, id, compression),
        sealed,
    )
    .map_err(|source| ChunkError::Seal { id: *id, source })?;
    Ok(UnsealedChunk {
        compression,
        payload,
        legacy: *format == FORMAT_V1,
    })
}

impl UnsealedChunk {
    /// Decompresses a copy of the payload and checks that its content is
    /// what `id` names: the plaintext and its content hash.
    pub fn check(
        &self,
        keys: &RepositoryKeys,
        id: &ChunkId,
    ) -> Result<(Vec<u8>, ContentHash), ChunkError> {
        let plaintext = match self.compression {
            Compression::None => self.payload.clone(),
            Compression::Zstd => {
                // The frame records its size: allocate that (at most a
                // chunk's largest), not 8 MiB for every 2 MiB chunk.
                let capacity = match zstd::zstd_safe::get_frame_content_size(&self.payload) {
                    Ok(Some(size)) => usize::try_from(size)
                        .unwrap_or(CHUNK_MAX_BYTES)
                        .min(CHUNK_MAX_BYTES),
                    _ => CHUNK_MAX_BYTES,
                };
                zstd::bulk::decompress(&self.payload, capacity).map_err(|e| {
                    ChunkError::Decompress {
                        id: *id,
                        reason: e.to_string(),
                    }
                })?
            }
        };
        let hash = ContentHash::of(&plaintext);
        let named = if self.legacy {
            ChunkId::legacy_of(keys, &plaintext)
        } else {
            ChunkId::for_content(keys, &hash)
        };
        if named != *id {
            return Err(ChunkError::HashMismatch { id: *id });
        }
        Ok((plaintext, hash))
    }
}

/// Opens a stored chunk whole: authenticates it, decompresses it, and
/// checks that its content is what its name says. Returns the plaintext
/// and its content hash.
pub fn open_chunk(
    keys: &RepositoryKeys,
    id: &ChunkId,
    bytes: &[u8],
) -> Result<(Vec<u8>, ContentHash), ChunkError> {
    open_sealed(keys, id, bytes)?.check(keys, id)
}

/// Seals a chunk as format 1 did (the agent held the keys), for tests of
/// repositories written before format 2.
#[cfg(any(test, feature = "test-support"))]
pub fn seal_legacy_chunk(
    keys: &RepositoryKeys,
    plaintext: &[u8],
    zstd_level: i32,
) -> Result<SealedChunk, Error> {
    let packed = pack_chunk(plaintext, zstd_level)?;
    let id = ChunkId::legacy_of(keys, plaintext);
    seal_bytes(keys, FORMAT_V1, id, packed.compression, &packed.payload)
}

/// Packs and seals a chunk, as an agent and the coordinator do between
/// them (the coordinator checks it in between), for tests.
#[cfg(any(test, feature = "test-support"))]
pub fn seal_chunk(
    keys: &RepositoryKeys,
    plaintext: &[u8],
    zstd_level: i32,
) -> Result<(PackedChunk, SealedChunk), Error> {
    let packed = pack_chunk(plaintext, zstd_level)?;
    let sealed = seal_packed(keys, &packed)?;
    Ok((packed, sealed))
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
        let (_, sealed) = seal_chunk(&keys, &plaintext, 1).unwrap();
        let (opened, _) = open_chunk(&keys, &sealed.id, &sealed.bytes).unwrap();
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
        let (packed, sealed) = seal_chunk(&keys, &random, 1).unwrap();
        assert_eq!(packed.compression, Compression::None);
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
            let (packed, sealed) = seal_chunk(&keys, data, level).unwrap();
            assert_eq!(packed.plaintext_len, data.len());
            assert_eq!(packed.hash, ContentHash::of(data));
            assert_eq!(sealed.id, ChunkId::for_content(&keys, &packed.hash));
            assert_eq!(sealed.bytes.len() as u64, sealed_len(packed.payload.len()));
            let (opened, hash) = open_chunk(&keys, &sealed.id, &sealed.bytes).unwrap();
            assert_eq!(opened, data);
            assert_eq!(hash, packed.hash);
            let unpacked = unpack_chunk(
                &packed.hash,
                data.len() as u64,
                packed.compression,
                &packed.payload,
                CHUNK_MAX_BYTES,
            )
            .unwrap();
            assert_eq!(unpacked, data);
            let unsealed = open_sealed(&keys, &sealed.id, &sealed.bytes).unwrap();
            assert!(!unsealed.legacy);
            assert_eq!(unsealed.payload, packed.payload);
            assert_eq!(unsealed.compression, packed.compression);
        }
        let (packed, _) = seal_chunk(&keys, &compressible, 1).unwrap();
        assert!(packed.payload.len() < compressible.len() / 10);
    }

    #[test]
    fn format_one_chunks_still_open() {
        let keys = keys();
        let data = b"written by an agent that held the keys ".repeat(1000);
        let sealed = seal_legacy_chunk(&keys, &data, 1).unwrap();
        assert_eq!(sealed.id, ChunkId::legacy_of(&keys, &data));
        let (opened, hash) = open_chunk(&keys, &sealed.id, &sealed.bytes).unwrap();
        assert_eq!(opened, data);
        assert_eq!(hash, ContentHash::of(&data));
        assert!(
            open_sealed(&keys, &sealed.id, &sealed.bytes)
                .unwrap()
                .legacy
        );
        // Not under the format-2 name of the same content.
        let v2 = ChunkId::for_content(&keys, &hash);
        assert!(open_chunk(&keys, &v2, &sealed.bytes).is_err());
    }

    #[test]
    fn names_are_keyed_and_deterministic_hashes_are_not_keyed() {
        let (a, b) = (keys(), keys());
        let x = ContentHash::of(b"x");
        assert_eq!(x, ContentHash::of(b"x"));
        assert_ne!(x, ContentHash::of(b"y"));
        assert_eq!(ChunkId::for_content(&a, &x), ChunkId::for_content(&a, &x));
        assert_ne!(ChunkId::for_content(&a, &x), ChunkId::for_content(&b, &x));
        // The stored name is not the content hash, nor the format-1 name of
        // the hash's bytes.
        assert_ne!(ChunkId::for_content(&a, &x).as_bytes(), x.as_bytes());
        assert_ne!(
            ChunkId::for_content(&a, &x),
            ChunkId::legacy_of(&a, x.as_bytes())
        );
        let id = ChunkId::for_content(&a, &x);
        assert_eq!(ChunkId::from_hex(&id.to_hex()).unwrap(), id);
        assert_eq!(ContentHash::from_hex(&x.to_hex()).unwrap(), x);
    }

    #[test]
    fn packed_bytes_that_are_not_what_they_claim_are_refused() {
        let data = b"payload ".repeat(1000);
        let packed = pack_chunk(&data, 1).unwrap();
        let unpack = |hash: &ContentHash, len: u64, payload: &[u8]| {
            unpack_chunk(hash, len, packed.compression, payload, CHUNK_MAX_BYTES)
        };
        assert_eq!(
            unpack(
                &ContentHash::of(b"other"),
                data.len() as u64,
                &packed.payload
            ),
            Err(UnpackError::HashMismatch)
        );
        assert!(matches!(
            unpack(&packed.hash, data.len() as u64 - 1, &packed.payload),
            Err(UnpackError::Decompress(_) | UnpackError::Length { .. })
        ));
        assert!(matches!(
            unpack(&packed.hash, data.len() as u64 + 1, &packed.payload),
            Err(UnpackError::Length { .. })
        ));
        let mut altered = packed.payload.clone();
        let last = altered.len() - 1;
        altered[last] ^= 0x40;
        assert!(unpack(&packed.hash, data.len() as u64, &altered).is_err());
        // A bomb: far more than announced.
        let zeros = vec![0u8; 4 * CHUNK_MAX_BYTES];
        let bomb = zstd::bulk::compress(&zeros, 3).unwrap();
        assert!(
            unpack_chunk(
                &ContentHash::of(&zeros),
                zeros.len() as u64,
                Compression::Zstd,
                &bomb,
                CHUNK_MAX_BYTES
            )
            .is_err()
        );
        assert!(
            unpack_chunk(
                &packed.hash,
                1000,
                Compression::Zstd,
                &bomb,
                CHUNK_MAX_BYTES
            )
            .is_err()
        );
    }

    #[test]
    fn a_payload_must_be_one_zstd_frame_of_the_announced_size() {
        let data = b"payload ".repeat(100_000);
        let hash = ContentHash::of(&data);
        let len = data.len() as u64;
        let frame = zstd::bulk::compress(&data, 1).unwrap();
        let unpack =
            |payload: &[u8]| unpack_chunk(&hash, len, Compression::Zstd, payload, CHUNK_MAX_BYTES);
        assert_eq!(unpack(&frame).unwrap(), data);
        // A skippable frame first (magic 0x184D2A50, 4-byte length).
        let mut skippable = vec![0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3];
        skippable.extend_from_slice(&frame);
        assert!(matches!(
            unpack(&skippable),
            Err(UnpackError::Decompress(_))
        ));
        // Two frames that together make the content.
        let (first, second) = data.split_at(data.len() / 2);
        let mut two = zstd::bulk::compress(first, 1).unwrap();
        two.extend_from_slice(&zstd::bulk::compress(second, 1).unwrap());
        assert!(matches!(unpack(&two), Err(UnpackError::Decompress(_))));
        // Trailing bytes.
        let mut trailing = frame.clone();
        trailing.push(0);
        assert!(matches!(unpack(&trailing), Err(UnpackError::Decompress(_))));
        // Announced larger than any chunk: refused before any work.
        assert_eq!(
            unpack_chunk(&hash, u64::MAX, Compression::Zstd, &frame, CHUNK_MAX_BYTES),
            Err(UnpackError::TooLarge {
                announced: u64::MAX,
                limit: CHUNK_MAX_BYTES
            })
        );
    }

    #[test]
    fn altered_or_misnamed_chunks_are_refused() {
        let keys = keys();
        let (_, sealed) = seal_chunk(&keys, &b"payload ".repeat(1000), 1).unwrap();
        let (_, other) = seal_chunk(&keys, b"other", 1).unwrap();
        for position in [0, 1, 2, sealed.bytes.len() / 2, sealed.bytes.len() - 1] {
            let mut altered = sealed.bytes.clone();
            altered[position] ^= 0x40;
            assert!(
                open_chunk(&keys, &sealed.id, &altered).is_err(),
                "byte {position}"
            );
            assert!(
                open_sealed(&keys, &sealed.id, &altered).is_err(),
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

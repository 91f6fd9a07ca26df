//! Length-prefixed, versioned frames. One frame per direction per stream:
//!
//! ```text
//! 0..2   magic  b"AU"
//! 2..4   protocol version, u16 little-endian
//! 4..8   body length in bytes, u32 little-endian (at most `FRAME_BODY_MAX_BYTES`)
//! 8..    body: a postcard-encoded `Request` or `Response`
//! ```
//!
//! The header is checked before any body byte is read or any buffer is allocated, so a hostile
//! length costs nothing; decoding never panics and rejects trailing bytes.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::FrameError;
use crate::msg::PROTOCOL_VERSION;

pub const FRAME_MAGIC: [u8; 2] = *b"AU";
pub const FRAME_HEADER_BYTES: usize = 8;
/// Largest frame body accepted from a peer: a batched read of `BATCH_BYTES_MAX` plus headroom,
/// or a whole 4 MiB block write.
pub const FRAME_BODY_MAX_BYTES: u32 = 9 * 1024 * 1024;

/// Encodes `msg` into one frame (header + body).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let buf = postcard::to_extend(msg, vec![0u8; FRAME_HEADER_BYTES])?;
    let body_len = buf.len() - FRAME_HEADER_BYTES;
    let len = u32::try_from(body_len).ok().filter(|len| *len <= FRAME_BODY_MAX_BYTES).ok_or(
        FrameError::TooLarge { len: u32::try_from(body_len).unwrap_or(u32::MAX), max: FRAME_BODY_MAX_BYTES },
    )?;
    let mut buf = buf;
    buf[0..2].copy_from_slice(&FRAME_MAGIC);
    buf[2..4].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    buf[4..8].copy_from_slice(&len.to_le_bytes());
    Ok(buf)
}

/// Checks a frame header and returns the body length it announces.
pub fn parse_header(header: &[u8; FRAME_HEADER_BYTES], max_bytes: u32) -> Result<u32, FrameError> {
    let magic = [header[0], header[1]];
    if magic != FRAME_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([header[2], header[3]]);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion { got: version, supported: PROTOCOL_VERSION });
    }
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > max_bytes {
        return Err(FrameError::TooLarge { len, max: max_bytes });
    }
    Ok(len)
}

/// Decodes a frame body; trailing bytes are an error, not ignored.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(FrameError::Decode(postcard::Error::DeserializeBadEncoding));
    }
    Ok(msg)
}

/// Reads one frame from `reader`, refusing bodies over `max_bytes`.
pub async fn read_frame<T, R>(reader: &mut R, max_bytes: u32) -> Result<T, FrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let len = read_header(reader, max_bytes).await?;
    read_body(reader, len).await
}

/// Reads and checks a frame's header; returns its body's length.
async fn read_header<R: AsyncRead + Unpin>(reader: &mut R, max_bytes: u32) -> Result<u32, FrameError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    read_exact(reader, &mut header).await?;
    parse_header(&header, max_bytes)
}

/// Reads a body of `len` bytes (after its header) and decodes it.
async fn read_body<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
    len: u32,
) -> Result<T, FrameError> {
    let mut body = vec![0u8; len as usize];
    read_exact(reader, &mut body).await?;
    decode_body(&body)
}

/// Reads one frame like [`read_frame`], but first takes as many units of `budget` as the
/// body's announced length (after the header is checked, before the body is allocated) and
/// returns them with the message: whoever holds the message holds its bytes in the budget.
/// A server bounds the request bytes it holds this way, not only the requests' count.
pub async fn read_frame_budgeted<T, R>(
    reader: &mut R,
    max_bytes: u32,
    budget: &std::sync::Arc<tokio::sync::Semaphore>,
) -> Result<(T, tokio::sync::OwnedSemaphorePermit), FrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let len = read_header(reader, max_bytes).await?;
    let held = budget
        .clone()
        .acquire_many_owned(len)
        .await
        .map_err(|_| FrameError::Io(std::io::Error::other("server shutting down")))?;
    Ok((read_body(reader, len).await?, held))
}

/// Writes one frame holding `msg`.
pub async fn write_frame<T, W>(writer: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let frame = encode_frame(msg)?;
    writer.write_all(&frame).await?;
    Ok(())
}

async fn read_exact<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_budgeted_read_waits_until_the_bytes_it_needs_are_given_back() {
        let frame = encode_frame(&sample_request()).unwrap();
        let body = (frame.len() - FRAME_HEADER_BYTES) as u32;
        let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(body as usize));
        let (first, held): (Request, _) =
            read_frame_budgeted(&mut &frame[..], FRAME_BODY_MAX_BYTES, &budget).await.unwrap();
        assert_eq!(first.deadline_ms, 5000);
        assert_eq!(budget.available_permits(), 0, "the first request holds its bytes");
        let mut rest = &frame[..];
        let second = read_frame_budgeted::<Request, _>(&mut rest, FRAME_BODY_MAX_BYTES, &budget);
        tokio::pin!(second);
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), &mut second).await;
        assert!(waited.is_err(), "read while the budget was spent");
        drop(held);
        let (again, _held) = second.await.unwrap();
        assert_eq!(again.deadline_ms, 5000);
    }
    use crate::ids::{BlockId, Epoch, Ino, ShardId, ShardRef, VolumeId};
    use crate::msg::{BlockRead, ByteRange, Request, RequestBody, Response, ResponseBody};
    use proptest::prelude::*;

    fn sample_request() -> Request {
        Request {
            deadline_ms: 5000,
            body: RequestBody::ReadBlock {
                read: BlockRead {
                    shard: ShardRef { volume: VolumeId(1), shard: ShardId(7), epoch: Epoch(3) },
                    block: BlockId::new(Ino(42), 9),
                    range: Some(ByteRange { offset: 10, len: 100 }),
                },
            },
        }
    }

    #[tokio::test]
    async fn round_trip() {
        let frame = encode_frame(&sample_request()).unwrap();
        let got: Request = read_frame(&mut &frame[..], FRAME_BODY_MAX_BYTES).await.unwrap();
        assert_eq!(format!("{got:?}"), format!("{:?}", sample_request()));
    }

    #[tokio::test]
    async fn refuses_wrong_version_magic_size_and_truncation() {
        let good = encode_frame(&sample_request()).unwrap();

        let mut v = good.clone();
        v[2] = 99;
        let err = read_frame::<Request, _>(&mut &v[..], FRAME_BODY_MAX_BYTES).await.unwrap_err();
        assert!(matches!(err, FrameError::UnsupportedVersion { got: 99, .. }), "{err}");

        let mut m = good.clone();
        m[0] = b'X';
        let err = read_frame::<Request, _>(&mut &m[..], FRAME_BODY_MAX_BYTES).await.unwrap_err();
        assert!(matches!(err, FrameError::BadMagic(_)), "{err}");

        let mut big = good.clone();
        big[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = read_frame::<Request, _>(&mut &big[..], FRAME_BODY_MAX_BYTES).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");

        let short = &good[..good.len() - 1];
        let err = read_frame::<Request, _>(&mut &short[..], FRAME_BODY_MAX_BYTES).await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");

        let mut trailing = good.clone();
        trailing.push(0);
        let len = (trailing.len() - FRAME_HEADER_BYTES) as u32;
        trailing[4..8].copy_from_slice(&len.to_le_bytes());
        let err = read_frame::<Request, _>(&mut &trailing[..], FRAME_BODY_MAX_BYTES).await.unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err}");
    }

    proptest! {
        // Hostile bodies never panic the decoder, whatever the bytes.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_body::<Request>(&body);
            let _ = decode_body::<Response>(&body);
        }

        // Mutating bytes of a valid frame either decodes or errors, never panics.
        #[test]
        fn mutated_frames_never_panic(pos in 0usize..64, byte in any::<u8>()) {
            let mut frame = encode_frame(&Ok::<_, crate::error::WireError>(ResponseBody::Written)).unwrap();
            frame.extend_from_slice(&encode_frame(&sample_request()).unwrap());
            let pos = pos % frame.len();
            frame[pos] = byte;
            let _ = decode_body::<Request>(&frame[FRAME_HEADER_BYTES..]);
        }
    }
}

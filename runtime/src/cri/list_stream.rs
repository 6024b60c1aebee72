//! The streaming list RPCs of CRI 1.36 (KEP-5825, `Stream…`): the same
//! answer as the unary List call, cut into messages small enough for any
//! client's receive limit, so a node with many objects (or big labels)
//! never meets the 16 MiB message limit a unary list can exceed.

use std::pin::Pin;

use prost::Message;
use tokio_stream::Stream;
use tonic::Status;

pub type ListStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Encoded bytes of items per message: well under gRPC's usual 4 MiB
/// default and kubelet's 16 MiB. An item larger than this goes alone.
pub const CHUNK_BYTES: usize = 1 << 20;

/// `items` as a stream of messages made by `wrap`, each holding items of
/// at most [`CHUNK_BYTES`] encoded (one at least). An empty list is one
/// empty message, so a client always gets an answer before the end.
pub fn chunked<I, R>(items: Vec<I>, wrap: impl Fn(Vec<I>) -> R) -> ListStream<R>
where
    I: Message,
    R: Send + 'static,
{
    let mut messages = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for item in items {
        let len = item.encoded_len();
        if !chunk.is_empty() && bytes + len > CHUNK_BYTES {
            messages.push(wrap(std::mem::take(&mut chunk)));
            bytes = 0;
        }
        bytes += len;
        chunk.push(item);
    }
    if !chunk.is_empty() || messages.is_empty() {
        messages.push(wrap(chunk));
    }
    Box::pin(tokio_stream::iter(messages.into_iter().map(Ok)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_cri::v1::{KeyValue, StreamContainersResponse};
    use tokio_stream::StreamExt;

    fn sizes(items: Vec<KeyValue>) -> Vec<usize> {
        let stream = chunked(items, |kvs| kvs);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async { stream.map(|m| m.unwrap().len()).collect::<Vec<_>>().await })
    }

    fn kv(bytes: usize) -> KeyValue {
        KeyValue {
            key: "k".into(),
            value: "v".repeat(bytes),
        }
    }

    #[test]
    fn messages_stay_under_the_chunk_size() {
        // 3 items of ~400 KiB fit 2 to a message.
        assert_eq!(
            sizes((0..5).map(|_| kv(400 << 10)).collect()),
            vec![2, 2, 1]
        );
        // One bigger than a chunk goes alone.
        assert_eq!(sizes(vec![kv(10), kv(2 << 20), kv(10)]), vec![1, 1, 1]);
        assert_eq!(sizes((0..1000).map(|_| kv(10)).collect()), vec![1000]);
    }

    #[test]
    fn an_empty_list_is_one_empty_message() {
        assert_eq!(sizes(Vec::new()), vec![0]);
        let _: ListStream<StreamContainersResponse> = chunked(Vec::new(), |containers| {
            StreamContainersResponse { containers }
        });
    }
}

//! The compress layer as the host loads it (`libcomms_compress.so`) over the real TCP plugin:
//! a compressible payload is smaller on the wire and identical after, and a forged
//! `comms-compress: zstd` zip bomb is refused without a panic and without the memory it asks for.

use comms_plugin_api::{
    host_side::{LoadedTransport, PluginLibrary},
    Destination, Envelope, MessageId, NodeId,
};
use comms_tests::{artifacts, capture_logs, counter};
use std::{path::Path, time::Duration};

fn library(path: &Path) -> PluginLibrary {
    PluginLibrary::load(path).unwrap_or_else(|error| panic!("{error}"))
}

async fn tcp(node: &str) -> LoadedTransport {
    library(&artifacts().tcp_plugin).new_transport(&NodeId::new(node), "tcp", "").await.unwrap()
}

/// A TCP transport with the compress layer over it, as a node's `layers = ["compress"]` builds it.
async fn compressed_tcp(node: &str, config: &str) -> LoadedTransport {
    let inner = tcp(node).await;
    library(&artifacts().compress_plugin).new_layer(&NodeId::new(node), "tcp", config, inner).await.unwrap()
}

fn envelope(id: u128, payload: Vec<u8>) -> Envelope {
    Envelope::new(MessageId::from_u128(id), "sender", Destination::node("receiver"), payload)
}

async fn receive_one(transport: &LoadedTransport) -> Envelope {
    let mut batch =
        tokio::time::timeout(Duration::from_secs(30), transport.receive(1)).await.unwrap().unwrap();
    assert_eq!(batch.len(), 1);
    batch.remove(0).envelope
}

/// Peak resident memory of this process, in bytes.
fn peak_resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressible_payload_is_smaller_on_the_wire_and_identical_after() {
    let sender = compressed_tcp("sender", "").await;
    // Sees what the wire carries: a TCP transport without the layer.
    let plain = tcp("plain").await;
    let layered = compressed_tcp("layered", "").await;
    let payload: Vec<u8> =
        (0..400_000u32).flat_map(|i| format!("{{\"seq\":{i},\"status\":\"ok\"}}\n").into_bytes()).collect();
    let len = payload.len() as u64;
    sender.send(&plain.info().local_address, envelope(1, payload.clone())).await.unwrap();
    sender.send(&layered.info().local_address, envelope(2, payload.clone())).await.unwrap();

    let on_wire = receive_one(&plain).await;
    assert_eq!(on_wire.header("comms-compress"), Some("zstd"));
    let wire_bytes = plain.stats().bytes_received;
    assert_eq!(wire_bytes, on_wire.payload.len() as u64, "the inner transport's own count");
    assert!(wire_bytes * 10 < len, "{len} bytes went as {wire_bytes}");
    let after = receive_one(&layered).await;
    assert_eq!((after.id, after.header("comms-compress")), (MessageId::from_u128(2), None));
    assert!(after.payload.as_slice() == payload.as_slice(), "identical after");
    assert_eq!(counter(&sender, "compress.messages_compressed"), 2);
    assert_eq!(counter(&sender, "compress.bytes_before"), 2 * len);
    assert_eq!(counter(&sender, "compress.bytes_after"), 2 * wire_bytes);
    assert_eq!(counter(&layered, "compress.messages_decompressed"), 1);
    eprintln!("{len} bytes of JSON lines went as {wire_bytes} bytes");
    for transport in [sender, plain, layered] {
        transport.close().await.unwrap();
    }
}

/// A zstd frame of `blocks` RLE blocks of 128 KiB of zeros (4 bytes each), made by hand as an
/// attacker would: with a content size of `declared` in its header, or none.
fn rle_frame(blocks: usize, declared: Option<u64>) -> Vec<u8> {
    let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd];
    // Frame header descriptor (content size: 8 bytes, or none) and a 128 KiB window.
    match declared {
        Some(size) => {
            frame.extend([0xc0, 0x38]);
            frame.extend(size.to_le_bytes());
        }
        None => frame.extend([0x00, 0x38]),
    }
    for block in 0..blocks {
        let last = u32::from(block + 1 == blocks);
        // Last-block flag, type 1 (RLE), size 128 KiB: a 3-byte header and the byte to repeat.
        let header = last | (1 << 1) | ((128 << 10) << 3);
        frame.extend(&header.to_le_bytes()[..3]);
        frame.push(0);
    }
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_zip_bomb_is_refused_without_a_panic_or_its_memory() {
    let logs = capture_logs("warn");
    // max_message_size: the TCP transport's, just under 16 MiB.
    let receiver = compressed_tcp("receiver", "").await;
    let limit = receiver.info().max_message_size;
    let address = receiver.info().local_address.clone();
    // Not the layer: a sender that sets the header itself.
    let forger = tcp("forger").await;
    let send = |id, payload: Vec<u8>, method: &str| {
        forger.send(&address, envelope(id, payload).with_header("comms-compress", method))
    };

    // The hand-made frame is valid zstd: 4 blocks arrive as 512 KiB of zeros.
    send(1, rle_frame(4, None), "zstd").await.unwrap();
    let control = receive_one(&receiver).await;
    assert_eq!(control.payload.len(), 512 << 10);
    assert!(control.payload.iter().all(|&byte| byte == 0));
    assert_eq!(control.header("comms-compress"), None);

    let before = peak_resident_bytes();
    // 32 KiB that would decompress to 1 GiB, declaring no size: the decoder stops at the limit.
    let bomb = rle_frame(8192, None);
    assert_eq!(bomb.len(), 6 + 8192 * 4);
    send(2, bomb, "zstd").await.unwrap();
    // Declares 1 TiB: refused before decoding anything.
    send(3, rle_frame(1, Some(1 << 40)), "zstd").await.unwrap();
    send(4, b"some bytes".to_vec(), "brotli").await.unwrap();
    send(5, b"not a frame at all".to_vec(), "zstd").await.unwrap();
    forger.send(&address, envelope(6, b"still served".to_vec())).await.unwrap();

    let next = receive_one(&receiver).await;
    assert_eq!(next.id, MessageId::from_u128(6), "none of the refused ones is handed up");
    assert_eq!(next.payload.as_slice(), b"still served");
    assert_eq!(counter(&receiver, "compress.decompress_failures"), 4);
    assert_eq!(counter(&receiver, "compress.messages_decompressed"), 1);
    assert!(receiver.stats().errors >= 4, "refusals count as errors");
    assert_eq!(receiver.panics(), 0);
    let grown = peak_resident_bytes().saturating_sub(before);
    eprintln!(
        "peak resident memory grew by {} KiB while refusing the bombs (limit {limit} bytes)",
        grown >> 10
    );
    assert!(grown < 256 << 20, "the bomb's gibibyte was not allocated: grew by {grown} bytes");
    let text = logs.text();
    assert!(text.contains(&format!("over the limit of {limit}")), "{text}");
    assert!(text.contains("unknown compression `brotli`"), "{text}");
    forger.close().await.unwrap();
    receiver.close().await.unwrap();
}

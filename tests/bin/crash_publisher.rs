//! Test helper process: publishes numbers `from..to` to a topic and appends each number
//! whose `publish` returned Ok to a record file (one per line, flushed), so that a test
//! can SIGKILL it at any moment and check that every recorded number arrives.
//!
//! Usage: crash-publisher DIRECTORY_ADDR DEV_CA DATA_DIR TOPIC RECORD_FILE FROM TO

use anyhow::{Context, Result};
use std::io::Write;
use std::time::Duration;
use weft_peer::{Message, Peer};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 8,
        "usage: crash-publisher DIRECTORY DEV_CA DATA_DIR TOPIC RECORD FROM TO"
    );
    let directory: std::net::SocketAddr = args[1].parse().context("directory address")?;
    let from: u64 = args[6].parse().context("FROM")?;
    let to: u64 = args[7].parse().context("TO")?;
    let peer = Peer::builder("crash-publisher")
        .directory([directory])
        .dev_ca(&args[2])
        .data_dir(&args[3])
        .ack_timeout(Duration::from_secs(3))
        .start()
        .await?;
    let mut record = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args[5])
        .context("record file")?;
    for n in from..to {
        let key = format!("k{}", n % 7);
        peer.publish(&args[4], Message::new(n.to_string()).key(key))
            .await?;
        // One `write` per line: `writeln!` on a `File` writes the number and the newline
        // separately, and a SIGKILL between the two glued this line to the next run's
        // first one ("5538" + "5539\n"), which the test then missed as never delivered.
        record.write_all(format!("{n}\n").as_bytes())?;
    }
    record.sync_all()?;
    println!("published");
    anyhow::ensure!(
        peer.drain(Duration::from_secs(60)).await,
        "outbox did not drain"
    );
    println!("drained");
    peer.close().await?;
    Ok(())
}

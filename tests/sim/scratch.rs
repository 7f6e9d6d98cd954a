//! Temporary determinism experiment.
use crate::udp::SimUdpSocket;
use std::time::Duration;

pub fn run(seed: u64) -> String {
    crate::udp::PACKETS.with(|p| *p.borrow_mut() = Some(Vec::new()));
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(2))
        .simulation_duration(Duration::from_secs(3600))
        .build();
    let names = ["a", "b", "c"];
    for (i, name) in names.iter().enumerate() {
        let name = *name;
        sim.host(name, move || async move {
            let creds = crate::scenario::test_creds(name);
            let sock = SimUdpSocket::bind(name, 7000).await?;
            let ep = weft_proto::tls::endpoint_with_socket(sock, &creds, Some(seed + i as u64))?;
            let ep2 = ep.clone();
            tokio::spawn(async move {
                while let Some(inc) = ep2.accept().await {
                    tokio::spawn(async move {
                        let c = inc.await.unwrap();
                        let _ = c.closed().await;
                    });
                }
            });
            for other in names.iter().filter(|n| **n > name) {
                let addr = std::net::SocketAddr::new(turmoil::lookup(*other), 7000);
                let other_id = match *other {
                    "a" => "s1",
                    "b" => "s2",
                    _ => "g1-a",
                };
                let c = weft_proto::tls::connect(&ep, addr, other_id).await?;
                std::mem::forget(c);
            }
            std::future::pending::<()>().await;
            Ok(())
        });
    }
    for _ in 0..5000 {
        sim.step().unwrap();
    }
    crate::udp::PACKETS.with(|p| p.borrow_mut().take().unwrap().join("\n"))
}

#[test]
fn scratch_determinism() {
    let a = run(3);
    for _ in 0..3 {
        let b = run(3);
        if a != b {
            std::fs::write("/tmp/scratch/a.txt", &a).unwrap();
            std::fs::write("/tmp/scratch/b.txt", &b).unwrap();
            panic!("differ");
        }
    }
}

//! The simulator's bench binary: runs the overlay benchmark without the CLI, memory per node
//! measured by the counting allocator installed here: `cargo run --release -p unipeer-sim
//! --example overlay_bench -- 1000 [measure_s]`.

#[global_allocator]
static HEAP: &unipeer_sim::heap::CountingAlloc = &unipeer_sim::heap::COUNTING;

fn main() {
    let mut args = std::env::args().skip(1);
    let nodes: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let mut cfg = unipeer_sim::bench::BenchConfig::new(nodes);
    if let Some(s) = args.next().and_then(|s| s.parse().ok()) {
        cfg.measure_s = s;
    }
    println!("{:#?}", unipeer_sim::bench::run(&cfg));
}

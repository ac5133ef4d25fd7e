//! Runs one seed and prints its report: `cargo run -p unipeer-replsim --example one -- SEED`
//! (`REPLSIM_TRACE=1` also prints the agents' debug log).
struct Stderr;
impl log::Log for Stderr {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        eprintln!("  {}", r.args());
    }
    fn flush(&self) {}
}
static LOGGER: Stderr = Stderr;

fn main() {
    if std::env::var("REPLSIM_TRACE").is_ok() {
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Trace);
    }
    let seed = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let t = std::time::Instant::now();
    let r = unipeer_replsim::run(unipeer_replsim::SimConfig::for_seed(seed));
    println!("seed {seed}: {:?} in {:?}", r, t.elapsed());
}

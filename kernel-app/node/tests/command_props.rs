//! Property tests of the decoders behind the guest's TCP ports, in the host build: random lines
//! at every diagnostic command (the parser either refuses a line or returns a command whose
//! numbers are in range, never panics) and random frames at the client port's decoder.

use proptest::prelude::*;
use unipeer_node::auth::stream::{FrameReader, frame};
use unipeer_node::diag_command::{
    self, BENCH_SEAL_MAX, COMMANDS, DiagCommand, PRIMES_TASKS_MAX, PROBE_COUNT_MAX,
    SHA256_TASKS_MAX,
};
use unipeer_node::jobs::client::{ClientRequest, MAX_CLIENT_FRAME};

/// A word that often looks like a number near a boundary, else anything printable.
fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just("18446744073709551616".to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        (0u32..300).prop_map(|n| n.to_string()),
        "[0-9a-fA-F]{0,70}",
        "[0-9]{1,3}(\\.[0-9]{1,4}){0,4}",
        "\\PC{0,12}",
    ]
}

/// A line that starts with a real command name most of the time.
fn line() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        4 => proptest::sample::select(COMMANDS.iter().map(|c| c.name).collect::<Vec<_>>())
            .prop_map(str::to_string),
        1 => "\\PC{0,10}",
    ];
    (name, proptest::collection::vec(word(), 0..5)).prop_map(|(n, w)| {
        let mut l = n;
        for x in w {
            l.push(' ');
            l.push_str(&x);
        }
        l
    })
}

fn check(cmd: &DiagCommand<'_>) {
    let spec = cmd.spec();
    assert!(COMMANDS.iter().any(|c| c.name == spec.name));
    match *cmd {
        DiagCommand::JobPrimes { start, end, tasks } => {
            assert!(start < end && (1..=PRIMES_TASKS_MAX).contains(&tasks));
            assert!(u64::from(tasks) <= end - start);
            let r = diag_command::split_range(start, end, tasks).expect("parsed ranges split");
            assert!(!r.is_empty() && r.len() <= tasks as usize);
            assert_eq!((r[0].0, r[r.len() - 1].1), (start, end));
        }
        DiagCommand::JobSha256 { tasks } => assert!((1..=SHA256_TASKS_MAX).contains(&tasks)),
        DiagCommand::BenchSeal { n } => assert!((1..=BENCH_SEAL_MAX).contains(&n)),
        DiagCommand::Probe { count, .. } => assert!((1..=PROBE_COUNT_MAX).contains(&count)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn diag_lines_parse_in_range_or_are_refused(l in line()) {
        if let Ok(cmd) = diag_command::parse(l.as_bytes()) {
            check(&cmd);
        }
    }

    #[test]
    fn diag_raw_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(cmd) = diag_command::parse(&bytes) {
            check(&cmd);
        }
    }

    #[test]
    fn range_splits_are_exact(start in any::<u64>(), len in 1u64.., tasks in 1u32..=PRIMES_TASKS_MAX) {
        let end = start.saturating_add(len);
        prop_assume!(start < end);
        let r = diag_command::split_range(start, end, tasks).unwrap();
        prop_assert!(r.len() <= tasks as usize);
        prop_assert_eq!(r[0].0, start);
        prop_assert_eq!(r[r.len() - 1].1, end);
        prop_assert!(r.windows(2).all(|w| w[0].1 == w[1].0 && w[0].0 < w[0].1));
    }

    #[test]
    fn client_port_frames_decode_or_are_refused(
        bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..6),
        split in 1usize..64,
    ) {
        // Frames cut at arbitrary points, as a TCP stream delivers them.
        let stream: Vec<u8> = bodies.iter().flat_map(|b| frame(b)).collect();
        let mut reader = FrameReader::new(MAX_CLIENT_FRAME);
        let mut seen = 0;
        for piece in stream.chunks(split) {
            reader.push(piece);
            while let Ok(Some(body)) = reader.next_frame() {
                prop_assert_eq!(&body, &bodies[seen]);
                seen += 1;
                if let Ok(req) = ClientRequest::decode(&body) {
                    // What decodes re-encodes to a request that decodes the same.
                    prop_assert_eq!(ClientRequest::decode(&req.encode()).ok(), Some(req));
                }
            }
        }
        prop_assert_eq!(seen, bodies.len());
    }

    #[test]
    fn client_port_oversized_lengths_are_refused(len in (MAX_CLIENT_FRAME as u32 + 1)..) {
        let mut reader = FrameReader::new(MAX_CLIENT_FRAME);
        reader.push(&len.to_be_bytes());
        prop_assert!(reader.next_frame().is_err());
    }
}

//! Property tests of the request decoder (`elector_client::protocol::parse_request`), the code
//! every byte a client sends goes through: any input is a request or a typed error (with a
//! code), never a panic; and every request the protocol can express reads back as itself.

use elector_client::protocol::{
    BareRequest, CampaignRequest, ElectionRef, ErrorCode, LockKind, Op, Request, Timing, parse_request,
};
use proptest::prelude::*;
use serde_json::Value;

/// The largest integer every JSON reader carries exactly (2^53 − 1): the bound on numeric ids.
const MAX_EXACT: i64 = (1 << 53) - 1;

/// A request id the protocol echoes: a string, or an integer of at most 2^53 − 1 in magnitude
/// (others are refused: `numeric_ids_beyond_2_53_are_refused`).
fn id() -> impl Strategy<Value = Option<Value>> {
    proptest::option::of(prop_oneof![
        any::<String>().prop_map(Value::from),
        (0..=MAX_EXACT as u64).prop_map(Value::from),
        (-MAX_EXACT..=MAX_EXACT).prop_map(Value::from),
    ])
}

/// Seconds that JSON carries exactly (quarters).
fn seconds() -> impl Strategy<Value = f64> {
    (0u32..1_000_000).prop_map(|q| f64::from(q) / 4.0)
}

fn timing() -> impl Strategy<Value = Option<Timing>> {
    proptest::option::of(
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of(seconds()),
            proptest::option::of(seconds()),
        )
            .prop_map(|(lease_duration, renew_deadline, retry_period)| Timing {
                lease_duration,
                renew_deadline,
                retry_period,
            }),
    )
}

fn lock() -> impl Strategy<Value = Option<LockKind>> {
    proptest::option::of(prop_oneof![Just(LockKind::Lease), Just(LockKind::Endpoints)])
}

fn campaign() -> impl Strategy<Value = CampaignRequest> {
    (
        id(),
        any::<String>(),
        proptest::option::of(any::<String>()),
        proptest::option::of(any::<String>()),
        lock(),
        timing(),
        proptest::option::of(any::<i32>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(id, election, namespace, identity, lock, timing, priority, term, valid_until)| {
                CampaignRequest {
                    id,
                    election,
                    namespace,
                    identity,
                    lock,
                    timing,
                    priority,
                    term,
                    valid_until,
                }
            },
        )
}

fn election_ref() -> impl Strategy<Value = ElectionRef> {
    (
        id(),
        any::<String>(),
        proptest::option::of(any::<String>()),
        lock(),
    )
        .prop_map(|(id, election, namespace, lock)| ElectionRef {
            id,
            election,
            namespace,
            lock,
        })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        campaign().prop_map(Request::Campaign),
        campaign().prop_map(Request::Resume),
        election_ref().prop_map(Request::Resign),
        election_ref().prop_map(Request::Observe),
        election_ref().prop_map(Request::Unobserve),
        id().prop_map(|id| Request::Status(BareRequest { id })),
        id().prop_map(|id| Request::Ping(BareRequest { id })),
    ]
}

/// Lines that look like requests: objects with an `op` (known or not) and fields of the
/// requests' names holding any kind of value.
fn request_like_line() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        Just(serde_json::json!({"lease_duration": 15, "renew_deadline": "x"})),
        Just(serde_json::json!([1, "two", null])),
    ];
    let op = prop_oneof![
        proptest::sample::select(Op::ALL.to_vec()).prop_map(|op| Value::from(op.as_str())),
        any::<String>().prop_map(Value::from),
        value.clone(),
    ];
    let key = proptest::sample::select(vec![
        "id",
        "election",
        "namespace",
        "identity",
        "lock",
        "timing",
        "priority",
        "term",
        "valid_until",
        "bogus",
    ]);
    (
        proptest::option::of(op),
        proptest::collection::btree_map(key, value, 0..6),
    )
        .prop_map(|(op, fields)| {
            let mut object: serde_json::Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            if let Some(op) = op {
                object.insert("op".into(), op);
            }
            serde_json::to_vec(&object).expect("JSON")
        })
}

proptest! {
    #[test]
    fn any_bytes_are_a_request_or_a_coded_error(line in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_decodes(&line)?;
    }

    #[test]
    fn any_request_like_line_is_a_request_or_a_coded_error(line in request_like_line()) {
        check_decodes(&line)?;
    }

    #[test]
    fn every_request_reads_back_as_itself(request in request()) {
        let line = serde_json::to_vec(&request).expect("a request serializes");
        prop_assert!(!line.contains(&b'\n'), "one line");
        let read = parse_request(&line);
        prop_assert_eq!(read.as_ref().map(Request::op), Ok(request.op()));
        prop_assert_eq!(read, Ok(request));
    }
}

/// Decodes `line`: a request, or an error with a code and a message that keeps the id of a
/// request whose id could be read.
fn check_decodes(line: &[u8]) -> Result<(), TestCaseError> {
    match parse_request(line) {
        Ok(request) => {
            // What was accepted is a request the protocol can say again.
            let again = serde_json::to_vec(&request).expect("a request serializes");
            prop_assert_eq!(parse_request(&again).map(|r| r.op()), Ok(request.op()));
        }
        Err(e) => {
            prop_assert!(!e.message.is_empty());
            if e.code == ErrorCode::InvalidUtf8 || e.code == ErrorCode::InvalidJson {
                prop_assert_eq!(e.id, None);
            }
        }
    }
    Ok(())
}

proptest! {
    /// Any integral id beyond 2^53 − 1 in magnitude is refused with `invalid_request`, never
    /// echoed rounded.
    #[test]
    fn numeric_ids_beyond_2_53_are_refused(big in (MAX_EXACT as u64 + 1)..=u64::MAX, negative in any::<bool>()) {
        let id = if negative && big <= i64::MAX as u64 { format!("-{big}") } else { big.to_string() };
        let line = format!("{{\"op\":\"ping\",\"id\":{id}}}");
        let e = parse_request(line.as_bytes()).expect_err("refused");
        prop_assert_eq!(e.code, ErrorCode::InvalidRequest);
    }
}

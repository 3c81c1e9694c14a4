//! The leader record: what a lock object says about who holds an election, in the format
//! client-go and the 2016 leader-elector read and write.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// The Endpoints annotation that carries a JSON [`LeaderRecord`].
pub const LEADER_ANNOTATION: &str = "control-plane.alpha.kubernetes.io/leader";

/// The annotation naming the node whose broker wrote the lock object last. Every write sets it;
/// the admission policy (deploy/admission-policy.yaml) requires it to be the node of the
/// writer's bound service-account token.
pub const NODE_ANNOTATION: &str = "elector.dev/node";

/// The label on every lock object elector creates (objects created by others, such as
/// client-go's, are not relabelled).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// The value of [`MANAGED_BY_LABEL`] on elector's objects.
pub const MANAGED_BY: &str = "elector";

/// The annotation naming the UID of the pod an attesting broker wrote the record for (absent
/// when the broker does not attest its callers, or when someone else wrote the record). A
/// leadership is resumed after a broker restart only by that same pod.
pub const HOLDER_POD_ANNOTATION: &str = "elector.dev/holder-pod";

/// Who holds an election, as stored in the lock object.
///
/// The wall-clock times are informational only: expiry is judged on the local monotonic clock
/// from when a record was last seen to change, never from these timestamps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderRecord {
    /// Empty when released.
    pub holder_identity: String,
    pub lease_duration_seconds: u32,
    pub acquire_time: Option<DateTime<Utc>>,
    pub renew_time: Option<DateTime<Utc>>,
    /// Grows by one on every change of holder: the term handed to applications.
    pub leader_transitions: u64,
    /// Not part of client-go's record: the holder's pod UID when an attesting broker wrote it,
    /// kept in the object's [`HOLDER_POD_ANNOTATION`].
    pub holder_pod: Option<String>,
}

impl LeaderRecord {
    pub fn is_released(&self) -> bool {
        self.holder_identity.is_empty()
    }

    /// The annotation value, byte for byte as client-go writes it (RFC 3339, whole seconds).
    pub fn to_annotation(&self) -> String {
        let wire = AnnotationRecord {
            holder_identity: self.holder_identity.clone(),
            lease_duration_seconds: self.lease_duration_seconds as i64,
            acquire_time: self
                .acquire_time
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
            renew_time: self
                .renew_time
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
            // client-go's field is a Go int: a count past its range (never reached) saturates.
            leader_transitions: i64::try_from(self.leader_transitions).unwrap_or(i64::MAX),
        };
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Parses the annotation value. Lenient like client-go: missing fields are zero values;
    /// unparseable times are treated as absent. Returns `None` for text that is not a JSON
    /// object of this shape.
    pub fn from_annotation(value: &str) -> Option<Self> {
        let wire: AnnotationRecord = serde_json::from_str(value).ok()?;
        let parse = |t: Option<String>| {
            t.and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
                .map(|d| d.with_timezone(&Utc))
        };
        Some(LeaderRecord {
            holder_identity: wire.holder_identity,
            lease_duration_seconds: wire.lease_duration_seconds.clamp(0, u32::MAX as i64) as u32,
            acquire_time: parse(wire.acquire_time),
            renew_time: parse(wire.renew_time),
            leader_transitions: wire.leader_transitions.max(0) as u64,
            holder_pod: None,
        })
    }
}

/// client-go's `LeaderElectionRecord` JSON, field order included.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnnotationRecord {
    #[serde(default)]
    holder_identity: String,
    #[serde(default)]
    lease_duration_seconds: i64,
    #[serde(default)]
    acquire_time: Option<String>,
    #[serde(default)]
    renew_time: Option<String>,
    #[serde(default)]
    leader_transitions: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_go_bytes_round_trip() {
        // Exactly as client-go wrote it (shared/kube-api-transcripts/client-go-records.json).
        let held = r#"{"holderIdentity":"client-go-b","leaseDurationSeconds":15,"acquireTime":"2026-11-23T19:08:34Z","renewTime":"2026-11-23T19:08:41Z","leaderTransitions":0}"#;
        let rec = LeaderRecord::from_annotation(held).unwrap();
        assert_eq!(rec.holder_identity, "client-go-b");
        assert_eq!(rec.lease_duration_seconds, 15);
        assert_eq!(rec.to_annotation(), held);
        let released = r#"{"holderIdentity":"","leaseDurationSeconds":1,"acquireTime":"2026-11-23T19:08:41Z","renewTime":"2026-11-23T19:08:41Z","leaderTransitions":0}"#;
        let rec = LeaderRecord::from_annotation(released).unwrap();
        assert!(rec.is_released());
        assert_eq!(rec.to_annotation(), released);
    }

    #[test]
    fn lenient_and_safe_parsing() {
        let rec = LeaderRecord::from_annotation(r#"{"holderIdentity":"a"}"#).unwrap();
        assert_eq!(rec.lease_duration_seconds, 0);
        assert!(LeaderRecord::from_annotation("not json").is_none());
        let rec = LeaderRecord::from_annotation(
            r#"{"holderIdentity":"a","renewTime":"yesterday","leaderTransitions":-3}"#,
        )
        .unwrap();
        assert_eq!((rec.renew_time, rec.leader_transitions), (None, 0));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A time as a record stores it: whole seconds, years 1970 to 9999 (RFC 3339's range).
        fn record_time() -> impl Strategy<Value = Option<DateTime<Utc>>> {
            proptest::option::of(
                (0i64..=253_402_300_799).prop_map(|s| DateTime::from_timestamp(s, 0).expect("in range")),
            )
        }

        fn record() -> impl Strategy<Value = LeaderRecord> {
            (
                any::<String>(),
                any::<u32>(),
                record_time(),
                record_time(),
                0..=i64::MAX as u64,
            )
                .prop_map(
                    |(
                        holder_identity,
                        lease_duration_seconds,
                        acquire_time,
                        renew_time,
                        leader_transitions,
                    )| {
                        LeaderRecord {
                            holder_identity,
                            lease_duration_seconds,
                            acquire_time,
                            renew_time,
                            leader_transitions,
                            // Kept in an annotation of its own, not in this one.
                            holder_pod: None,
                        }
                    },
                )
        }

        /// Annotation-like text: JSON objects with the record's keys holding any kind of value,
        /// and any other text.
        fn annotation() -> impl Strategy<Value = String> {
            let value = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                any::<String>().prop_map(serde_json::Value::from),
                "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})"
                    .prop_map(serde_json::Value::from),
            ];
            let key = prop_oneof![
                Just("holderIdentity".to_string()),
                Just("leaseDurationSeconds".to_string()),
                Just("acquireTime".to_string()),
                Just("renewTime".to_string()),
                Just("leaderTransitions".to_string()),
                any::<String>(),
            ];
            prop_oneof![
                proptest::collection::btree_map(key, value, 0..6)
                    .prop_map(|m| serde_json::to_string(&m).expect("a map of JSON values")),
                any::<String>(),
            ]
        }

        proptest! {
            #[test]
            fn any_text_is_a_record_or_none_never_a_panic(text in annotation()) {
                if let Some(record) = LeaderRecord::from_annotation(&text) {
                    // Whatever was accepted writes back as a record that reads the same.
                    let again = LeaderRecord::from_annotation(&record.to_annotation());
                    prop_assert_eq!(again, Some(record));
                }
            }

            #[test]
            fn records_round_trip(record in record()) {
                let text = record.to_annotation();
                prop_assert_eq!(LeaderRecord::from_annotation(&text), Some(record));
            }
        }
    }
}

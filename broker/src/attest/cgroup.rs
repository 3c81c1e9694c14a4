//! Reading a process's pod from `/proc/<pid>/cgroup`, for cgroup v1 and v2, the cgroupfs and
//! systemd drivers, containerd / CRI-O / docker naming, kind-in-docker nesting and
//! cgroup-namespace relative paths.
//!
//! ```
//! use elector_broker::attest::cgroup::parse;
//! let p = parse("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8a9b_0c1d2e3f4a5b.slice/cri-containerd-4b5e0e7f0d8f1c2b3a4e5d6c7b8a9f0e1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a.scope\n").unwrap();
//! assert_eq!(p.pod_uid.as_deref(), Some("0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"));
//! ```

/// What a cgroup file says about its process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupIdentity {
    /// The pod UID (dashes), when the path names one.
    pub pod_uid: Option<String>,
    /// The innermost container ID (64 hex digits), when the path names one.
    pub container_id: Option<String>,
}

/// Why a cgroup file was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupError {
    #[error("the process's cgroups name no pod and no container (not a Kubernetes pod?)")]
    NotAPod,
    #[error("the process's cgroups name more than one pod ({0} and {1}): refusing to guess")]
    AmbiguousPod(String, String),
    #[error("the cgroup file has no line in the hierarchy-ID:controllers:path format")]
    Malformed,
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Finds a pod UID in one path segment: `pod<uid>` (cgroupfs) or `...-pod<uid_with_underscores>.slice`
/// (systemd).
fn pod_uid_in(segment: &str) -> Option<String> {
    let seg = segment.strip_suffix(".slice").unwrap_or(segment);
    let idx = seg.rfind("pod")?;
    // `pod` must start the segment or follow a '-' (kubepods-besteffort-pod...).
    if idx != 0 && !seg[..idx].ends_with('-') {
        return None;
    }
    let uid = &seg[idx + 3..];
    let normalized = uid.replace('_', "-");
    let parts: Vec<&str> = normalized.split('-').collect();
    let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    (lens == [8, 4, 4, 4, 12] && parts.iter().all(|p| is_hex(p))).then(|| normalized.to_ascii_lowercase())
}

/// Finds a container ID in one path segment: `<64 hex>`, or prefixed (`cri-containerd-`,
/// `crio-`, `docker-`, `containerd-`) and/or suffixed (`.scope`).
fn container_id_in(segment: &str) -> Option<String> {
    let seg = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = seg.rsplit('-').next().unwrap_or(seg);
    let id = id.rsplit(':').next().unwrap_or(id);
    (id.len() == 64 && is_hex(id)).then(|| id.to_ascii_lowercase())
}

/// Parses the content of `/proc/<pid>/cgroup`.
pub fn parse(content: &str) -> Result<CgroupIdentity, CgroupError> {
    let mut pod: Option<String> = None;
    let mut container: Option<String> = None;
    let mut any_line = false;
    for line in content.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.splitn(3, ':');
        let (Some(_id), Some(_controllers), Some(path)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        any_line = true;
        let mut line_container = None;
        for seg in path.split('/').filter(|s| !s.is_empty() && *s != "..") {
            if let Some(uid) = pod_uid_in(seg) {
                match &pod {
                    Some(p) if *p != uid => return Err(CgroupError::AmbiguousPod(p.clone(), uid)),
                    _ => pod = Some(uid),
                }
            }
            if let Some(id) = container_id_in(seg) {
                // Innermost wins (kind-in-docker: the outer docker container comes first).
                line_container = Some(id);
            }
        }
        if line_container.is_some() {
            container = line_container;
        }
    }
    if !any_line {
        return Err(CgroupError::Malformed);
    }
    if pod.is_none() && container.is_none() {
        return Err(CgroupError::NotAPod);
    }
    Ok(CgroupIdentity {
        pod_uid: pod,
        container_id: container,
    })
}

/// The start time (field 22 of `/proc/<pid>/stat`, in clock ticks since boot): with the pid it
/// identifies a process; a different value means the pid was reused.
pub fn start_time(stat: &str) -> Option<u64> {
    // `comm` (field 2) may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b";
    const CID: &str = "4b5e0e7f0d8f1c2b3a4e5d6c7b8a9f0e1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a";
    const OUTER: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn both() -> CgroupIdentity {
        CgroupIdentity {
            pod_uid: Some(UID.into()),
            container_id: Some(CID.into()),
        }
    }

    #[test]
    fn every_real_shape() {
        let u = UID.replace('-', "_");
        let cases = [
            // cgroup v1, cgroupfs driver
            format!(
                "12:memory:/kubepods/burstable/pod{UID}/{CID}\n11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}\n"
            ),
            // cgroup v2, systemd driver, containerd
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope\n"
            ),
            // CRI-O, systemd
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{CID}.scope\n"
            ),
            // docker (dockershim), systemd
            format!("0::/kubepods.slice/kubepods-pod{u}.slice/docker-{CID}.scope\n"),
            // kind: a node in docker, the pod inside it
            format!("0::/docker/{OUTER}/kubepods/besteffort/pod{UID}/{CID}\n"),
            // guaranteed QoS (no QoS slice), cgroupfs v2
            format!("0::/kubepods/pod{UID}/{CID}\n"),
            // cgroup namespace relative path that still shows the pod
            format!("0::/../../kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope\n"),
        ];
        for c in &cases {
            assert_eq!(parse(c).unwrap(), both(), "{c}");
        }
        // Relative path with only the container: the pod is found by container ID.
        let rel = parse(&format!("0::/../crio-{CID}.scope\n")).unwrap();
        assert_eq!((rel.pod_uid, rel.container_id.as_deref()), (None, Some(CID)));
    }

    #[test]
    fn rejects_what_is_not_one_pod() {
        assert_eq!(
            parse("0::/user.slice/user-1000.slice/session-2.scope\n"),
            Err(CgroupError::NotAPod)
        );
        assert_eq!(parse("garbage"), Err(CgroupError::Malformed));
        let other = "11111111-2222-3333-4444-555555555555";
        let two = format!("0::/kubepods/pod{UID}/pod{other}/{CID}\n");
        assert!(matches!(parse(&two), Err(CgroupError::AmbiguousPod(..))));
        let two_lines = format!("1:cpu:/kubepods/pod{UID}/{CID}\n2:memory:/kubepods/pod{other}/{CID}\n");
        assert!(matches!(parse(&two_lines), Err(CgroupError::AmbiguousPod(..))));
        // A nested cgroup a process made for itself still names only its own pod.
        let nested = format!("0::/kubepods/pod{UID}/{CID}/my-sub-cgroup\n");
        assert_eq!(parse(&nested).unwrap(), both());
        // Look-alikes are not pods.
        assert_eq!(
            parse("0::/kubepods/podcast/notahexid\n"),
            Err(CgroupError::NotAPod)
        );
    }

    #[test]
    fn start_time_survives_odd_process_names() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("nonsense"), None);
    }
}

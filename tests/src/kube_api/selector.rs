//! Field and label selectors, as far as elector and kubectl use them.
//!
//! Field selectors: `field=value`, `field==value`, `field!=value`, comma-separated, on the fields
//! [`super::resources::field_value`] knows. Label selectors: equality (`k=v`, `k==v`, `k!=v`),
//! existence (`k`, `!k`) and sets (`k in (a,b)`, `k notin (a,b)`).

use serde_json::Value;

use super::resources::field_value;

#[derive(Debug, Clone, PartialEq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed selector pair.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector {
    fields: Vec<Req>,
    labels: Vec<Req>,
}

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect()
}

fn parse_eq(part: &str) -> Option<Req> {
    if let Some((k, v)) = part.split_once("!=") {
        return Some(Req::Ne(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = part.split_once("==") {
        return Some(Req::Eq(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = part.split_once('=') {
        return Some(Req::Eq(k.trim().into(), v.trim().into()));
    }
    None
}

fn parse_set(part: &str) -> Option<Req> {
    let (head, rest) = part.split_once('(')?;
    let values: Vec<String> = rest
        .strip_suffix(')')?
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    let mut words = head.split_whitespace();
    let key = words.next()?.to_string();
    match words.next()? {
        "in" => Some(Req::In(key, values)),
        "notin" => Some(Req::NotIn(key, values)),
        _ => None,
    }
}

impl Selector {
    /// Parses `fieldSelector` and `labelSelector` query values. The error is the message the
    /// real server would put in a 400.
    pub fn parse(field: Option<&str>, label: Option<&str>) -> Result<Self, String> {
        let mut sel = Selector::default();
        if let Some(f) = field {
            for part in split_top(f) {
                let req = parse_eq(part).ok_or_else(|| format!("invalid field selector: {part:?}"))?;
                let key = match &req {
                    Req::Eq(k, _) | Req::Ne(k, _) => k.clone(),
                    _ => unreachable!("parse_eq only yields Eq and Ne"),
                };
                if field_value(&Value::Null, &key).is_none() {
                    return Err(format!("field label not supported: {key}"));
                }
                sel.fields.push(req);
            }
        }
        if let Some(l) = label {
            for part in split_top(l) {
                let req = if part.contains('(') {
                    parse_set(part)
                } else if let Some(k) = part.strip_prefix('!') {
                    Some(Req::NotExists(k.trim().into()))
                } else if part.contains('=') {
                    parse_eq(part)
                } else {
                    Some(Req::Exists(part.into()))
                };
                sel.labels
                    .push(req.ok_or_else(|| format!("unable to parse requirement: {part:?}"))?);
            }
        }
        Ok(sel)
    }

    /// Whether the object matches every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let fields_ok = self.fields.iter().all(|r| match r {
            Req::Eq(k, v) => field_value(object, k) == Some(v.as_str()),
            Req::Ne(k, v) => field_value(object, k) != Some(v.as_str()),
            _ => true,
        });
        let labels = &object["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        fields_ok
            && self.labels.iter().all(|r| match r {
                Req::Eq(k, v) => label(k) == Some(v.as_str()),
                Req::Ne(k, v) => label(k) != Some(v.as_str()),
                Req::Exists(k) => label(k).is_some(),
                Req::NotExists(k) => label(k).is_none(),
                Req::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                Req::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_and_label() {
        let pod = json!({"metadata":{"name":"a","namespace":"d","labels":{"app":"x","tier":"web"}},"spec":{"nodeName":"n1"}});
        let s = Selector::parse(
            Some("spec.nodeName=n1,metadata.name!=b"),
            Some("app=x,tier in (web,db),!gone"),
        )
        .unwrap();
        assert!(s.matches(&pod));
        let s = Selector::parse(Some("spec.nodeName=n2"), None).unwrap();
        assert!(!s.matches(&pod));
        let s = Selector::parse(None, Some("tier notin (web)")).unwrap();
        assert!(!s.matches(&pod));
        assert!(Selector::parse(Some("spec.bogus=1"), None).is_err());
    }
}

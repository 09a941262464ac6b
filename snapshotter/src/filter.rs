//! containerd's filter syntax, as List (Walk) takes it:
//!
//! ```text
//! filters  := filter ("OR" between list entries)
//! filter   := selector ("," selector)*        // AND
//! selector := fieldpath [op value]            // no op: the field is present
//! op       := "==" | "!=" | "~="              // ~= is a regular expression
//! fieldpath:= field ("." field)*, a field may be "quoted"; values may be "quoted"
//! ```
//!
//! For snapshots the fields are name, parent, kind and labels.KEY.

use crate::error::{Error, Result};
use crate::snapshots::Info;

#[derive(Debug, Clone)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Matches(regex::Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// Filters combined with OR; each is selectors combined with AND.
#[derive(Debug, Clone, Default)]
pub struct Filters(Vec<Vec<Selector>>);

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Filters> {
        let mut out = Vec::new();
        for f in filters {
            if f.trim().is_empty() {
                continue;
            }
            out.push(
                parse_filter(f)
                    .map_err(|e| Error::InvalidArgument(format!("filter {f:?}: {e}")))?,
            );
        }
        Ok(Filters(out))
    }

    pub fn matches(&self, info: &Info) -> bool {
        self.0.is_empty() || self.0.iter().any(|all| all.iter().all(|s| s.matches(info)))
    }
}

impl Selector {
    fn field<'a>(&self, info: &'a Info) -> Option<std::borrow::Cow<'a, str>> {
        match self.path.first().map(String::as_str) {
            Some("name") if self.path.len() == 1 => Some(info.name.as_str().into()),
            // containerd's adaptor reports parent as present even when
            // empty, so `parent==""` selects snapshots without a parent (its
            // metadata layer filters that way for a remote snapshot's base).
            Some("parent") if self.path.len() == 1 => {
                Some(info.parent.as_deref().unwrap_or("").into())
            }
            Some("kind") if self.path.len() == 1 => Some(info.kind.to_string().into()),
            Some("labels") if self.path.len() >= 2 => info
                .labels
                .get(&self.path[1..].join("."))
                .map(|v| v.as_str().into()),
            _ => None,
        }
    }

    fn matches(&self, info: &Info) -> bool {
        let v = self.field(info);
        match &self.op {
            Op::Present => v.is_some(),
            Op::Eq(want) => v.is_some_and(|v| v == want.as_str()),
            // As containerd: an absent field reads as "" for !=.
            Op::Ne(want) => v.as_deref().unwrap_or("") != want.as_str(),
            Op::Matches(re) => v.is_some_and(|v| re.is_match(&v)),
        }
    }
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c == b' ' || c == b'\t') {
            self.i += 1;
        }
    }
    fn quoted(&mut self) -> std::result::Result<String, String> {
        let q = self.s[self.i];
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            if c == b'\\' {
                if let Some(n) = self.peek() {
                    out.push(n);
                    self.i += 1;
                }
            } else if c == q {
                return String::from_utf8(out).map_err(|e| e.to_string());
            } else {
                out.push(c);
            }
        }
        Err("unterminated quote".into())
    }
    /// A bare word: up to a delimiter.
    fn word(&mut self, stop: &[u8]) -> String {
        let start = self.i;
        while self.peek().is_some_and(|c| !stop.contains(&c)) {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i])
            .trim()
            .to_string()
    }
}

fn parse_filter(f: &str) -> std::result::Result<Vec<Selector>, String> {
    let mut lx = Lexer {
        s: f.as_bytes(),
        i: 0,
    };
    let mut sels = Vec::new();
    loop {
        lx.skip_ws();
        let mut path = Vec::new();
        loop {
            lx.skip_ws();
            let part = match lx.peek() {
                Some(b'"') | Some(b'/') => lx.quoted()?,
                Some(_) => lx.word(b".,=!~ \t"),
                None => String::new(),
            };
            if part.is_empty() {
                return Err("empty field name".into());
            }
            path.push(part);
            lx.skip_ws();
            if lx.peek() == Some(b'.') {
                lx.i += 1;
                continue;
            }
            break;
        }
        lx.skip_ws();
        let rest = &lx.s[lx.i..];
        let op = if rest.starts_with(b"==") || rest.starts_with(b"!=") || rest.starts_with(b"~=") {
            let kind = rest[0];
            lx.i += 2;
            lx.skip_ws();
            let value = match lx.peek() {
                Some(b'"') | Some(b'/') => lx.quoted()?,
                _ => lx.word(b","),
            };
            match kind {
                b'=' => Op::Eq(value),
                b'!' => Op::Ne(value),
                _ => Op::Matches(regex::Regex::new(&value).map_err(|e| e.to_string())?),
            }
        } else {
            Op::Present
        };
        sels.push(Selector { path, op });
        lx.skip_ws();
        match lx.peek() {
            None => return Ok(sels),
            Some(b',') => lx.i += 1,
            Some(c) => return Err(format!("unexpected {:?}", c as char)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshots::Kind;
    use std::collections::BTreeMap;

    fn info(name: &str, parent: Option<&str>, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.map(Into::into),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created: 0,
            updated: 0,
        }
    }

    #[test]
    fn containerd_filter_forms() {
        let a = info(
            "a",
            None,
            Kind::Committed,
            &[("containerd.io/gc.root", "x"), ("k", "v1")],
        );
        let b = info("b", Some("a"), Kind::Active, &[("k", "v2")]);
        let f = |fs: &[&str]| {
            Filters::parse(&fs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        assert!(f(&["name==a"]).matches(&a) && !f(&["name==a"]).matches(&b));
        assert!(f(&["parent==a"]).matches(&b) && !f(&["parent==a"]).matches(&a));
        assert!(f(&["kind==active"]).matches(&b));
        assert!(f(&["labels.k==v2"]).matches(&b));
        assert!(
            f(&["labels.\"containerd.io/gc.root\""]).matches(&a),
            "quoted field with dots, presence"
        );
        assert!(f(&["kind!=active,labels.k"]).matches(&a), "AND");
        assert!(
            !f(&["parent!=\"\""]).matches(&a) && f(&["parent!=\"\""]).matches(&b),
            "absent reads as empty"
        );
        assert!(
            f(&["parent==\"\""]).matches(&a) && !f(&["parent==\"\""]).matches(&b),
            "no parent equals the empty string, as containerd's adaptor has it"
        );
        assert!(f(&["parent"]).matches(&a), "parent is always present");
        assert!(f(&["labels.missing!=x"]).matches(&a));
        assert!(!f(&["kind!=active,labels.k==v2"]).matches(&a));
        let or = f(&["name==a", "name==b"]);
        assert!(or.matches(&a) && or.matches(&b), "OR across filters");
        assert!(f(&["labels.k~=^v[0-9]$"]).matches(&a));
        assert!(f(&["name==\"a\""]).matches(&a));
        assert!(f(&[]).matches(&a));
        assert!(Filters::parse(&["==x".into()]).is_err());
        assert!(Filters::parse(&["name==\"x".into()]).is_err());
    }
}

//! Parsing Envoy's `x-forwarded-client-cert` header.
//!
//! Elements are separated by `,`, key/value pairs by `;`; values may be
//! double-quoted (with `\"` escapes) and then contain `,` `;` `=`. Only the
//! `URI` keys are kept: a certificate with several URI SANs has several.

/// One element: the URI SANs of one certificate, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Element {
    /// Every `URI=` value.
    pub uris: Vec<String>,
}

/// Parses a header value into its elements (malformed pairs are skipped).
pub fn parse(value: &str) -> Vec<Element> {
    split_outside_quotes(value, ',')
        .into_iter()
        .map(|element| Element {
            uris: split_outside_quotes(&element, ';')
                .into_iter()
                .filter_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    key.trim()
                        .eq_ignore_ascii_case("uri")
                        .then(|| unquote(value.trim()))
                })
                .collect(),
        })
        .collect()
}

fn split_outside_quotes(s: &str, separator: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in s.chars() {
        match c {
            _ if escaped => {
                escaped = false;
                current.push(c);
            }
            '\\' if quoted => {
                escaped = true;
                current.push(c);
            }
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            c if c == separator && !quoted => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    parts
}

fn unquote(value: &str) -> String {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_and_uris() {
        let header = r#"By=spiffe://gcp.company.com/gw;Hash=abc;Subject="CN=a,O=b";URI=spiffe://aws.company.com/ns/a/sa/x,By=spiffe://gcp.company.com/ns/s/sa/svc;URI=spiffe://gcp.company.com/gw;URI=spiffe://evil.example/x;DNS=a.b"#;
        let elements = parse(header);
        assert_eq!(elements.len(), 2);
        assert_eq!(elements[0].uris, vec!["spiffe://aws.company.com/ns/a/sa/x"]);
        assert_eq!(
            elements[1].uris,
            vec!["spiffe://gcp.company.com/gw", "spiffe://evil.example/x"]
        );
        assert_eq!(parse("URI=")[0].uris, vec![""]);
        assert_eq!(
            parse(r#"URI="spiffe://a.org/x;y""#)[0].uris,
            vec!["spiffe://a.org/x;y"]
        );
        assert!(parse("Hash=1")[0].uris.is_empty());
    }
}

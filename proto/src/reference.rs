//! Image references, parsed with Docker's grammar (distribution/reference) into oci-spec's
//! `Reference`. oci-spec's own parser compiles that grammar with Unicode `\w` under `{0,127}`
//! (the tag): an automaton of about 12 MB that stays resident for the life of the process —
//! two thirds of an idle agent — and that accepts tags with non-ASCII letters, which Docker's
//! grammar (Go's `\w` is ASCII) and every runtime refuse. The same grammar compiled in ASCII
//! mode takes about 0.2 MB; what oci-spec does after its match (the Docker Hub defaults, the
//! digest checks) is done here the same way, so a reference oci-spec accepts comes out equal
//! (checked against oci-spec in the tests, over generated references).

use std::sync::LazyLock;

pub use oci_spec::distribution::{ParseError, Reference};
use regex::{Regex, RegexBuilder};

/// Docker's reference grammar, anchored: name (domain and path), tag, digest.
const GRAMMAR: &str = concat!(
    r"^(",
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])",
    r"(?:(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))+)?(?::[0-9]+)?/)?",
    r"[a-z0-9]+(?:(?:(?:[._]|__|[-]*)[a-z0-9]+)+)?",
    r"(?:(?:/[a-z0-9]+(?:(?:(?:[._]|__|[-]*)[a-z0-9]+)+)?)+)?",
    r")",
    r"(?::([\w][\w.-]{0,127}))?",
    r"(?:@([A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][[:xdigit:]]{32,}))?$",
);

const NAME_TOTAL_LENGTH_MAX: usize = 255;
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";

static REFERENCE: LazyLock<Option<Regex>> = LazyLock::new(|| RegexBuilder::new(GRAMMAR).unicode(false).build().ok());

/// Parses `s` as Docker does: `busybox` is `docker.io/library/busybox:latest`.
pub fn parse(s: &str) -> Result<Reference, ParseError> {
    if s.is_empty() {
        return Err(ParseError::NameEmpty);
    }
    // The grammar is a constant the tests compile; `None` cannot happen, and would refuse
    // every reference rather than panic.
    let grammar = REFERENCE.as_ref().ok_or(ParseError::ReferenceInvalidFormat)?;
    let Some(parts) = grammar.captures(s) else {
        if grammar.is_match(&s.to_ascii_lowercase()) {
            return Err(ParseError::NameContainsUppercase);
        }
        return Err(ParseError::ReferenceInvalidFormat);
    };
    let name = parts.get(1).map_or("", |m| m.as_str());
    let tag = parts.get(2).map(|m| m.as_str().to_string());
    let digest = parts.get(3).map(|m| m.as_str().to_string());
    let (registry, repository) = split_domain(name);
    if repository.len() > NAME_TOTAL_LENGTH_MAX {
        return Err(ParseError::NameTooLong);
    }
    if let Some(digest) = &digest {
        check_digest(digest)?;
    }
    Ok(match (tag, digest) {
        (Some(tag), Some(digest)) => Reference::with_tag_and_digest(registry, repository, tag, digest),
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest),
        (tag, None) => Reference::with_tag(registry, repository, tag.unwrap_or_else(|| "latest".into())),
    })
}

/// The registry and the repository of a matched name: the first component is a registry only
/// when it looks like a host (a dot, a port, or `localhost`); Docker Hub's official images
/// live under `library/`.
fn split_domain(name: &str) -> (String, String) {
    let (mut registry, mut repository) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (first, rest.to_string()),
        _ => (DOCKER_HUB, name.to_string()),
    };
    if registry == DOCKER_HUB_LEGACY {
        registry = DOCKER_HUB;
    }
    if registry == DOCKER_HUB && !repository.contains('/') {
        repository = format!("library/{repository}");
    }
    (registry.to_string(), repository)
}

/// A digest's hex part must be as long as its algorithm's output; other algorithms are refused.
fn check_digest(digest: &str) -> Result<(), ParseError> {
    let (algorithm, hex) = digest.split_once(':').ok_or(ParseError::DigestInvalidFormat)?;
    let expected = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err(ParseError::DigestUnsupported),
    };
    if hex.len() == expected {
        Ok(())
    } else {
        Err(ParseError::DigestInvalidLength)
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use proptest::prelude::*;

    use super::*;

    const D: &str = "sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa";

    #[test]
    fn the_grammar_compiles() {
        assert!(REFERENCE.is_some());
    }

    #[test]
    fn docker_s_normalisation() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("index.docker.io/busybox:1", "docker.io/library/busybox:1"),
            ("team/app:2", "docker.io/team/app:2"),
            ("localhost/app", "localhost/app:latest"),
            ("127.0.0.1:5000/a/b:c", "127.0.0.1:5000/a/b:c"),
            ("test.com:5000", "docker.io/library/test.com:5000"),
            ("Registry.Example/app:v1", "Registry.Example/app:v1"),
        ];
        for (input, whole) in cases {
            assert_eq!(parse(input).map(|r| r.whole()), Ok(whole.to_string()), "{input}");
        }
        let r = parse(&format!("quay.io/x/y:1@{D}")).unwrap();
        assert_eq!((r.registry(), r.repository(), r.tag(), r.digest()), ("quay.io", "x/y", Some("1"), Some(D)));
        let r = parse(&format!("quay.io/x/y@{D}")).unwrap();
        assert_eq!((r.tag(), r.digest()), (None, Some(D)));
    }

    #[test]
    fn what_docker_refuses_is_refused_with_oci_spec_s_reasons() {
        assert_eq!(parse(""), Err(ParseError::NameEmpty));
        assert_eq!(parse("Busybox"), Err(ParseError::NameContainsUppercase));
        assert_eq!(parse("busy box"), Err(ParseError::ReferenceInvalidFormat));
        assert_eq!(parse("busybox:é"), Err(ParseError::ReferenceInvalidFormat), "Go's \\w is ASCII");
        assert_eq!(parse(&format!("busybox:{}", "t".repeat(129))), Err(ParseError::ReferenceInvalidFormat));
        assert_eq!(parse(&format!("a/{}", "b".repeat(255))), Err(ParseError::NameTooLong));
        assert_eq!(parse(&format!("busybox@sha256:{}", "a".repeat(63))), Err(ParseError::DigestInvalidLength));
        assert_eq!(parse(&format!("busybox@md5:{}", "a".repeat(32))), Err(ParseError::DigestUnsupported));
    }

    /// Strings built from the grammar's own pieces, so most of them are references (random
    /// bytes almost never are) and the rest fail at one place or another.
    fn reference_like() -> impl Strategy<Value = String> {
        let component = prop_oneof![4 => "[a-z0-9]{1,4}(([._]|__|-{1,2})[a-z0-9]{1,3})?", 1 => "[a-zA-Z0-9._-]{1,5}"];
        let domain = prop_oneof![
            Just(String::new()),
            "[a-zA-Z0-9-]{1,6}(\\.[a-zA-Z0-9-]{1,4}){0,2}(:[0-9]{1,5})?/",
            Just("localhost/".to_string()),
            Just("index.docker.io/".to_string()),
        ];
        let tag = prop_oneof![
            2 => Just(String::new()),
            2 => ":[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,10}",
            1 => ":[a-zA-Z0-9_][a-zA-Z0-9_.-]{120,130}",
            1 => ":[^@/]{1,4}",
        ];
        let digest = prop_oneof![
            3 => Just(String::new()),
            2 => "@sha256:[0-9a-fA-F]{64}",
            1 => "@sha(256|384|512):[0-9a-fA-F]{32,130}",
            1 => "@[a-z]{2,6}([+._-][a-z]{1,3})?:[0-9a-f]{32,70}",
        ];
        (domain, proptest::collection::vec(component, 1..4), tag, digest)
            .prop_map(|(domain, path, tag, digest)| format!("{domain}{}{tag}{digest}", path.join("/")))
    }

    proptest! {
        #[test]
        fn accepts_what_oci_spec_accepts_in_ascii_and_builds_the_same(s in reference_like()) {
            let ours = parse(&s);
            if !s.is_ascii() {
                // Where oci-spec's Unicode `\w` lets a tag through, Docker's grammar does not.
                prop_assert!(ours.is_err(), "{s} accepted");
            } else if let Ok(theirs) = Reference::from_str(&s) {
                prop_assert_eq!(ours, Ok(theirs));
            } else {
                prop_assert!(ours.is_err(), "{s} accepted, oci-spec refuses it");
            }
        }

        #[test]
        fn never_panics_on_any_text(s in "\\PC{0,300}") {
            let _ = parse(&s);
        }
    }
}

//! The image list in KIP's `IMAGES` syntax (`name=image;name=image;`), parsed strictly.
//! KIP skips malformed entries silently; kip rejects the whole list and names the entry,
//! so a typo never turns into an image that is quietly not cached.

use std::fmt;

pub use crate::reference::Reference;

/// One entry of the list: the user's name for it and the normalized image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    pub name: String,
    /// The reference as written by the user (shown in logs and metrics).
    pub image: String,
    /// Fully qualified reference (`docker.io/library/busybox:latest`), as the CRI reports it.
    pub reference: String,
    /// Registry host used to look up credentials (`docker.io`, `quay.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// True when pinned to a digest: such an image never needs a refresh pull.
    pub by_digest: bool,
}

/// An ordered, duplicate-free list of images.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageList {
    entries: Vec<ImageEntry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageListError {
    #[error("IMAGES holds no entry (`{raw}`): list images as `name=image;name=image;`, or set IMAGES to `{NO_IMAGES}` to cache none")]
    NoEntries { raw: String },
    #[error("IMAGES entry {index} `{entry}`: expected `name=image`")]
    MissingEquals { index: usize, entry: String },
    #[error("IMAGES entry {index} `{entry}`: the name is empty")]
    EmptyName { index: usize, entry: String },
    #[error("IMAGES entry {index} `{entry}`: the image is empty")]
    EmptyImage { index: usize, entry: String },
    #[error("IMAGES entry {index} `{entry}`: the name `{name}` is used more than once")]
    DuplicateName { index: usize, entry: String, name: String },
    #[error("IMAGES entry {index} `{entry}`: `{image}` is not a valid image reference: {reason}")]
    InvalidReference { index: usize, entry: String, image: String, reason: String },
    #[error("IMAGES entry {index} `{entry}`: the name `{name}` is not a valid container name (lowercase letters, digits and `-`, at most 63 characters, starting and ending with a letter or digit)")]
    InvalidName { index: usize, entry: String, name: String },
}

/// The one way to say "no images": a value without entries (`;`, blanks) is far more likely a
/// mistake, and an empty list makes every agent unpin everything and every gate open.
pub const NO_IMAGES: &str = "none";

impl ImageList {
    /// Parses KIP's `name=image;name=image;` syntax. At least one entry, unless the value is
    /// exactly [`NO_IMAGES`].
    pub fn parse(raw: &str) -> Result<Self, ImageListError> {
        if raw.trim() == NO_IMAGES {
            return Ok(Self::default());
        }
        let mut list = Self::default();
        let raw_entries = raw.split(';').map(str::trim).filter(|e| !e.is_empty());
        for (i, entry) in raw_entries.enumerate() {
            let index = i + 1;
            let (name, image) = entry
                .split_once('=')
                .ok_or_else(|| ImageListError::MissingEquals { index, entry: entry.to_string() })?;
            list.push(index, entry, name.trim(), image.trim())?;
        }
        if list.is_empty() {
            return Err(ImageListError::NoEntries { raw: raw.trim().to_string() });
        }
        Ok(list)
    }

    /// Builds a list from `(name, image)` pairs (as the coordinator sends them), with the same rules.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, ImageListError> {
        let mut list = Self::default();
        for (i, (name, image)) in pairs.into_iter().enumerate() {
            list.push(i + 1, &format!("{name}={image}"), name.trim(), image.trim())?;
        }
        Ok(list)
    }

    fn push(&mut self, index: usize, entry: &str, name: &str, image: &str) -> Result<(), ImageListError> {
        let owned = || entry.to_string();
        if name.is_empty() {
            return Err(ImageListError::EmptyName { index, entry: owned() });
        }
        if image.is_empty() {
            return Err(ImageListError::EmptyImage { index, entry: owned() });
        }
        // The name becomes a container name in the fallback DaemonSet: an RFC 1123 label.
        if !is_dns_label(name) {
            return Err(ImageListError::InvalidName { index, entry: owned(), name: name.into() });
        }
        if self.entries.iter().any(|e| e.name == name) {
            return Err(ImageListError::DuplicateName { index, entry: owned(), name: name.into() });
        }
        let parsed = crate::reference::parse(image).map_err(|e| ImageListError::InvalidReference {
            index,
            entry: owned(),
            image: image.into(),
            reason: e.to_string(),
        })?;
        self.entries.push(ImageEntry {
            name: name.to_string(),
            image: image.to_string(),
            reference: parsed.to_string(),
            registry: parsed.registry().to_string(),
            by_digest: parsed.digest().is_some(),
        });
        Ok(())
    }

    pub fn entries(&self) -> &[ImageEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains_reference(&self, reference: &str) -> bool {
        self.entries.iter().any(|e| e.reference == reference)
    }
}

impl fmt::Display for ImageList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.entries {
            write!(f, "{}={};", e.name, e.image)?;
        }
        Ok(())
    }
}

/// Checks one image reference (KIP_IMAGE, say) with the same rules as IMAGES entries.
pub fn parse_reference(image: &str) -> Result<Reference, String> {
    crate::reference::parse(image).map_err(|e| format!("`{image}` is not a valid image reference: {e}"))
}

/// A Kubernetes DNS label (RFC 1123): 1–63 lowercase letters, digits and `-`, starting and
/// ending with a letter or digit (an IMAGES name, a namespace).
pub fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A Kubernetes DNS subdomain (RFC 1123): DNS labels joined by `.`, at most 253 characters (the
/// name of a Secret, a DaemonSet).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kip_syntax_with_whitespace_and_trailing_semicolon() {
        let list = ImageList::parse(" java11 = quay.io/eclipse/che-java11-maven:next ;\n busybox=busybox; ").unwrap();
        let e = list.entries();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].name, "java11");
        assert_eq!(e[0].image, "quay.io/eclipse/che-java11-maven:next");
        assert_eq!(e[0].reference, "quay.io/eclipse/che-java11-maven:next");
        assert_eq!(e[0].registry, "quay.io");
        assert_eq!(e[1].reference, "docker.io/library/busybox:latest");
        assert_eq!(e[1].registry, "docker.io");
        assert!(!e[1].by_digest);
        assert_eq!(list.to_string(), "java11=quay.io/eclipse/che-java11-maven:next;busybox=busybox;");
    }

    #[test]
    fn an_empty_list_must_be_said_with_none() {
        assert!(ImageList::parse("none").unwrap().is_empty());
        assert!(ImageList::parse(" none\n").unwrap().is_empty());
        for raw in ["", ";", " ; ;", "\n"] {
            let e = ImageList::parse(raw).unwrap_err().to_string();
            assert!(e.starts_with("IMAGES holds no entry") && e.contains("`none`"), "{raw:?}: {e}");
        }
        assert_eq!(
            ImageList::parse("none;a=busybox").unwrap_err().to_string(),
            "IMAGES entry 1 `none`: expected `name=image`",
            "`none` is not an entry"
        );
    }

    #[test]
    fn digest_reference_is_recognised() {
        let d = "sha256:0123456789012345678901234567890123456789012345678901234567890123";
        let list = ImageList::parse(&format!("a=127.0.0.1:5000/x/y@{d}")).unwrap();
        assert!(list.entries()[0].by_digest);
        assert_eq!(list.entries()[0].registry, "127.0.0.1:5000");
    }

    #[test]
    fn missing_equals_names_the_entry() {
        let err = ImageList::parse("a=busybox;nginx").unwrap_err();
        assert_eq!(err.to_string(), "IMAGES entry 2 `nginx`: expected `name=image`");
    }

    #[test]
    fn empty_name_and_image_are_rejected() {
        assert_eq!(
            ImageList::parse("=busybox").unwrap_err().to_string(),
            "IMAGES entry 1 `=busybox`: the name is empty"
        );
        assert_eq!(
            ImageList::parse("a=busybox; b = ").unwrap_err().to_string(),
            "IMAGES entry 2 `b =`: the image is empty"
        );
    }

    #[test]
    fn duplicate_name_is_rejected() {
        let err = ImageList::parse("a=busybox;a=nginx").unwrap_err();
        assert_eq!(err.to_string(), "IMAGES entry 2 `a=nginx`: the name `a` is used more than once");
    }

    #[test]
    fn unparsable_reference_is_rejected_with_reason() {
        let err = ImageList::parse("a=Busy Box:1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "IMAGES entry 1 `a=Busy Box:1`: `Busy Box:1` is not a valid image reference: invalid reference format"
        );
        let err = ImageList::parse("a=busybox@sha256:abc").unwrap_err();
        assert!(err.to_string().contains("`busybox@sha256:abc` is not a valid image reference"), "{err}");
    }

    #[test]
    fn pairs_follow_the_same_rules() {
        let list = ImageList::from_pairs([("a", "busybox"), ("b", "quay.io/x/y:1")]).unwrap();
        assert_eq!(list.to_string(), "a=busybox;b=quay.io/x/y:1;");
        let err = ImageList::from_pairs([("a", "busybox"), ("a", "nginx")]).unwrap_err();
        assert_eq!(err.to_string(), "IMAGES entry 2 `a=nginx`: the name `a` is used more than once");
    }

    #[test]
    fn container_name_rules_apply_to_names() {
        let err = ImageList::parse("Java_11=busybox").unwrap_err();
        assert!(matches!(err, ImageListError::InvalidName { ref name, .. } if name == "Java_11"), "{err}");
        assert!(ImageList::parse("-a=busybox").is_err());
        assert!(ImageList::parse(&format!("{}=busybox", "a".repeat(64))).is_err());
        assert!(ImageList::parse(&format!("{}=busybox", "a".repeat(63))).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_a_refusal_names_its_entry(raw in "[a-z0-9=;:/@. \n-]{0,80}|\\PC{0,80}") {
            if let Err(e) = ImageList::parse(&raw) {
                let named = e.to_string().starts_with("IMAGES entry ") || matches!(e, ImageListError::NoEntries { .. });
                proptest::prop_assert!(named, "{e}");
            }
        }

        #[test]
        fn a_parsed_list_written_out_parses_to_itself(
            entries in proptest::collection::btree_map("[a-z][a-z0-9-]{0,8}[a-z0-9]", "([a-z0-9]{1,6}\\.[a-z]{2,3}(:[0-9]{2,4})?/)?[a-z0-9]{1,6}(/[a-z0-9]{1,6})?(:[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,8})?", 1..6),
        ) {
            let raw: String = entries.iter().map(|(n, i)| format!("{n}={i};")).collect();
            let list = ImageList::parse(&raw).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            proptest::prop_assert_eq!(list.len(), entries.len());
            proptest::prop_assert_eq!(ImageList::parse(&list.to_string()), Ok(list));
        }
    }
}

//! The image sets' pull secrets. The leader copies each Secret a set in use names
//! (`spec.imagePullSecrets`, in the set's namespace) into one Secret of its own namespace (the
//! chart's `<release>-set-pull-secrets`), one key per `<namespace>.<secret>`, each a
//! `.dockerconfigjson`; every agent mounts that Secret (`--set-pull-secrets-dir`) and is told
//! which keys go with which image. Credentials so reach the nodes as any mounted Secret does
//! (API server to kubelet), never on kip's own gRPC API, which is plain HTTP/2 in the cluster.
//!
//! The coordinator may only `get` Secrets — listing or watching them would read every Secret of a
//! namespace — so it reads the named ones (and its copy) whenever the sets change and again every
//! [`REREAD`] (a rotated secret reaches the copy within that, then the kubelet's own refresh),
//! and writes the copy only where it differs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::sets::{secret_key, Accepted};
use crate::state::{SecretProblems, State};

/// How often the named Secrets are read again (rotation).
pub const REREAD: Duration = Duration::from_secs(60);

/// What the copy may hold at most: a Secret holds 1 MiB, and the rest is its metadata.
const MAX_COPY_BYTES: usize = 900 * 1024;

const DOCKERCONFIGJSON: &str = "kubernetes.io/dockerconfigjson";
const DOCKERCFG: &str = "kubernetes.io/dockercfg";

/// The coordinator's copy: its namespace and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copy {
    pub namespace: String,
    pub name: String,
}

/// Pure: the (namespace, secret) pairs the sets in use name.
pub fn wanted(accepted: &Accepted) -> BTreeSet<(String, String)> {
    accepted.sets.iter().flat_map(|s| s.pull_secrets.iter().map(|p| (s.namespace.clone(), p.clone()))).collect()
}

/// Pure: a Secret's registry credentials as `.dockerconfigjson` text (`{"auths": …}`), or why
/// it has none. Never says anything of the values.
pub fn docker_config(secret: &Secret) -> Result<String, String> {
    let type_ = secret.type_.as_deref().unwrap_or("Opaque");
    let data = |key: &str| {
        secret.data.as_ref().and_then(|d| d.get(key)).ok_or_else(|| format!("a {type_} Secret without its `{key}` key"))
    };
    // serde_json's messages name a line and column, never the input.
    let json = |bytes: &ByteString, key: &str| {
        serde_json::from_slice::<serde_json::Value>(&bytes.0).map_err(|e| format!("`{key}` is not JSON: {e}"))
    };
    let auths = match type_ {
        DOCKERCONFIGJSON => {
            let config = json(data(".dockerconfigjson")?, ".dockerconfigjson")?;
            config.get("auths").cloned().ok_or("`.dockerconfigjson` has no `auths`")?
        }
        DOCKERCFG => json(data(".dockercfg")?, ".dockercfg")?,
        other => {
            return Err(format!("type `{other}` is not a registry pull secret ({DOCKERCONFIGJSON} or {DOCKERCFG})"))
        }
    };
    if !auths.is_object() {
        return Err("its registries are not a JSON object".into());
    }
    Ok(serde_json::json!({ "auths": auths }).to_string())
}

/// What reading one named Secret gave: the Secret, `None` when there is none, or why it could
/// not be read.
pub type Read = Result<Option<Secret>, String>;

/// Pure: the copy's data from what was read, and what could not go in (by namespace and
/// secret). Keys go in name order until the copy is full.
pub fn copy_of(read: &BTreeMap<(String, String), Read>) -> (BTreeMap<String, ByteString>, SecretProblems) {
    let mut data = BTreeMap::new();
    let mut problems = SecretProblems::new();
    let mut size = 0;
    for ((namespace, name), got) in read {
        let config = match got {
            Ok(Some(secret)) => docker_config(secret),
            Ok(None) => Err(format!("no such Secret in namespace {namespace}")),
            Err(why) => Err(why.clone()),
        };
        let key = (namespace.clone(), name.clone());
        match config {
            Ok(text) if size + text.len() > MAX_COPY_BYTES => {
                problems.insert(key, "the sets' pull secrets together exceed what one Secret holds (1 MiB)".into());
            }
            Ok(text) => {
                size += text.len();
                data.insert(secret_key(namespace, name), ByteString(text.into_bytes()));
            }
            Err(why) => {
                problems.insert(key, why);
            }
        }
    }
    (data, problems)
}

/// Pure: the copy's credentials, by key (what the resolver's HEADs of the sets' tags use). Every
/// value is a `.dockerconfigjson` [`docker_config`] made, so none fails to parse.
pub fn keyrings_of(data: &BTreeMap<String, ByteString>) -> BTreeMap<String, kip::pull_secrets::Keyring> {
    data.iter()
        .filter_map(|(key, value)| {
            let mut keyring = kip::pull_secrets::Keyring::default();
            let text = std::str::from_utf8(&value.0).ok()?;
            keyring.add_file(std::path::Path::new(key), text).ok()?;
            Some((key.clone(), keyring))
        })
        .collect()
}

/// Why the API refused a read, in words an admin acts on.
fn read_error(e: &kube::Error, namespace: &str) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "the coordinator may not read Secrets in namespace {namespace} (the chart grants it where image sets are allowed: imageSets.namespaces)"
        ),
        other => format!("reading it failed: {other}"),
    }
}

/// The leader: keeps the copy in line with the sets in use. Without a copy (`None`: the chart's
/// `imageSets.pullSecrets` off) every named secret is said to be unused, in its set's status.
pub async fn run(client: Client, state: Arc<State>, copy: Option<Copy>, shutdown: CancellationToken) {
    let mut sets = state.subscribe_sets();
    loop {
        let accepted = sets.borrow_and_update().clone();
        if let Some(accepted) = accepted {
            let wanted = wanted(&accepted);
            let problems = match &copy {
                None => wanted
                    .into_iter()
                    .map(|k| {
                        (
                            k,
                            "not copied to the nodes: pull secrets for image sets are off (imageSets.pullSecrets)"
                                .into(),
                        )
                    })
                    .collect(),
                Some(copy) => {
                    let mut read = BTreeMap::new();
                    for (namespace, name) in wanted {
                        let api = Api::<Secret>::namespaced(client.clone(), &namespace);
                        let got = api.get_opt(&name).await.map_err(|e| read_error(&e, &namespace));
                        read.insert((namespace, name), got);
                    }
                    let (data, mut problems) = copy_of(&read);
                    state.set_pull_secret_keyrings(keyrings_of(&data));
                    // Compared with the copy as it is (not as last written): a copy emptied by
                    // someone else (a `helm upgrade --force`) is filled again.
                    let api = Api::<Secret>::namespaced(client.clone(), &copy.namespace);
                    let live = api.get_opt(&copy.name).await.map(|s| s.and_then(|s| s.data).unwrap_or_default());
                    if live.as_ref().ok() != Some(&data) {
                        match write(&api, copy, &data).await {
                            Ok(()) => {
                                tracing::info!(secret = %copy.name, keys = data.len(), "copied the image sets' pull secrets");
                            }
                            Err(e) => {
                                let why = format!("the coordinator could not write its copy {}: {e}", copy.name);
                                tracing::warn!(error = %e, secret = %copy.name, "writing the copy of the image sets' pull secrets failed; trying again");
                                for key in read.keys() {
                                    problems.entry(key.clone()).or_insert_with(|| why.clone());
                                }
                            }
                        }
                    }
                    problems
                }
            };
            for ((namespace, name), why) in &problems {
                tracing::debug!(namespace = %namespace, secret = %name, why = %why, "an image set's pull secret is not copied");
            }
            state.set_secret_problems(problems);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = sets.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(REREAD) => {}
        }
    }
}

/// Server-side apply of the copy's data (the keys kip no longer sends go with it).
async fn write(api: &Api<Secret>, copy: &Copy, data: &BTreeMap<String, ByteString>) -> Result<(), kube::Error> {
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": copy.name, "namespace": copy.namespace},
        "type": "Opaque",
        "data": data,
    });
    api.patch(&copy.name, &PatchParams::apply("kip-coordinator").force(), &Patch::Apply(&body)).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn secret(type_: &str, key: &str, value: &str) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: Some([(key.to_string(), ByteString(value.as_bytes().to_vec()))].into()),
            ..Default::default()
        }
    }

    #[test]
    fn both_pull_secret_types_become_a_docker_config_and_others_say_why_without_values() {
        let auth = base64::engine::general_purpose::STANDARD.encode("robot:hunter2");
        let modern =
            secret(DOCKERCONFIGJSON, ".dockerconfigjson", &format!(r#"{{"auths":{{"quay.io":{{"auth":"{auth}"}}}}}}"#));
        let legacy = secret(DOCKERCFG, ".dockercfg", &format!(r#"{{"quay.io":{{"auth":"{auth}"}}}}"#));
        assert_eq!(docker_config(&modern), docker_config(&legacy));
        let text = docker_config(&modern).unwrap();
        let mut keyring = kip::pull_secrets::Keyring::default();
        keyring.add_file(std::path::Path::new("ml.regcred"), &text).unwrap();
        assert_eq!(keyring.for_registry("quay.io").map(|c| c.username.as_str()), Some("robot"));
        let opaque = secret("Opaque", "password", "hunter2");
        assert!(docker_config(&opaque).unwrap_err().contains("type `Opaque` is not a registry pull secret"));
        let broken = secret(DOCKERCONFIGJSON, ".dockerconfigjson", "{\"auths\": hunter2");
        let why = docker_config(&broken).unwrap_err();
        assert!(why.starts_with("`.dockerconfigjson` is not JSON") && !why.contains("hunter2"), "{why}");
        let empty = secret(DOCKERCONFIGJSON, "other", "{}");
        assert!(docker_config(&empty).unwrap_err().contains("without its `.dockerconfigjson` key"));
    }

    #[test]
    fn the_copy_holds_what_could_be_read_and_says_why_of_the_rest() {
        let ok = secret(DOCKERCFG, ".dockercfg", r#"{"quay.io":{"auth":"cm9ib3Q6cHc="}}"#);
        let key = |ns: &str, n: &str| (ns.to_string(), n.to_string());
        let read: BTreeMap<(String, String), Read> = [
            (key("ml", "regcred"), Ok(Some(ok))),
            (key("ml", "gone"), Ok(None)),
            (key("ci", "hidden"), Err("the coordinator may not read Secrets in namespace ci".to_string())),
        ]
        .into();
        let (data, problems) = copy_of(&read);
        assert_eq!(data.keys().collect::<Vec<_>>(), ["ml.regcred"]);
        assert_eq!(problems[&key("ml", "gone")], "no such Secret in namespace ml");
        assert!(problems[&key("ci", "hidden")].contains("may not read"));
        // Past what one Secret holds: the rest is refused, named.
        let big = secret(DOCKERCFG, ".dockercfg", &format!(r#"{{"quay.io":{{"auth":"{}"}}}}"#, "a".repeat(600 * 1024)));
        let read: BTreeMap<(String, String), Read> =
            [(key("a", "one"), Ok(Some(big.clone()))), (key("b", "two"), Ok(Some(big)))].into();
        let (data, problems) = copy_of(&read);
        assert_eq!(data.keys().collect::<Vec<_>>(), ["a.one"]);
        assert!(problems[&key("b", "two")].contains("exceed"));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    proptest::proptest! {
        /// Whatever a Secret holds, reading it never panics and a refusal never repeats a value.
        #[test]
        fn any_secret_is_read_without_panic_or_echo(
            body in "\\PC{0,200}",
            value in "[A-Za-z0-9]{12,24}",
            legacy in proptest::bool::ANY,
        ) {
            let text = body.replace("VALUE", &value);
            let (type_, key) = if legacy { (DOCKERCFG, ".dockercfg") } else { (DOCKERCONFIGJSON, ".dockerconfigjson") };
            for data in [text.clone(), format!(r#"{{"auths":{{"quay.io":{{"auth":"{value}"}}}}, "x": {text}}}"#)] {
                let secret = Secret {
                    type_: Some(type_.into()),
                    data: Some([(key.to_string(), ByteString(data.into_bytes()))].into()),
                    ..Default::default()
                };
                if let Err(why) = docker_config(&secret) {
                    proptest::prop_assert!(!why.contains(&value), "{why}");
                }
            }
        }
    }
}

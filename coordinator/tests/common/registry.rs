//! A real registry for the tests that need one: Debian's `docker-registry` (the distribution
//! registry, as `tests/install-deps.sh` installs it) on a loopback port, plain HTTP, and images
//! pushed to it with oci-client. Where the binary is missing, [`Registry::start`] says so and
//! the test skips.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;

pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub host: String,
    /// What pushes authenticate with (anonymous on an open registry).
    auth: RegistryAuth,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// An open registry; `None` (said on stderr) where `docker-registry` is not installed.
    pub async fn start() -> Option<Self> {
        Self::start_with(None).await
    }

    /// A registry that wants `user`/`password` (htpasswd, bcrypt) for everything; `None` (said on
    /// stderr) where `docker-registry` or `htpasswd` is not installed.
    pub async fn start_private(user: &str, password: &str) -> Option<Self> {
        Self::start_with(Some((user, password))).await
    }

    async fn start_with(login: Option<(&str, &str)>) -> Option<Self> {
        for tool in ["docker-registry", "htpasswd"].iter().take(if login.is_some() { 2 } else { 1 }) {
            if Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .output()
                .map_or(true, |o| !o.status.success())
            {
                eprintln!("SKIPPED: {tool} is not installed (tests/install-deps.sh installs it)");
                return None;
            }
        }
        // The registry client's TLS needs a crypto provider (the coordinator installs it in main).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let data = dir.path().join("data");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\n",
            data.display()
        );
        let mut auth = RegistryAuth::Anonymous;
        if let Some((user, password)) = login {
            let out = Command::new("htpasswd").args(["-Bbn", user, password]).output().unwrap();
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, out.stdout).unwrap();
            yaml.push_str(&format!("auth:\n  htpasswd:\n    realm: kip-test\n    path: {}\n", file.display()));
            auth = RegistryAuth::Basic(user.into(), password.into());
        }
        std::fs::write(&config, yaml).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let registry = Self { host, auth, child, _dir: dir };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(&registry.host).await.is_ok() {
                return Some(registry);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("docker-registry did not listen on {} within 10 s", registry.host);
    }

    /// Pushes a one-layer image holding `content` as `repository:tag`; returns its manifest digest.
    pub async fn push(&self, repository: &str, tag: &str, content: &str) -> String {
        let client = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(vec![self.host.clone()]),
            ..Default::default()
        });
        let reference: Reference = format!("{}/{repository}:{tag}", self.host).parse().unwrap();
        let layer = ImageLayer::oci_v1(content.as_bytes().to_vec(), None);
        let config = Config::oci_v1(
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec(),
            None,
        );
        client.push(&reference, &[layer], config, &self.auth, None).await.unwrap();
        client.fetch_manifest_digest(&reference, &self.auth).await.unwrap()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

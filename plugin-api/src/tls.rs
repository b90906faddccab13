//! TLS client settings for backends that reach a server through a TLS URL (`rediss://`,
//! `amqps://`, ...): the certificate-file keys of the config, read and checked once, and the
//! recognition of a failed certificate verification among a client library's errors.
//! Available with the cargo feature `tls`.
//!
//! Every backend names the keys the same: `ca_file` (CA certificate(s) to trust), and
//! `client_cert_file` with `client_key_file` (the certificate this client presents). The
//! backend fills a [`TlsFiles`] from its config, calls [`TlsFiles::validate`] in its own
//! `validate`, reads the files with [`TlsFiles::read`] when it starts and hands the
//! [`TlsMaterial`] to its client library. When a connection fails, [`verification_failure`]
//! tells a certificate that does not verify (retrying does not help: fail at once) from the
//! connection errors that retries do fix.
//!
//! Guarantees:
//! - every error names the config key and the file's path, never the file's content (a key file
//!   that does not parse is not quoted);
//! - URLs in errors go through [`redact_url`]: no password;
//! - [`TlsMaterial`]'s and [`ClientIdentity`]'s `Debug` never show the private key.
//!
//! ```
//! use comms_plugin_api::tls::TlsFiles;
//!
//! let files = TlsFiles { ca_file: Some("ca.pem".into()), ..TlsFiles::default() };
//! files.validate("rediss://cache.example:6380", "rediss://").unwrap();
//! let error = files.validate("redis://user:secret@cache.example", "rediss://").unwrap_err();
//! assert!(error.message.contains("key `ca_file`") && !error.message.contains("secret"));
//! ```

use crate::{redact::redact_url, PluginError};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use std::{
    error::Error,
    path::{Path, PathBuf},
};

/// The certificate files of a TLS connection (config keys `ca_file`, `client_cert_file`,
/// `client_key_file`). A relative path is relative to the process' working directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file of the CA certificate(s) that signed the server's certificate (a private CA).
    /// Whether they replace or extend the system's roots is the backend's to say.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate (chain) this client presents. Needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

/// The checked contents of [`TlsFiles`], read by [`TlsFiles::read`]. Its `Debug` shows neither
/// the certificates nor the key.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// The bytes of `ca_file`: PEM holding at least one certificate.
    pub ca: Option<Vec<u8>>,
    /// The client certificate and its key, when both files are set.
    pub client: Option<ClientIdentity>,
}

/// A client certificate (chain) and its private key, both PEM. Holds a secret: never print
/// `key`; `Debug` leaves it out.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The bytes of `client_cert_file`: PEM holding at least one certificate.
    pub cert_chain: Vec<u8>,
    /// The bytes of `client_key_file`: PEM holding a private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.as_ref().map(|pem| format!("{} bytes", pem.len())))
            .field("client", &self.client)
            .finish()
    }
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_chain", &format!("{} bytes", self.cert_chain.len()))
            .field("key", &"***")
            .finish()
    }
}

impl TlsFiles {
    /// Whether no file is set.
    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.client_cert_file.is_none() && self.client_key_file.is_none()
    }

    /// Refuses certificate files with a `url` that does not start with `tls_scheme` (such as
    /// `"rediss://"`; the files would silently do nothing), and a client certificate without
    /// its key or the other way round. The error names the key, and the URL without its
    /// password.
    pub fn validate(&self, url: &str, tls_scheme: &str) -> Result<(), PluginError> {
        if !url.starts_with(tls_scheme) {
            let set = [
                ("ca_file", &self.ca_file),
                ("client_cert_file", &self.client_cert_file),
                ("client_key_file", &self.client_key_file),
            ];
            if let Some((key, _)) = set.iter().find(|(_, path)| path.is_some()) {
                let article = if tls_scheme.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
                return Err(PluginError::invalid_config(format!(
                    "key `{key}`: only used with TLS, but `url` ({}) is not {article} {tls_scheme} URL",
                    redact_url(url)
                )));
            }
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(_), None) => {
                Err(PluginError::invalid_config("key `client_key_file`: needed with `client_cert_file`"))
            }
            (None, Some(_)) => {
                Err(PluginError::invalid_config("key `client_cert_file`: needed with `client_key_file`"))
            }
            _ => Ok(()),
        }
    }

    /// Reads and checks the files (call [`validate`](Self::validate) first: a client
    /// certificate without its key is ignored here). `None` when no file is set. A file that
    /// cannot be read, a certificate file without a PEM certificate or with broken PEM, and a
    /// key file without a PEM private key are [`ErrorCode::INVALID_CONFIG`](crate::ErrorCode)
    /// errors naming the key and the path, never quoting the key file.
    pub fn read(&self) -> Result<Option<TlsMaterial>, PluginError> {
        if self.is_empty() {
            return Ok(None);
        }
        let ca = match &self.ca_file {
            Some(path) => Some(certificates("ca_file", path)?),
            None => None,
        };
        let client = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert_chain: certificates("client_cert_file", cert)?,
                key: private_key(key)?,
            }),
            _ => None,
        };
        Ok(Some(TlsMaterial { ca, client }))
    }
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, PluginError> {
    std::fs::read(path).map_err(|error| {
        PluginError::invalid_config(format!("key `{key}`: cannot read `{}`: {error}", path.display()))
    })
}

/// The file's bytes, once checked to hold at least one PEM certificate and nothing unreadable.
fn certificates(key: &str, path: &Path) -> Result<Vec<u8>, PluginError> {
    let pem = read(key, path)?;
    let parsed = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|error| {
        PluginError::invalid_config(format!("key `{key}`: `{}` is not valid PEM: {error}", path.display()))
    })?;
    if parsed.is_empty() {
        return Err(PluginError::invalid_config(format!(
            "key `{key}`: `{}` holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(pem)
}

/// The key file's bytes, once checked to hold a PEM private key. The error never quotes the
/// file's content.
fn private_key(path: &Path) -> Result<Vec<u8>, PluginError> {
    let pem = read("client_key_file", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        PluginError::invalid_config(format!(
            "key `client_key_file`: `{}` holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        ))
    })?;
    Ok(pem)
}

/// Why the TLS handshake failed, when it failed over a certificate: the server's was not
/// accepted (unknown CA, wrong host name, expired), or the server refused this client's.
/// `None` for any other error.
///
/// Walks `error`'s chain of sources for a `rustls::Error`, also inside `std::io::Error`s
/// (whose `source` skips the error they wrap), and as a last resort recognises rustls' text
/// `invalid peer certificate` in `error`'s message (some clients keep only the text).
pub fn verification_failure(error: &(dyn Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return classify(tls);
        }
        // io::Error::source skips the error it wraps; rustls' errors arrive wrapped in one.
        if let Some(inner) = error.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(found) = verification_failure(inner) {
                return Some(found);
            }
        }
        next = error.source();
    }
    // Some paths keep only the text of the rustls error (redis' reconnecting connection).
    let text = error.to_string();
    text.contains("invalid peer certificate").then(|| {
        format!("the server's certificate was not accepted ({})", after("invalid peer certificate", &text))
    })
}

fn after<'a>(marker: &str, text: &'a str) -> &'a str {
    text.find(marker).map_or(text, |at| &text[at..])
}

fn classify(error: &rustls::Error) -> Option<String> {
    use rustls::AlertDescription::*;
    match error {
        rustls::Error::InvalidCertificate(_) => {
            Some(format!("the server's certificate was not accepted ({error})"))
        }
        rustls::Error::AlertReceived(
            BadCertificate
            | UnsupportedCertificate
            | CertificateRevoked
            | CertificateExpired
            | CertificateUnknown
            | UnknownCA
            | CertificateRequired,
        ) => Some(format!("the server refused this client's certificate ({error})")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// A client library's error that wraps the I/O error as its source, the way redis' and
    /// lapin's errors do.
    #[derive(Debug)]
    struct LibraryError(io::Error);

    impl std::fmt::Display for LibraryError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("connection failed")
        }
    }

    impl Error for LibraryError {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn certificate_failures_are_found_inside_io_errors_and_text() {
        let unknown_ca = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let wrapped = io::Error::new(io::ErrorKind::InvalidData, unknown_ca.clone());
        let library_error = LibraryError(io::Error::new(io::ErrorKind::InvalidData, unknown_ca));
        for error in [&wrapped as &(dyn Error + 'static), &library_error] {
            let cause = verification_failure(error).expect("a verification failure");
            assert!(
                cause.contains("certificate was not accepted") && cause.contains("UnknownIssuer"),
                "{cause}"
            );
        }
        let text_only = io::Error::other("TLS error- invalid peer certificate: NotValidForName");
        assert!(verification_failure(&text_only).unwrap().contains("NotValidForName"));
        let refused = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        assert!(verification_failure(&io::Error::other(refused)).unwrap().contains("refused this client"));
        assert_eq!(verification_failure(&io::Error::from(io::ErrorKind::ConnectionRefused)), None);
        let other = io::Error::other(rustls::Error::DecryptError);
        assert_eq!(verification_failure(&other), None);
        assert_eq!(verification_failure(&LibraryError(io::Error::other(rustls::Error::DecryptError))), None);
    }

    fn read_error(files: &TlsFiles) -> PluginError {
        files.read().expect_err("an error")
    }

    #[test]
    fn files_are_named_by_key_and_path_when_unreadable_or_empty() {
        let dir = std::env::temp_dir().join(format!("comms-plugin-api-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = TlsFiles { ca_file: Some(dir.join("missing.pem")), ..TlsFiles::default() };
        let error = read_error(&missing);
        assert!(error.message.contains("key `ca_file`") && error.message.contains("missing.pem"), "{error}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = read_error(&TlsFiles { ca_file: Some(empty.clone()), ..TlsFiles::default() });
        assert!(
            error.message.contains("no PEM certificate") && error.message.contains("empty.pem"),
            "{error}"
        );
        let secret = dir.join("key.pem");
        std::fs::write(&secret, "hunter2-not-a-key").unwrap();
        let client = TlsFiles {
            client_cert_file: Some(empty.clone()),
            client_key_file: Some(secret.clone()),
            ..TlsFiles::default()
        };
        let error = read_error(&client);
        assert!(error.message.contains("key `client_cert_file`"), "{error}");
        assert!(TlsFiles::default().read().unwrap().is_none());
        // A certificate that parses, then a key file that does not: named, never quoted.
        let cert = dir.join("cert.pem");
        std::fs::write(&cert, CERTIFICATE).unwrap();
        let client = TlsFiles { client_cert_file: Some(cert.clone()), ..client };
        let error = read_error(&client);
        assert!(
            error.message.contains("key `client_key_file`") && error.message.contains("key.pem"),
            "{error}"
        );
        assert!(!error.message.contains("hunter2"), "{error}");
        let ca_only = TlsFiles { ca_file: Some(cert), ..TlsFiles::default() }.read().unwrap().unwrap();
        assert_eq!(ca_only.ca.as_deref(), Some(CERTIFICATE.as_bytes()));
        assert_eq!(ca_only.client, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_never_shows_the_private_key() {
        let material = TlsMaterial {
            ca: None,
            client: Some(ClientIdentity { cert_chain: b"cert".to_vec(), key: b"hunter2".to_vec() }),
        };
        let shown = format!("{material:?}");
        assert!(shown.contains("***") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn certificate_files_need_a_tls_url_and_come_in_pairs() {
        let ca = TlsFiles { ca_file: Some("ca.pem".into()), ..TlsFiles::default() };
        let error = ca.validate("redis://u:secret@host", "rediss://").unwrap_err();
        assert!(error.message.contains("key `ca_file`") && error.message.contains("rediss://"), "{error}");
        assert!(error.message.contains("is not a rediss:// URL"), "{error}");
        assert!(!error.message.contains("secret"), "{error}");
        let error = ca.validate("amqp://u:secret@host/%2f", "amqps://").unwrap_err();
        assert!(
            error.message.contains("is not an amqps:// URL") && !error.message.contains("secret"),
            "{error}"
        );
        ca.validate("rediss://host", "rediss://").unwrap();
        let cert_only = TlsFiles { client_cert_file: Some("client.pem".into()), ..TlsFiles::default() };
        let error = cert_only.validate("rediss://host", "rediss://").unwrap_err();
        assert!(error.message.contains("key `client_key_file`"), "{error}");
        let key_only = TlsFiles { client_key_file: Some("key.pem".into()), ..TlsFiles::default() };
        let error = key_only.validate("amqps://host/%2f", "amqps://").unwrap_err();
        assert!(error.message.contains("key `client_cert_file`"), "{error}");
        let all = TlsFiles { client_cert_file: Some("c.pem".into()), ..key_only.clone() };
        let all = TlsFiles { ca_file: Some("ca.pem".into()), ..all };
        all.validate("rediss://host", "rediss://").unwrap();
        TlsFiles::default().validate("redis://host", "rediss://").unwrap();
    }

    /// A PEM certificate block around placeholder bytes: `read` checks the PEM framing only
    /// (the TLS library parses the DER when it connects).
    const CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----
MIIBfTCCASOgAwIBAgIUQ1ZFA0hKZ8qk0ak5m/ZxS0w7fBMwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MB4XDTI0MDEwMTAwMDAwMFoXDTM0MDEwMTAw
MDAwMFowFDESMBAGA1UEAwwJbG9jYWxob3N0MFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAEq0nSg3Hrh4tUuDk1ab3jRqFG9Qq0Yb8b9aO4yK4Ch8sM0Q5mF0Gx9G6S
2n5V3rbdl5l5h2Vn5TbqN5k9n2P0JqNTMFEwHQYDVR0OBBYEFAAAAAAAAAAAAAAA
AAAAAAAAAAAAMB8GA1UdIwQYMBaAFAAAAAAAAAAAAAAAAAAAAAAAAAAAMA8GA1Ud
EwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIgAQIDBAUGBwgJCgsMDQ4PEBES
ExQVFhcYGRobHB0eHyACIQCgoaKjpKWmp6ipqqusra6vsLGys7S1tre4ubq7vL2+
vw==
-----END CERTIFICATE-----
";
}

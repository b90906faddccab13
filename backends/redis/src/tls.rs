//! TLS to the Redis server (`rediss://`): reading the certificate files of the config once,
//! with errors naming the key and the path, and telling a failed certificate verification
//! (which trying again does not fix) from the connection errors that retries do fix.

use crate::config::TlsFiles;
use comms_plugin_api::PluginError;
use redis::{ClientTlsConfig, TlsCertificates};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use std::path::Path;

/// Reads and checks the files of `files` (already validated: client certificate and key come
/// together). `None` when no file is set: the system's roots, no client certificate.
pub(crate) fn load(files: &TlsFiles) -> Result<Option<TlsCertificates>, PluginError> {
    if files.is_empty() {
        return Ok(None);
    }
    let root_cert = match &files.ca_file {
        Some(path) => Some(certificates("ca_file", path)?),
        None => None,
    };
    let client_tls = match (&files.client_cert_file, &files.client_key_file) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: certificates("client_cert_file", cert)?,
            client_key: private_key(key)?,
        }),
        _ => None,
    };
    Ok(Some(TlsCertificates { client_tls, root_cert }))
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
pub(crate) fn verification_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
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

    #[test]
    fn certificate_failures_are_found_inside_io_errors_and_text() {
        let unknown_ca = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let wrapped = io::Error::new(io::ErrorKind::InvalidData, unknown_ca.clone());
        let redis_error = redis::RedisError::from(io::Error::new(io::ErrorKind::InvalidData, unknown_ca));
        for error in [&wrapped as &(dyn std::error::Error + 'static), &redis_error] {
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
    }

    fn load_error(files: &TlsFiles) -> PluginError {
        load(files).err().expect("an error")
    }

    #[test]
    fn files_are_named_by_key_and_path_when_unreadable_or_empty() {
        let dir = std::env::temp_dir().join(format!("comms-redis-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = TlsFiles { ca_file: Some(dir.join("missing.pem")), ..TlsFiles::default() };
        let error = load_error(&missing);
        assert!(error.message.contains("key `ca_file`") && error.message.contains("missing.pem"), "{error}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = load_error(&TlsFiles { ca_file: Some(empty.clone()), ..TlsFiles::default() });
        assert!(
            error.message.contains("no PEM certificate") && error.message.contains("empty.pem"),
            "{error}"
        );
        let secret = dir.join("key.pem");
        std::fs::write(&secret, "hunter2-not-a-key").unwrap();
        let client = TlsFiles {
            client_cert_file: Some(empty.clone()),
            client_key_file: Some(secret),
            ..TlsFiles::default()
        };
        let error = load_error(&client);
        assert!(error.message.contains("key `client_cert_file`"), "{error}");
        assert!(load(&TlsFiles::default()).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

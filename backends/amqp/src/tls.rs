//! TLS to the broker (`amqps://`): reading the certificate files of the config once,
//! with errors naming the key and the path, and telling a failed certificate verification
//! (which trying again does not fix) from the connection errors that retries do fix.

use crate::config::TlsFiles;
use comms_plugin_api::PluginError;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use std::path::Path;

/// Reads and checks the files of `files` (already validated: client certificate and key come
/// together). No file set: the bundled roots, no client certificate. The result holds the
/// private key: never print it (its `Debug` shows the key).
pub(crate) fn load(files: &TlsFiles) -> Result<OwnedTLSConfig, PluginError> {
    let cert_chain = match &files.ca_file {
        Some(path) => Some(String::from_utf8_lossy(&certificates("ca_file", path)?).into_owned()),
        None => None,
    };
    let identity = match (&files.client_cert_file, &files.client_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: certificates("client_cert_file", cert)?,
            key: private_key(key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig { identity, cert_chain })
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
    // In case a layer kept only the text of the rustls error.
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
        let lapin_error = lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(io::Error::new(
            io::ErrorKind::InvalidData,
            unknown_ca,
        ))));
        for error in [&wrapped as &(dyn std::error::Error + 'static), &lapin_error] {
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
        load(files).expect_err("an error")
    }

    #[test]
    fn files_are_named_by_key_and_path_when_unreadable_or_empty() {
        let dir = std::env::temp_dir().join(format!("comms-amqp-tls-{}", std::process::id()));
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
        assert_eq!(load(&TlsFiles::default()).ok(), Some(OwnedTLSConfig::default()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

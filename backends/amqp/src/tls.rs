//! TLS to the broker (`amqps://`): the certificate files of the config, read and checked by
//! [`comms_plugin_api::tls`], handed to lapin.

use comms_plugin_api::{
    tls::{TlsFiles, TlsMaterial},
    PluginError,
};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};

pub(crate) use comms_plugin_api::tls::verification_failure;

/// Reads and checks the files of `files` (already validated: client certificate and key come
/// together). No file set: the bundled roots, no client certificate. A `ca_file` is trusted in
/// addition to those roots. The result holds the private key: never print it (its `Debug`
/// shows the key).
pub(crate) fn load(files: &TlsFiles) -> Result<OwnedTLSConfig, PluginError> {
    Ok(files.read()?.map(tls_config).unwrap_or_default())
}

fn tls_config(material: TlsMaterial) -> OwnedTLSConfig {
    OwnedTLSConfig {
        identity: material
            .client
            .map(|client| OwnedIdentity::PKCS8 { pem: client.cert_chain, key: client.key }),
        cert_chain: material.ca.map(|pem| String::from_utf8_lossy(&pem).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{io, sync::Arc};

    #[test]
    fn certificate_failures_are_found_inside_lapin_errors() {
        let unknown_ca = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let lapin_error = lapin::Error::from(lapin::ErrorKind::IOError(Arc::new(io::Error::new(
            io::ErrorKind::InvalidData,
            unknown_ca,
        ))));
        let cause = verification_failure(&lapin_error).expect("a verification failure");
        assert!(cause.contains("certificate was not accepted") && cause.contains("UnknownIssuer"), "{cause}");
        let refused = lapin::Error::from(lapin::ErrorKind::IOError(Arc::new(io::Error::from(
            io::ErrorKind::ConnectionRefused,
        ))));
        assert_eq!(verification_failure(&refused), None);
    }

    #[test]
    fn files_become_lapins_tls_config() {
        assert_eq!(load(&TlsFiles::default()).ok(), Some(OwnedTLSConfig::default()));
        let missing = TlsFiles { ca_file: Some("/nonexistent/ca.pem".into()), ..TlsFiles::default() };
        assert!(load(&missing).unwrap_err().message.contains("key `ca_file`"));
        let material = TlsMaterial {
            ca: Some(b"ca".to_vec()),
            client: Some(comms_plugin_api::tls::ClientIdentity {
                cert_chain: b"cert".to_vec(),
                key: b"key".to_vec(),
            }),
        };
        let config = tls_config(material);
        assert_eq!(config.cert_chain.as_deref(), Some("ca"));
        assert_eq!(
            config.identity,
            Some(OwnedIdentity::PKCS8 { pem: b"cert".to_vec(), key: b"key".to_vec() })
        );
    }
}
